"""Whole-file conversions between PyTorch checkpoints and this project's workdirs.

`torch_to_workdir` writes an imported PyTorch checkpoint as the orbax checkpoint a
training run would leave (state + the metadata that rebuilds the model), so eval.py
can attack it; `workdir_to_torch` writes a trained workdir's variables as a PyTorch
checkpoint in one of the authors' layouts, so PyTorch tools can attack ours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from l2p_jax import checkpointing, data, experiment
from l2p_jax.interop.torch_checkpoints import (
  import_torch_checkpoint,
  read_torch_normalization,
  save_torch_checkpoint,
)
from l2p_jax.runtime import files


def _pni_mode(variables: dict[str, Any]) -> str | None:
  """The PNI mode of imported variables, read from the classifier's alpha shape; None
  for a network without PNI alphas."""
  alpha = variables.get('perturb', {}).get('classifier', {}).get('kernel_alpha')
  if alpha is None:
    return None
  return {0: 'layer', 1: 'channel'}.get(alpha.ndim, 'element')


def _image_shape(
  variables: dict[str, Any], dataset: str, channels: int, image_shape: Sequence[int] | None
) -> list[int]:
  """Input shape of the imported model: `image_shape` when given, else the height and
  width of L2P's stem noise map, else the dataset's (data.LOCAL_FORMATS)."""
  if image_shape:
    return [int(v) for v in image_shape]
  theta = variables.get('perturb', {}).get('stem_noise', {}).get('theta')
  if theta is not None:
    return [int(theta.shape[0]), int(theta.shape[1]), channels]
  if dataset in data.LOCAL_FORMATS:
    return list(data.LOCAL_FORMATS[dataset].image_shape)
  raise ValueError(
    f'The image shape of {dataset!r} is not known here; pass '
    '--image_shape=HEIGHT,WIDTH,CHANNELS (e.g. 32,32,3).'
  )


def torch_to_workdir(
  source: Any,
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  layout: str = 'auto',
  num_classes: int | None = None,
  image_shape: Sequence[int] | None = None,
) -> str:
  """Imports `source` for `config`'s method/architecture into workdir/checkpoints/0.

  The normalization is the checkpoint's own Normalize layer when it has one, else the
  config's (`data.normalization`); the classes and input shape are `num_classes` and
  `image_shape`, or known from the dataset. Returns the checkpoint path.
  """
  dataset = config.data.dataset
  known = data.LOCAL_FORMATS.get(dataset)
  num_classes = num_classes or (known and known.num_classes)
  if not num_classes:
    raise ValueError(f'The number of classes of {dataset!r} is not known here; pass --num_classes.')
  normalization = read_torch_normalization(source)
  if normalization is None:
    normalization = experiment.known_normalization(config)
    if normalization is None:
      raise ValueError(
        f'The checkpoint has no Normalize layer and {dataset!r} has no '
        'known statistics; set --config.data.normalization.'
      )
  mean, std = (list(map(float, v)) for v in normalization)
  variables = import_torch_checkpoint(
    source,
    arch=config.model.arch,
    num_classes=num_classes,
    method=config.method,
    width=config.model.width,
    layout=layout,
    mean=mean,
    std=std,
  )
  config.model.pni_mode = _pni_mode(variables) or config.model.pni_mode
  state = {
    'step': jnp.zeros((), jnp.int32),
    'params': variables['params'],
    'perturb': variables.get('perturb', {}),
    'batch_stats': variables['batch_stats'],
  }
  meta = checkpointing.checkpoint_meta(
    config,
    num_classes,
    mean,
    std,
    _image_shape(variables, dataset, len(mean), image_shape),
    imported_from=str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__,
  )
  manager = checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'))
  if manager.latest_step() is not None:
    raise FileExistsError(
      f'{manager.directory} already holds checkpoints; convert into an empty --workdir.'
    )
  manager.save(0, jax.device_put(state), meta)
  manager.wait()
  manager.close()
  files.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  return manager.path(0)


def workdir_to_torch(
  workdir: str, path: str, layout: str, step: int | None = None, overwrite: bool = False
) -> str:
  """Writes the variables of workdir's checkpoint `step` (default: latest) to `path`
  as a PyTorch checkpoint in `layout`, with the model's Normalize layer in front.

  Refuses an existing `path` unless `overwrite`; creates a missing parent folder.
  """
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass --overwrite to replace it, or name another file.')
  manager = checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
      f'No checkpoint in {manager.directory}; train one with train.py --workdir {workdir}.'
    )
  state, meta = manager.restore(step)
  manager.close()
  variables = {
    name: jax.device_get(state[name])
    for name in ('params', 'perturb', 'batch_stats')
    if state.get(name)
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_torch_checkpoint(path, variables, layout, mean=meta['mean'], std=meta['std'])
  return path
