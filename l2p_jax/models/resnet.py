"""CIFAR ResNets (V1 with option-A shortcuts, V2(18) with projections), randomizable.

The same network definition serves every method: Learn2Perturb's feature-noise
modules, PNI's weight noise and Adv-BNN's Bayesian weights are switched on by fields,
so a parameter tree has the same `params` whatever the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2p_jax.models.layers import BayesBatchNorm, Conv, Dense, FeatureNoise, WeightNoise

SHORTCUTS = ('A', 'projection')


def batch_norm(name: str, train: bool, noise: bool, weight_noise: WeightNoise, dtype: Any):
  """The BatchNorm layer `name` as a function of its input: Flax's, or with Bayesian
  scale and bias when `weight_noise` asks for it (Adv-BNN's code)."""
  settings = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)
  if weight_noise.kind == 'bayes' and weight_noise.bayes_batchnorm:
    layer = BayesBatchNorm(weight_noise=weight_noise, **settings)
    return lambda x: layer(x, noise)
  return nn.BatchNorm(**settings)


def shortcut_a(x: jax.Array, features: int, strides: int) -> jax.Array:
  """Option-A shortcut: stride subsampling and zero-padded extra channels (no parameters)."""
  x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else x


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers and a shortcut; L2P noise on the sum, before the final ReLU."""

  features: int
  strides: int
  shortcut: str
  weight_noise: WeightNoise
  feature_noise: bool
  feature_noise_init: float
  feature_noise_per_example: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, noise: bool) -> jax.Array:
    norm = lambda name: batch_norm(
      name,
      train,
      noise,
      self.weight_noise,  # noqa: E731
      self.dtype,
    )
    y = Conv(self.features, 3, self.strides, self.weight_noise, self.dtype, name='conv1')(x, noise)
    y = nn.relu(norm('bn1')(y))
    y = Conv(self.features, 3, 1, self.weight_noise, self.dtype, name='conv2')(y, noise)
    y = norm('bn2')(y)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == 'A':
        residual = shortcut_a(x, self.features, self.strides)
      else:
        residual = Conv(
          self.features, 1, self.strides, self.weight_noise, self.dtype, name='shortcut_conv'
        )(x, noise)
        residual = norm('shortcut_bn')(residual)
    y = y + residual.astype(y.dtype)
    if self.feature_noise:
      y = FeatureNoise(self.feature_noise_init, self.feature_noise_per_example, name='noise')(
        y, noise
      )
    return nn.relu(y)


class ResNet(nn.Module):
  """A CIFAR ResNet taking NHWC images in [0, 1]; per-channel normalization is inside.

  stage_sizes: blocks per stage; stage_features: channels per stage (the first
  stage has stride 1, later ones stride 2); stem_features: channels of the 3x3 stem.
  """

  stage_sizes: Sequence[int]
  stage_features: Sequence[int]
  stem_features: int
  num_classes: int
  shortcut: str = 'A'
  mean: Sequence[float] = (0.4914, 0.4822, 0.4465)
  std: Sequence[float] = (0.2470, 0.2435, 0.2616)
  weight_noise: WeightNoise = WeightNoise()
  feature_noise: bool = False
  feature_noise_init: float = 0.25
  feature_noise_per_example: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, noise: bool = True) -> jax.Array:
    """Logits for a batch; `train` selects batch statistics, `noise` the random draws."""
    if x.ndim != 4 or x.shape[-1] != len(self.mean):
      raise ValueError(
        f'Expected images of shape (batch, height, width, {len(self.mean)}) '
        f'matching the {len(self.mean)} normalization channels, got {x.shape}.'
      )
    x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    x = Conv(self.stem_features, 3, 1, self.weight_noise, self.dtype, name='stem_conv')(x, noise)
    x = batch_norm('stem_bn', train, noise, self.weight_noise, self.dtype)(x)
    if self.feature_noise:
      x = FeatureNoise(self.feature_noise_init, self.feature_noise_per_example, name='stem_noise')(
        x, noise
      )
    x = nn.relu(x)
    for stage, (blocks, features) in enumerate(zip(self.stage_sizes, self.stage_features)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(
          features,
          strides,
          self.shortcut,
          self.weight_noise,
          self.feature_noise,
          self.feature_noise_init,
          self.feature_noise_per_example,
          self.dtype,
          name=f'stage{stage + 1}_block{block + 1}',
        )(x, train, noise)
    x = jnp.mean(x, axis=(1, 2))
    logits = Dense(self.num_classes, self.weight_noise, self.dtype, name='classifier')(x, noise)
    return logits.astype(jnp.float32)
