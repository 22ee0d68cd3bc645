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

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from l2p_jax.errors import UserError
from l2p_jax.runtime import orbax_logging, sharding


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint was written for a different model or steps than the config describes."""


class CheckpointUnreadableError(UserError, RuntimeError):
  """No checkpoint of a folder can be read."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A path names no checkpoint: no step folder, checkpoints folder or workdir with one."""


# The errors of finding and restoring a checkpoint, each one message for the user.
RESTORE_ERRORS = (CheckpointMismatchError, CheckpointUnreadableError, CheckpointNotFoundError)


class Checkpoints:
  """The checkpoints in `directory` (created if missing), the latest `keep` kept."""

  def __init__(self, directory: str, keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only
      ),
      item_handlers={'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def reload(self) -> None:
    """Rereads the list of checkpoints from disk."""
    self.manager.reload()

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts writing checkpoint `step` (asynchronously; `wait` blocks until done)."""
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )

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
        self.manager.item_metadata(step)['state'],
      )
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
    return restored.state, restored.meta

  def meta(self, step: int) -> dict[str, Any]:
    """The metadata of checkpoint `step` without reading its arrays."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def steps(self) -> list[int]:
    """Every checkpoint's step, oldest first."""
    return sorted(self.manager.all_steps())

  def restore_newest_readable(
    self,
    abstract_state: Any = None,
    check: Callable[[dict[str, Any], str], None] | None = None,
    steps: Sequence[int] | None = None,
  ) -> tuple[int, Any, dict, list[int]]:
    """The newest of `steps` (default: all) that restores, as (step, state, meta,
    the newer steps skipped as unreadable); each skipped one is logged as a warning.

    `check(meta, path)` may refuse a checkpoint by raising; that error propagates.
    Raises CheckpointUnreadableError when none can be read.
    """
    skipped, reasons = [], []

    def skip(step: int, error: Exception) -> None:
      reasons.append(_reason(error))
      logging.warning(
        'Checkpoint %s is unreadable (%s); trying an older one.', self.path(step), reasons[-1]
      )
      skipped.append(step)

    # orbax and tensorstore raise many types for a damaged file (ValueError, OSError,
    # JSON errors, ...): whatever they are, the checkpoint does not read. Their own
    # logging of the attempt (tracebacks per array) is silenced: skip() says it once.
    for step in sorted(self.steps() if steps is None else steps, reverse=True):
      try:
        with orbax_logging.silenced():
          meta = self.meta(step)
      except Exception as error:  # pylint: disable=broad-except
        skip(step, error)
        continue
      if check is not None:
        check(meta, self.path(step))
      try:
        with orbax_logging.silenced():
          state, meta = self.restore(step, abstract_state)
      except Exception as error:  # pylint: disable=broad-except
        skip(step, error)
        continue
      return step, state, meta, skipped
    raise CheckpointUnreadableError(
      f'No readable checkpoint in {self.directory}'
      + (f': {", ".join(map(str, skipped))} unreadable ({reasons[-1]})' if skipped else '')
      + '. Name another checkpoint, or move the damaged step folders away.'
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  @contextlib.contextmanager
  def closing(self) -> Iterator[Checkpoints]:
    """Closes the manager when the block ends, however it ends."""
    try:
      yield self
    finally:
      self.close()


def _reason(error: Exception) -> str:
  """Why a checkpoint did not read, in a few words: the error's type and the start of
  its first line (TensorStore's go on with a spec of thousands of characters)."""
  text = (str(error).splitlines() or [''])[0]
  for cut in (' [tensorstore_spec', '. See full TensorStore details'):
    text = text.split(cut)[0]
  return f'{type(error).__name__}: {text[:200]}'


def newest_readable(directory: str) -> str | None:
  """The folder of the newest checkpoint in `directory` that restores; None when there
  is none (or no such folder)."""
  if not os.path.isdir(directory):
    return None
  manager = Checkpoints(directory, read_only=True)
  try:
    return manager.path(manager.restore_newest_readable()[0])
  except CheckpointUnreadableError:
    return None
  finally:
    manager.close()


def checkpoint_meta(
  config: ml_collections.ConfigDict,
  num_classes: int,
  mean: Sequence[float],
  std: Sequence[float],
  image_shape: Sequence[int],
  **extra: Any,
) -> dict[str, Any]:
  """A checkpoint's metadata: what rebuilds its model (the config, the classes, the
  input normalization and shape) and `extra` notes (the devices, where it came from)."""
  return {
    'config': config.to_dict(),
    'num_classes': num_classes,
    'mean': mean,
    'std': std,
    'image_shape': list(image_shape),
    **extra,
  }
