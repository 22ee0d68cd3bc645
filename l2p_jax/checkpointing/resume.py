"""The resume policy of a training workdir: which checkpoint a rerun continues from,
which config changes refuse it, which are reported (and recorded), and where unreadable
checkpoints go."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from l2p_jax.checkpointing.compatibility import check_compatible
from l2p_jax.checkpointing.manager import CheckpointMismatchError, Checkpoints
from l2p_jax.runtime import files


def resume(
  checkpoints: Checkpoints, config: ml_collections.ConfigDict, tree: Any, workdir: str
) -> tuple[Any, int | None]:
  """The checkpoint tree of the newest readable checkpoint compatible with `config`
  (`tree` itself, the run's fresh start, and step None, when there is none), restored as
  `tree`'s types and shardings, after refusing a config that changes what a step means
  and warning about (and recording) any other change.

  Unreadable newer checkpoints are moved to WORKDIR/unreadable_checkpoints/, so the
  resumed run can write those steps again.
  """
  if checkpoints.latest_step() is None:
    return tree, None
  changes = []

  def check(meta: dict[str, Any], where: str) -> None:
    changes[:] = check_compatible(meta['config'], config, where)

  step, tree, meta, unreadable = checkpoints.restore_newest_readable(
    jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree),
    check=check,
  )
  if jax.process_index() == 0:
    aside = os.path.join(workdir, 'unreadable_checkpoints')
    for bad in unreadable:  # Each was named by one warning when it failed to restore.
      os.makedirs(aside, exist_ok=True)
      os.replace(checkpoints.path(bad), os.path.join(aside, str(bad)))
    moved = f' (unreadable newer ones moved to {aside})' if unreadable else ''
    tqdm.write(f'Resuming from {checkpoints.path(step)}{moved}.')
    _warn_other_device_count(meta.get('devices'), checkpoints.path(step))
    if changes:
      changed = os.path.join(workdir, f'config.{step}.json')
      files.write_text(changed, config.to_json_best_effort(indent=2))
      logging.warning(
        'Resuming %s with a changed config (written to %s):\n  %s',
        checkpoints.path(step),
        changed,
        '\n  '.join(changes),
      )
  if unreadable:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('l2p_jax: unreadable checkpoints moved')
    checkpoints.reload()
  return tree, step


def _warn_other_device_count(saved: int | None, where: str) -> None:
  """Warns when the checkpoint resumed from was written on another number of devices
  (checkpoints older than that record say nothing): the run goes on, but not bit for bit
  as one that kept its devices would."""
  devices = jax.device_count()
  if saved is not None and saved != devices:
    logging.warning(
      'Resuming %s, written by a run on %d devices, on %d: the run goes on, but not '
      'bit-identical to one that stays on %d (each step sums its batch over the devices, '
      'and another split sums in another order). To resume bit for bit, run on %d devices '
      '(--cpu_devices=%d on a CPU).',
      where,
      saved,
      devices,
      saved,
      saved,
      saved,
    )


def refuse_changed_steps(checkpoints: Checkpoints, config: ml_collections.ConfigDict) -> None:
  """Refuses a changed model or step before the data is loaded (resume() checks
  again the checkpoint it restores)."""
  latest = checkpoints.latest_step()
  if latest is None:
    return
  try:
    check_compatible(checkpoints.meta(latest)['config'], config, checkpoints.path(latest))
  except CheckpointMismatchError:
    raise
  except Exception:  # pylint: disable=broad-except
    pass  # An unreadable checkpoint: resume() warns and falls back to an older one.
