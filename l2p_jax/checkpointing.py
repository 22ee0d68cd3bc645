"""Orbax checkpoints of a training run: the full train state plus the run's metadata.

Every checkpoint holds `state` (step, variables, optimizer state, epoch accumulators)
and `meta` (the resolved config, the number of classes and the input normalization),
so an evaluation can rebuild the model from the checkpoint alone, and a resumed run
can be refused when its config would build a different model. Orbax writes each
checkpoint to a temporary folder and renames it when complete: a crash mid-save
leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
from typing import Any

from flax import traverse_util
import jax
import ml_collections
import orbax.checkpoint as ocp

from l2p_jax import sharding

# Config fields that decide the shapes and meaning of the saved variables.
STRUCTURE_FIELDS = ('method', 'model', 'data.dataset')


class CheckpointMismatchError(ValueError):
  """A checkpoint was written for a different model than the config describes."""


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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def structure_differences(saved_config: dict[str, Any],
                          config: ml_collections.ConfigDict) -> list[str]:
  """The STRUCTURE_FIELDS on which a saved config and `config` disagree, as
  'field: saved -> current' lines."""
  saved = traverse_util.flatten_dict(saved_config, sep='.')
  current = traverse_util.flatten_dict(config.to_dict(), sep='.')
  lines = []
  for key in sorted(set(saved) | set(current)):
    if any(key == f or key.startswith(f + '.') for f in STRUCTURE_FIELDS):
      old, new = saved.get(key, '<absent>'), current.get(key, '<absent>')
      if _normalize(old) != _normalize(new):
        lines.append(f'{key}: checkpoint has {old!r}, config has {new!r}')
  return lines


def check_compatible(saved_config: dict[str, Any],
                     config: ml_collections.ConfigDict, where: str) -> None:
  """Raises CheckpointMismatchError naming every structural difference."""
  differences = structure_differences(saved_config, config)
  if differences:
    raise CheckpointMismatchError(
        f'The checkpoint in {where} was written for a different model than this '
        'config describes:\n  ' + '\n  '.join(differences) +
        '\nUse the same config, or a new --workdir to start a new run.')


def _normalize(value: Any) -> Any:
  """JSON turns tuples into lists; compare them as equal."""
  return list(value) if isinstance(value, tuple) else value
