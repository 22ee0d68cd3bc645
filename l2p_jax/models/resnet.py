"""CIFAR ResNets (V1 with option-A shortcuts, V2(18) with projections), randomizable.

The same network definition serves every method: Learn2Perturb's feature-noise
modules, PNI's weight noise and Adv-BNN's Bayesian weights are switched on by specs,
so a parameter tree has the same `params` whatever the method. As in Flax's ImageNet
ResNet, the blocks get their layers as partials (conv, norm, noise injection).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2p_jax.models.layers import (
  BayesBatchNorm,
  Conv,
  Dense,
  FeatureNoise,
  FeatureNoiseSpec,
  WeightNoise,
)

ModuleDef = Any


def batch_norm_def(weight_noise: WeightNoise, train: bool, noise: bool, dtype: Any) -> ModuleDef:
  """The network's BatchNorm as a partial taking `name`: Flax's, or with Bayesian scale
  and bias when `weight_noise` asks for it (Adv-BNN's code)."""
  settings = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
  if weight_noise.kind == 'adv_bnn' and weight_noise.bnn_batchnorm:
    return functools.partial(BayesBatchNorm, weight_noise=weight_noise, noise=noise, **settings)
  return functools.partial(nn.BatchNorm, **settings)


def shortcut_a(x: jax.Array, features: int, strides: int) -> jax.Array:
  """Option-A shortcut: stride subsampling and zero-padded extra channels (no parameters)."""
  x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else x


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers and a shortcut; L2P noise on the sum, before the final ReLU.

  conv: a partial of `Conv` (features, kernel size, strides); norm: of a BatchNorm;
  inject: of `FeatureNoise`, or None for a network without feature noise.
  """

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  inject: ModuleDef | None = None
  shortcut: str = 'A'

  @nn.compact
  def __call__(self, x: jax.Array, noise: bool) -> jax.Array:
    y = self.conv(self.features, 3, self.strides, name='conv1')(x, noise)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, 3, 1, name='conv2')(y, noise)
    y = self.norm(name='bn2')(y)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == 'A':
        residual = shortcut_a(x, self.features, self.strides)
      else:
        residual = self.conv(self.features, 1, self.strides, name='shortcut_conv')(x, noise)
        residual = self.norm(name='shortcut_bn')(residual)
    y = y + residual.astype(y.dtype)
    if self.inject is not None:
      y = self.inject(name='noise')(y, noise)
    return nn.relu(y)


class ResNet(nn.Module):
  """A CIFAR ResNet taking NHWC images in [0, 1]; per-channel normalization is inside.

  stage_sizes: blocks per stage; stage_features: channels per stage (the first
  stage has stride 1, later ones stride 2); stem_features: channels of the 3x3 stem.
  mean/std: the per-channel input normalization (the dataset's, from the caller).
  conv_input_gradient: how convolutions are differentiated (see `layers.Conv`).
  """

  stage_sizes: Sequence[int]
  stage_features: Sequence[int]
  stem_features: int
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  shortcut: str = 'A'
  weight_noise: WeightNoise = WeightNoise()
  feature_noise: FeatureNoiseSpec = FeatureNoiseSpec()
  conv_input_gradient: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, noise: bool = True) -> jax.Array:
    """Logits for a batch; `train` selects batch statistics, `noise` the random draws."""
    if x.ndim != 4 or x.shape[-1] != len(self.mean):
      raise ValueError(
        f'Expected images of shape (batch, height, width, {len(self.mean)}) '
        f'matching the {len(self.mean)} normalization channels, got {x.shape}.'
      )
    conv = functools.partial(
      Conv,
      weight_noise=self.weight_noise,
      input_gradient=self.conv_input_gradient,
      dtype=self.dtype,
    )
    norm = batch_norm_def(self.weight_noise, train, noise, self.dtype)
    inject = None
    if self.feature_noise.enabled:
      inject = functools.partial(
        FeatureNoise,
        init_scale=self.feature_noise.init_scale,
        per_example=self.feature_noise.per_example,
      )
    x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    # The image's normalization is cheap for XLA to recompute in the kernel gradient; read
    # from a buffer, it rounded differently with the batch gathered on the device than
    # given by the host (tests/test_train.py::test_killed_run_resumes_bit_identical).
    x = conv(self.stem_features, 3, 1, materialized_input=False, name='stem_conv')(x, noise)
    x = norm(name='stem_bn')(x)
    if inject is not None:
      x = inject(name='stem_noise')(x, noise)
    x = nn.relu(x)
    for stage, (blocks, features) in enumerate(zip(self.stage_sizes, self.stage_features)):
      for block in range(blocks):
        x = BasicBlock(
          features=features,
          strides=2 if stage > 0 and block == 0 else 1,
          conv=conv,
          norm=norm,
          inject=inject,
          shortcut=self.shortcut,
          name=f'stage{stage + 1}_block{block + 1}',
        )(x, noise)
    x = jnp.mean(x, axis=(1, 2))
    logits = Dense(self.num_classes, self.weight_noise, self.dtype, name='classifier')(x, noise)
    return logits.astype(jnp.float32)
