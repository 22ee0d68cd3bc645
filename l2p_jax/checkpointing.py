"""Orbax checkpoints of a training run: the full train state plus the run's metadata.

Every checkpoint holds `state` (step, variables, optimizer state, epoch accumulators)
and `meta` (the resolved config, the number of classes and the input normalization),
so an evaluation can rebuild the model from the checkpoint alone, and a resumed run
can be refused when its config would build a different model. Orbax writes each
checkpoint to a temporary folder and renames it when complete: a crash mid-save
leaves the previous checkpoints intact. A checkpoint damaged later (a truncated or
missing file) is skipped for the newest one that reads, with a warning naming it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from absl import logging
from flax import traverse_util
import jax
import ml_collections
import orbax.checkpoint as ocp

from l2p_jax import sharding

# Config fields that decide the shapes and meaning of the saved variables.
STRUCTURE_FIELDS = ('method', 'model', 'data.dataset')
# Config fields that decide what a step of training is (its model, its batches, its
# random numbers): resuming a checkpoint with other values is refused.
STEP_FIELDS = STRUCTURE_FIELDS + ('seed', 'batch_size', 'data.train_split',
                                  'data.train_examples', 'data.normalization',
                                  'optim.optimizer')  # SGD and Adam states differ.


class CheckpointMismatchError(ValueError):
  """A checkpoint was written for a different model or steps than the config describes."""


class CheckpointUnreadableError(RuntimeError):
  """No checkpoint of a folder can be read."""


class Checkpoints:
  """The checkpoints in `directory` (created if missing), the latest `keep` kept."""

  def __init__(self, directory: str, keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                             read_only=read_only),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def reload(self) -> None:
    """Rereads the list of checkpoints from disk."""
    self.manager.reload()

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts writing checkpoint `step` (asynchronously; `wait` blocks until done)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict]:
    """The state saved at `step` and its metadata.

    With `abstract_state`, the state comes back as its type and shardings; without,
    as nested dicts of arrays replicated over this process's devices, whatever the
    number of devices that wrote it.
    """
    if abstract_state is None:
      replicated = sharding.replicated_sharding(sharding.make_mesh())
      abstract_state = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
          self.manager.item_metadata(step)['state'])
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def meta(self, step: int) -> dict[str, Any]:
    """The metadata of checkpoint `step` without reading its arrays."""
    return self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def steps(self) -> list[int]:
    """Every checkpoint's step, oldest first."""
    return sorted(self.manager.all_steps())

  def restore_newest_readable(
      self, abstract_state: Any = None,
      check: Callable[[dict[str, Any], str], None] | None = None,
      steps: Sequence[int] | None = None) -> tuple[int, Any, dict, list[int]]:
    """The newest of `steps` (default: all) that restores, as (step, state, meta,
    the newer steps skipped as unreadable); each skipped one is logged as a warning.

    `check(meta, path)` may refuse a checkpoint by raising; that error propagates.
    Raises CheckpointUnreadableError when none can be read.
    """
    skipped, reasons = [], []

    def skip(step: int, error: Exception) -> None:
      reasons.append(f'{type(error).__name__}: {(str(error).splitlines() or [""])[0]}')
      logging.warning('Checkpoint %s is unreadable (%s); trying an older one.',
                      self.path(step), reasons[-1])
      skipped.append(step)

    # orbax and tensorstore raise many types for a damaged file (ValueError, OSError,
    # JSON errors, ...): whatever they are, the checkpoint does not read.
    for step in sorted(self.steps() if steps is None else steps, reverse=True):
      try:
        meta = self.meta(step)
      except Exception as error:  # pylint: disable=broad-except
        skip(step, error)
        continue
      if check is not None:
        check(meta, self.path(step))
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as error:  # pylint: disable=broad-except
        skip(step, error)
        continue
      return step, state, meta, skipped
    raise CheckpointUnreadableError(
        f'No readable checkpoint in {self.directory}' +
        (f': {", ".join(map(str, skipped))} unreadable ({reasons[-1]})' if skipped else '') +
        '. Name another checkpoint, or move the damaged step folders away.')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def config_differences(saved_config: dict[str, Any],
                       config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """Every flattened field on which a saved config and `config` disagree, as
  (field, 'checkpoint has X, config has Y'), sorted by field."""
  saved = traverse_util.flatten_dict(saved_config, sep='.')
  current = traverse_util.flatten_dict(config.to_dict(), sep='.')
  differences = []
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key, '<absent>'), current.get(key, '<absent>')
    if _normalize(old) != _normalize(new):
      differences.append((key, f'checkpoint has {old!r}, config has {new!r}'))
  return differences


def _among(field: str, fields: Sequence[str]) -> bool:
  return any(field == f or field.startswith(f + '.') for f in fields)


def check_compatible(saved_config: dict[str, Any],
                     config: ml_collections.ConfigDict, where: str) -> list[str]:
  """Raises CheckpointMismatchError naming every STEP_FIELDS difference; returns the
  other differences as 'field: checkpoint has X, config has Y' lines."""
  differences = config_differences(saved_config, config)
  refused = [f'{key}: {change}' for key, change in differences if _among(key, STEP_FIELDS)]
  if refused:
    raise CheckpointMismatchError(
        f'The checkpoint in {where} was written for a different model or different '
        'steps (model, data, batch size or seed) than this config describes:\n  ' +
        '\n  '.join(refused) +
        '\nUse the same values to resume, or a new --workdir to start a new run.')
  return [f'{key}: {change}' for key, change in differences]


def _normalize(value: Any) -> Any:
  """JSON turns tuples into lists; compare them as equal."""
  return list(value) if isinstance(value, tuple) else value
