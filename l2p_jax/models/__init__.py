"""Model construction by name: CIFAR ResNet-V1(6n+2) at any width, ResNet-V2(18).

`create_model` turns (architecture, width, method) into a Flax module; the method
decides which randomization the network carries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from l2p_jax.models.layers import (
  BAYES_MEAN_INITS,
  CONV_INPUT_GRADIENTS,
  KL_SCOPES,
  NOISE_RNG,
  PERTURB,
  PNI_MODES,
  FeatureNoise,
  FeatureNoiseSpec,
  WeightNoise,
  bayes_kl,
  gaussian_kl,
  project_perturb,
  resolve_input_gradient,
)
from l2p_jax.models.resnet import ResNet

METHODS = ('none', 'vanilla', 'pni', 'adv_bnn', 'l2p')
RANDOMIZED_METHODS = ('l2p', 'pni', 'adv_bnn')  # Their networks draw noise.
ARCHITECTURES_HELP = (
  "'resnet<6n+2>' (ResNet-V1: resnet20, resnet32, resnet44, "
  "resnet56, ...) or 'resnet18' (ResNet-V2(18))"
)

__all__ = [
  'METHODS',
  'RANDOMIZED_METHODS',
  'inference_logits',
  'BAYES_MEAN_INITS',
  'KL_SCOPES',
  'PNI_MODES',
  'ResNet',
  'WeightNoise',
  'FeatureNoise',
  'FeatureNoiseSpec',
  'CONV_INPUT_GRADIENTS',
  'resolve_input_gradient',
  'create_model',
  'bayes_kl',
  'gaussian_kl',
  'project_perturb',
  'PERTURB',
  'NOISE_RNG',
  'resnet_layout',
]


def resnet_layout(arch: str, width: float = 1.0) -> dict[str, Any]:
  """Stage sizes, channel counts and shortcut type of a named CIFAR ResNet."""
  match = re.fullmatch(r'resnet(\d+)', arch)
  if width <= 0:
    raise ValueError(f'Width multiplier must be positive, got {width}.')

  def widen(channels: int) -> int:
    if int(round(channels * width)) < 1:
      raise ValueError(
        f'Width multiplier {width} leaves a {arch} layer of {channels} '
        f'channels with none; use a width of at least {1 / channels:g}.'
      )
    return int(round(channels * width))

  if arch == 'resnet18':
    return dict(
      stage_sizes=(2, 2, 2, 2),
      stage_features=tuple(widen(c) for c in (64, 128, 256, 512)),
      stem_features=widen(64),
      shortcut='projection',
    )
  if match and (int(match.group(1)) - 2) % 6 == 0 and int(match.group(1)) > 2:
    blocks = (int(match.group(1)) - 2) // 6
    return dict(
      stage_sizes=(blocks,) * 3,
      stage_features=tuple(widen(c) for c in (16, 32, 64)),
      stem_features=widen(16),
      shortcut='A',
    )
  raise ValueError(f'Unknown architecture {arch!r}; expected {ARCHITECTURES_HELP}.')


def create_model(
  arch: str,
  num_classes: int,
  method: str = 'none',
  *,
  width: float = 1.0,
  mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
  std: Sequence[float] = (0.2470, 0.2435, 0.2616),
  l2p_init: float = 0.25,
  l2p_per_example: bool = False,
  pni_mode: str = 'layer',
  pni_init: float = 0.25,
  bnn_init_sigma: float = 0.1,
  bnn_mean_init: str = 'kaiming_normal',
  bnn_batchnorm: bool = False,
  conv_input_gradient: str = 'auto',
  dtype: Any = jnp.float32,
) -> ResNet:
  """The network for `method`: plain for none/vanilla, feature noise for l2p,
  weight noise for pni, Bayesian weights (and optionally BatchNorm) for adv_bnn."""
  resolve_input_gradient(conv_input_gradient)  # An unknown option fails here, not in a trace.
  if method not in METHODS:
    raise ValueError(f'Unknown method {method!r}; expected one of {METHODS}.')
  if len(mean) != len(std):
    raise ValueError(
      f'Normalization mean {tuple(mean)} and std {tuple(std)} '
      'must have one value per input channel each.'
    )
  kind = {'pni': 'pni', 'adv_bnn': 'bayes'}.get(method, 'none')
  return ResNet(
    **resnet_layout(arch, width),
    num_classes=num_classes,
    mean=tuple(mean),
    std=tuple(std),
    weight_noise=WeightNoise(
      kind=kind,
      pni_mode=pni_mode,
      pni_init=pni_init,
      bayes_init_sigma=bnn_init_sigma,
      bayes_mean_init=bnn_mean_init,
      bayes_batchnorm=bnn_batchnorm,
    ),
    feature_noise=FeatureNoiseSpec(
      enabled=method == 'l2p', init_scale=l2p_init, per_example=l2p_per_example
    ),
    conv_input_gradient=conv_input_gradient,
    dtype=dtype,
  )


def inference_logits(
  model: ResNet, variables: dict[str, Any], noise: bool
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The model in inference mode (BatchNorm's running statistics) as a function of
  (inputs, noise key), the form the attacks and prediction rules take."""
  return lambda x, key: model.apply(variables, x, train=False, noise=noise, rngs={'noise': key})
