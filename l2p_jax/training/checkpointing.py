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
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from l2p_jax import experiment, methods
from l2p_jax.errors import UserError
from l2p_jax.runtime import orbax_logging, sharding

# Config fields that decide the shapes and meaning of the saved variables.
STRUCTURE_FIELDS = ('method', 'model', 'data.dataset')
# Config fields that decide what a step of training is (its model, its batches, its
# random numbers): resuming a checkpoint with other values is refused.
STEP_FIELDS = STRUCTURE_FIELDS + (
  'seed',
  'batch_size',
  'data.train_split',
  'data.train_examples',
  'data.normalization',
  'optim.optimizer',
)  # SGD and Adam states differ.


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


def config_differences(
  saved_config: dict[str, Any], config: ml_collections.ConfigDict
) -> list[tuple[str, str]]:
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


def check_compatible(
  saved_config: dict[str, Any], config: ml_collections.ConfigDict, where: str
) -> list[str]:
  """Raises CheckpointMismatchError naming every STEP_FIELDS difference; returns the
  other differences (and fields the saved config does not have) as
  'field: checkpoint has X, config has Y' lines."""
  differences = config_differences(saved_config, config)
  # A field the checkpoint's config lacks is newer than the checkpoint; its default
  # keeps the behaviour the run had, so it is reported, not refused.
  saved = traverse_util.flatten_dict(saved_config, sep='.')
  refused = [
    f'{key}: {change}' for key, change in differences if _among(key, STEP_FIELDS) and key in saved
  ]
  if refused:
    raise CheckpointMismatchError(
      f'The checkpoint in {where} was written for a different model or different '
      'steps (model, data, batch size or seed) than this config describes:\n  '
      + '\n  '.join(refused)
      + '\nUse the same values to resume, or a new --workdir to start a new run.'
    )
  return [f'{key}: {change}' for key, change in differences]


def _normalize(value: Any) -> Any:
  """JSON turns tuples into lists; compare them as equal."""
  return list(value) if isinstance(value, tuple) else value


# --- restoring a model from its checkpoint alone ----------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
  """A restored checkpoint: the model its metadata describes and its variables."""

  path: str  # The step folder.
  step: int
  model: nn.Module
  variables: dict[str, Any]  # params, perturb, batch_stats.
  meta: dict[str, Any]  # config (the training config), num_classes, mean, std, ...

  @property
  def workdir(self) -> str:
    """The training run's folder (the parent of checkpoints/)."""
    return os.path.dirname(os.path.dirname(self.path))

  @property
  def randomized(self) -> bool:
    """The checkpoint's network draws noise (its method's registry record says so)."""
    return methods.get(self.meta['config']['method']).randomized

  def describe(self) -> dict[str, Any]:
    """Where the checkpoint is and which model it holds, JSON-ready."""
    c = self.meta['config']
    return {
      'checkpoint': self.path,
      'step': self.step,
      'workdir': self.workdir,
      'method': c['method'],
      'arch': c['model']['arch'],
      'width': c['model']['width'],
    }


def is_step_folder(path: str) -> bool:
  """Whether `path` is one checkpoint's folder (not a checkpoints/ folder or workdir)."""
  path = os.path.abspath(os.path.expanduser(path))
  return all(os.path.isdir(os.path.join(path, item)) for item in ('state', 'meta'))


def find_checkpoint(path: str) -> tuple[str, int]:
  """The checkpoints folder and step that `path` names: a step folder, or the latest
  step of a checkpoints folder or of a training workdir."""
  path = os.path.abspath(os.path.expanduser(path))
  if is_step_folder(path):
    return os.path.dirname(path), int(os.path.basename(path))
  inner = os.path.join(path, 'checkpoints')
  directory = inner if os.path.isdir(inner) else path
  step = None
  if os.path.isdir(directory):
    manager = Checkpoints(directory, read_only=True)
    step = manager.latest_step()
    manager.close()
  if step is None:
    raise CheckpointNotFoundError(
      f'No checkpoint found in {directory}. Train one with `python train.py --config '
      f'configs/cifar.py:METHOD,ARCH,DATASET --workdir {path}`, or name an existing '
      'one with --checkpoint (a checkpoints/ folder or one of its step folders).'
    )
  return directory, step


def check_expected_model(
  meta: dict[str, Any], where: str, *, arch: str | None = None, width: float | None = None
) -> None:
  """Raises CheckpointMismatchError when the checkpoint's architecture or width is not the one
  asked for (None asks for nothing)."""
  saved = meta['config']['model']
  for field, asked in (('arch', arch), ('width', width)):
    if asked is not None and asked != saved[field]:
      raise CheckpointMismatchError(
        f'The checkpoint {where} holds a {meta["config"]["method"]} {saved["arch"]} of '
        f'width {saved["width"]}, but --config.model.{field}={asked} was asked for. '
        'Drop that flag to evaluate the model the checkpoint holds, or name a '
        f'checkpoint of that {field}.'
      )


def check_variables_fit(
  model: nn.Module, variables: dict[str, Any], image_shape: Sequence[int], where: str
) -> None:
  """Raises CheckpointMismatchError naming every variable that is missing, unexpected or of
  another shape than `model` has for inputs of `image_shape`."""
  key = jax.random.key(0)
  expected = jax.eval_shape(
    lambda: model.init({'params': key, 'noise': key}, jnp.zeros((1, *image_shape), jnp.float32))
  )
  flat = lambda tree: {
    '/'.join(k): tuple(v.shape)
    for k, v in traverse_util.flatten_dict(dict(tree)).items()  # noqa: E731
  }
  want = flat({c: expected.get(c, {}) for c in ('params', 'perturb', 'batch_stats')})
  have = flat(variables)
  problems = (
    [f'{k}: missing from the checkpoint' for k in sorted(set(want) - set(have))]
    + [f'{k}: not in the model' for k in sorted(set(have) - set(want))]
    + [
      f'{k}: checkpoint {have[k]}, model {want[k]}'
      for k in sorted(set(want) & set(have))
      if want[k] != have[k]
    ]
  )
  if problems:
    raise CheckpointMismatchError(
      f'The variables in {where} do not fit the model its metadata describes '
      f'({model.num_classes} classes, stages {tuple(model.stage_sizes)}, channels '
      f'{tuple(model.stage_features)}):\n  '
      + '\n  '.join(problems[:20])
      + (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else '')
    )


def restore_checkpoint(
  directory: str,
  step: int,
  *,
  arch: str | None = None,
  width: float | None = None,
  fallback: bool = False,
) -> Checkpoint:
  """Checkpoint `step` of `directory` with its model rebuilt from the saved metadata,
  refused if it is not the architecture/width asked for or its variables do not fit.

  With `fallback`, an unreadable `step` gives way to the newest older one that reads,
  with a warning naming the unreadable one.
  """
  manager = Checkpoints(directory, read_only=True)
  steps = [s for s in manager.steps() if s <= step] if fallback else [step]
  try:
    step, state, meta, _ = manager.restore_newest_readable(
      check=functools.partial(check_expected_model, arch=arch, width=width), steps=steps
    )
  finally:
    manager.close()
  where = manager.path(step)
  model = experiment.build_model(
    ml_collections.ConfigDict(meta['config']), meta['num_classes'], meta['mean'], meta['std']
  )
  variables = {c: state[c] for c in ('params', 'perturb', 'batch_stats')}
  check_variables_fit(model, variables, meta['image_shape'], where)
  return Checkpoint(where, step, model, variables, meta)


def load_checkpoint(
  path: str, *, arch: str | None = None, width: float | None = None
) -> Checkpoint:
  """The checkpoint `path` names (see find_checkpoint), ready to evaluate: for a
  checkpoints folder or workdir, the newest that reads."""
  return restore_checkpoint(
    *find_checkpoint(path), arch=arch, width=width, fallback=not is_step_folder(path)
  )
