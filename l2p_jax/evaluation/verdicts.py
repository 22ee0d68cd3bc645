"""Per-image verdicts beside results.json, and the per-image worst case they make possible.

verdicts.npz holds, for every record (by its `verdicts` name), `<name>.right`: per image
of the split the number of judged draws under which it was classified right,
`<name>.draw_right`: per judged draw the number of images right, and `<name>.bits`: per
image and judged draw whether it was right (np.packbits along the draws; absent for
records written before the judged draws were shared). A rerun merges into the file as
results.json does, so the worst case covers every attack run so far.

The worst case of a checkpoint (AutoAttack's robust accuracy, over draws), over the
attacks of one threat model (those whose registry entry joins the worst case: the L-inf
attacks at the headline eps, transfer and noise-off included, with the clean images;
C&W and few-pixel measure other budgets), judged the same way, on the same images:
- per image: the smallest share of draws classified right over the attacks; its
  `accuracy` is the mean of that per-image worst share, `accuracy_all_draws` the images
  right under every draw of every attack;
- per draw (`accuracy_per_draw`): an image is right under draw k only if right under
  draw k for every attack, the mean over (image, draw). This union is fair only because
  judged draw k is the same noise for every attack of an evaluation (judging.py's
  keys): it needs every attack's bits, judged with shared draws under the same seed and
  batch size, and is left out otherwise. It is never above the per-image worst share
  (both over the same draws).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from l2p_jax.errors import UserError
from l2p_jax.evaluation import intervals
from l2p_jax.evaluation.attack_registry import attack_entry, from_source
from l2p_jax.runtime import files

VERDICTS_FILE = 'verdicts.npz'


PARTS = ('right', 'draw_right', 'bits')  # A record's entries: <verdicts name>.<part>.


def arrays(
  name: str, right: np.ndarray, draw_right: np.ndarray, bits: np.ndarray | None = None
) -> dict[str, np.ndarray]:
  """The entries of verdicts.npz for the record named `name`; `bits` (n, K) bool, each
  image right under each judged draw, packed (none stored when None)."""
  packed = {} if bits is None else {f'{name}.bits': np.packbits(np.asarray(bits, bool), axis=1)}
  return {
    f'{name}.right': np.asarray(right, np.uint32),
    f'{name}.draw_right': np.asarray(draw_right, np.uint32),
    **packed,
  }


def draw_bits(verdicts: dict[str, np.ndarray], record: dict[str, Any]) -> np.ndarray | None:
  """A record's (n, K) bits of each image right under each judged draw; None when its
  verdicts have none (written before the judged draws were shared)."""
  packed = verdicts.get(f'{record["verdicts"]}.bits')
  if packed is None:
    return None
  return np.unpackbits(packed, axis=1, count=record['judged_draws']).astype(bool)


class VerdictsFileError(UserError, ValueError):
  """An earlier verdicts.npz that cannot be read, so its verdicts cannot be kept."""


def read(output_dir: str) -> dict[str, np.ndarray]:
  """The verdicts of output_dir/verdicts.npz ({} when there are none); raises
  VerdictsFileError, naming the file and what to do, when it does not read."""
  path = os.path.join(output_dir, VERDICTS_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with np.load(path) as stored:
      return {name: stored[name] for name in stored.files}
  except (OSError, ValueError, zipfile.BadZipFile) as error:
    raise VerdictsFileError(
      f'{path} does not read ({type(error).__name__}: {error}), so the worst case cannot '
      'cover earlier runs; move it aside and rerun, or write elsewhere with '
      '--config.output_dir=DIR.'
    ) from None


def write(output_dir: str, verdicts: dict[str, np.ndarray]) -> str:
  """Writes verdicts.npz atomically (a full disk keeps the previous file); returns its
  path."""
  path = os.path.join(output_dir, VERDICTS_FILE)
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **verdicts)
  files.write_with(path, lambda f: f.write(buffer.getvalue()), binary=True)
  return path


def kept(verdicts: dict[str, np.ndarray], records: Sequence[dict[str, Any]]) -> dict:
  """The verdicts of `records` only (those of replaced records dropped)."""
  names = {r.get('verdicts') for r in records}
  return {key: value for key, value in verdicts.items() if key.rsplit('.', 1)[0] in names}


def _threat_model_group(record: dict[str, Any], eps: float) -> tuple | None:
  """The worst-case group of a record (checkpoint, data, images, judgement), None when it
  is not an attack of the worst case at `eps` or has no verdicts."""
  if not attack_entry(record['attack']).worst_case or record['params']['eps'] not in (None, eps):
    return None
  if not record.get('verdicts'):
    return None  # Written before verdicts were kept.
  return tuple(
    record[field]
    for field in ('label', 'checkpoint', 'dataset', 'split', 'n', 'rule', 'draws', 'noise')
  )


def worst_cases(
  records: Sequence[dict[str, Any]], verdicts: dict[str, np.ndarray], eps: float
) -> list[dict[str, Any]]:
  """One worst-case entry per checkpoint and judgement (module docstring): label,
  checkpoint, dataset, split, n, rule, draws, noise, attacks, judged_draws (the fewest of
  its attacks'), accuracy, accuracy_ci95 (intervals.accuracy_interval of the per-image
  worst shares), accuracy_all_draws and, where every attack's draws were shared
  (`_per_draw`), accuracy_per_draw with accuracy_per_draw_ci95."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in records:
    group = _threat_model_group(r, eps)
    if group is not None and f'{r["verdicts"]}.right' in verdicts:
      groups.setdefault(group, []).append(r)
  entries = []
  fields = ('label', 'checkpoint', 'dataset', 'split', 'n', 'rule', 'draws', 'noise')
  for group, members in groups.items():
    right = [verdicts[f'{r["verdicts"]}.right'] for r in members]
    shares = np.min([v / r['judged_draws'] for v, r in zip(right, members)], axis=0)
    all_draws = np.all([v == r['judged_draws'] for v, r in zip(right, members)], axis=0)
    fewest = min(r['judged_draws'] for r in members)
    low, high = intervals.accuracy_interval(shares, fewest)
    entries.append(
      {
        **dict(zip(fields, group)),
        'attacks': [r['name'] + from_source(r) for r in members],
        'judged_draws': fewest,
        'accuracy': float(shares.mean()),
        'accuracy_ci95': [low, high],
        'accuracy_all_draws': float(all_draws.mean()),
        **_per_draw(members, verdicts),
      }
    )
  return entries


def _per_draw(members: Sequence[dict[str, Any]], verdicts: dict[str, np.ndarray]) -> dict:
  """The per-draw worst case of a group's records (module docstring) over their first
  `fewest` judged draws, with its interval (intervals.accuracy_interval with the
  per-draw accuracies); {} unless every record has its bits and the same judged draws
  (judging, seed and batch size)."""
  bits = [draw_bits(verdicts, r) for r in members]
  if any(b is None for b in bits):
    return {}
  shared = {(r.get('judging'), r['key']['seed'], r['batch_size']) for r in members}
  if len(shared) != 1 or None in next(iter(shared)):
    return {}
  fewest = min(b.shape[1] for b in bits)
  right = np.all([b[:, :fewest] for b in bits], axis=0)
  low, high = intervals.accuracy_interval(right.mean(1), fewest, right.mean(0))
  return {'accuracy_per_draw': float(right.mean()), 'accuracy_per_draw_ci95': [low, high]}
