"""The report of a trajectory comparison (trajectory.py): each optimizer step's record
of how far our step and the authors' PyTorch step have parted (losses, every variable
collection, PGD's gradient signs), the run's report around the records, and its
summary in a few lines. The comparison gathers both sides' arrays; this module
measures them."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from l2p_jax import methods
from l2p_jax.training import schedule

COLLECTIONS = ('params', 'perturb', 'batch_stats')


def _difference(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
  """max |ours - theirs| and that over max |ours| (the arrays' own scale)."""
  abs_diff = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
  scale = float(np.max(np.abs(ours))) if ours.size else 0.0
  return {'max_abs': abs_diff, 'max_rel': abs_diff / scale if scale else abs_diff}


def _collection_differences(ours: dict, theirs: dict) -> dict[str, dict[str, float]]:
  """Per collection, the largest difference of any of its arrays."""
  out = {}
  for collection in COLLECTIONS:
    paths = [p for p in ours if p[0] == collection]
    if paths:
      diffs = [_difference(np.asarray(ours[p]), theirs[p]) for p in paths]
      out[collection] = {k: max(d[k] for d in diffs) for k in ('max_abs', 'max_rel')}
  return out


def step_record(
  step: int,
  epoch: int,
  lr: float,
  phase: schedule.Phase,
  ours: dict,
  theirs: dict,
  losses: tuple[float, float],
  signs: tuple[np.ndarray, np.ndarray] | None,
) -> dict[str, Any]:
  """Step `step`'s record: both losses (ours, PyTorch's), every collection's largest
  difference between the flat {path: array} variables `ours` and `theirs` and, for an
  adversarial step (`signs`: ours and PyTorch's gradient sign of each PGD iteration,
  NCHW), how many PGD gradient signs differ and from which iteration."""
  jax_loss, torch_loss = losses
  record = {
    'step': step,
    'epoch': epoch,
    'learning_rate': lr,
    'noise': phase.noise,
    'adversarial': phase.adversarial,
    'loss': {
      'jax': jax_loss,
      'torch': torch_loss,
      **_difference(np.float64(jax_loss), np.float64(torch_loss)),
    },
    **_collection_differences(ours, theirs),
  }
  if signs is not None:
    differ = signs[0] != signs[1]
    flipped = np.flatnonzero(differ.reshape(len(differ), -1).any(axis=1))
    record['pgd'] = {
      'sign_flip_fraction': float(differ.mean()),
      'first_flip_iteration': int(flipped[0]) if flipped.size else None,
    }
  return record


def run_report(
  config: ml_collections.ConfigDict, batch_norm: str, records: list[dict[str, Any]]
) -> dict[str, Any]:
  """The comparison's report: the run's settings, every step's record and the first
  PGD gradient-sign flip."""
  first_flip = next(
    (
      {'step': r['step'], 'iteration': r['pgd']['first_flip_iteration']}
      for r in records
      if r.get('pgd', {}).get('first_flip_iteration') is not None
    ),
    None,
  )
  return {
    'method': config.method,
    # L2P's update alternation; None for a method without one.
    'alternation': (
      config.l2p.alternation if methods.get(config.method).noise_update is not None else None
    ),
    'arch': config.model.arch,
    'width': config.model.width,
    'dataset': config.data.dataset,
    'batch_size': config.batch_size,
    'batch_norm': batch_norm,
    'steps': records,
    'first_pgd_sign_flip': first_flip,
  }


def summarize(report: dict[str, Any]) -> str:
  """A few lines: the largest difference of each quantity over the run, and the first
  PGD sign flip."""
  alternation = f' ({report["alternation"]})' if report['alternation'] else ''
  lines = [
    f'{report["method"]}{alternation} {report["arch"]} '
    f'x{report["width"]}, {len(report["steps"])} steps, '
    f'BatchNorm {report["batch_norm"]}:'
  ]
  for key in ('params', 'perturb', 'batch_stats', 'loss'):
    values = [r[key] for r in report['steps'] if key in r]
    if values:
      lines.append(
        f'  {key}: max abs {max(v["max_abs"] for v in values):.3g}, '
        f'max rel {max(v["max_rel"] for v in values):.3g}'
      )
  flip = report['first_pgd_sign_flip']
  lines.append(
    '  PGD signs: '
    + (
      'never differ'
      if flip is None
      else f'first differ at step {flip["step"]}, PGD iteration {flip["iteration"]}'
    )
  )
  return '\n'.join(lines)
