"""A model restored from its checkpoint alone, for evaluation and interop: finding the
checkpoint a path names, rebuilding the network its metadata describes, and refusing
variables that do not fit it."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from l2p_jax import experiment, methods
from l2p_jax.checkpointing.manager import (
  CheckpointMismatchError,
  CheckpointNotFoundError,
  Checkpoints,
)


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
  config = ml_collections.ConfigDict(meta['config'])
  model = experiment.build_model(
    config, methods.get(config.method), meta['num_classes'], meta['mean'], meta['std']
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
