"""An evaluation's files of record in its output folder: results.json (every record,
see records.py, the checkpoints, the per-image worst cases and the sanity checks) and
verdicts.npz (verdicts.py), read once per run before the attacks (`read_stored`),
merged with the run's own (`merge`: a rerun into the same folder keeps the earlier
records it does not redo) and written atomically (`write_results`)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from l2p_jax.errors import UserError
from l2p_jax.evaluation import records as records_lib
from l2p_jax.evaluation import verdicts
from l2p_jax.evaluation.attack_registry import attack_entry
from l2p_jax.runtime import files

RESULTS_FILE = 'results.json'


class ResultsFileError(UserError, ValueError):
  """An earlier results.json that cannot be read, so its records cannot be kept."""


def read_previous(output_dir: str) -> dict[str, Any] | None:
  """The results of an earlier output_dir/results.json, None when there is none; raises
  ResultsFileError, naming the file and what to do, when it does not read or holds
  records of an attack that is not registered."""
  path = os.path.join(output_dir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      previous = json.load(f)
    if not (isinstance(previous, dict) and {'checkpoints', 'records'} <= set(previous)):
      raise ValueError('it has no checkpoints and records')
    for record in previous['records']:
      attack_entry(record['attack'])
  except (OSError, ValueError, TypeError, KeyError) as error:
    raise ResultsFileError(
      f'{path} does not read ({type(error).__name__}: {error}), so its earlier records '
      'cannot be kept; move it aside and rerun, or write elsewhere with '
      '--config.output_dir=DIR.'
    ) from None
  return previous


@dataclasses.dataclass(frozen=True)
class Stored:
  """What an output folder held before this run: its results.json (None if none) and
  its verdicts.npz's arrays ({} if none)."""

  results: dict[str, Any] | None
  verdicts: dict[str, Any]


def read_stored(output_dir: str) -> Stored:
  """results.json and verdicts.npz of output_dir, each read once; ResultsFileError or
  VerdictsFileError when one does not read."""
  return Stored(read_previous(output_dir), verdicts.read(output_dir))


def merge(
  results: dict[str, Any], new_verdicts: dict[str, Any], stored: Stored
) -> tuple[dict[str, Any], dict[str, Any]]:
  """`results` with the records and checkpoints of the stored results.json that it does
  not redo kept in front of its own, and the verdicts of all its records (the stored
  ones and `new_verdicts`)."""
  previous = stored.results
  if previous is not None:
    redone = {records_lib.identity(r) for r in results['records']}
    listed = {c['checkpoint'] for c in results['checkpoints']}
    results = {
      **results,
      'checkpoints': [c for c in previous['checkpoints'] if c['checkpoint'] not in listed]
      + results['checkpoints'],
      'records': [r for r in previous['records'] if records_lib.identity(r) not in redone]
      + results['records'],
    }
  merged = {**stored.verdicts, **new_verdicts}
  return results, verdicts.kept(merged, results['records'])


def write_results(
  results: dict[str, Any], verdicts_by_name: dict[str, Any], output_dir: str
) -> list[str]:
  """Writes verdicts.npz, then results.json, into output_dir, each atomically (a full
  disk keeps the old file), so that a run stopped between them leaves no record without
  its verdicts (extra verdicts are dropped on the next merge); returns their paths."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, RESULTS_FILE)
  written = verdicts.write(output_dir, verdicts_by_name)
  files.write_json(path, results)
  return [path, written]
