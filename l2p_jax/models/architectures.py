"""Named CIFAR ResNets: an architecture name and width as a plain ResNet's settings, and a
model in inference mode as the function of (inputs, noise key) that attacks take."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from l2p_jax.models.layers import DRAWS, resolve_input_gradient
from l2p_jax.models.resnet import ResNet

ARCHITECTURES_HELP = (
  "'resnet<6n+2>' (ResNet-V1: resnet20, resnet32, resnet44, "
  "resnet56, ...) or 'resnet18' (ResNet-V2(18))"
)


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


def resnet_settings(
  arch: str,
  num_classes: int,
  *,
  width: float,
  mean: Sequence[float],
  std: Sequence[float],
  conv_input_gradient: str,
  dtype: Any,
) -> dict[str, Any]:
  """The keyword arguments of the plain `ResNet` of a named architecture, checked; a
  method's network (`methods.Method.network`) builds on them."""
  resolve_input_gradient(conv_input_gradient)  # An unknown option fails here, not in a trace.
  if len(mean) != len(std):
    raise ValueError(
      f'Normalization mean {tuple(mean)} and std {tuple(std)} '
      'must have one value per input channel each.'
    )
  return dict(
    **resnet_layout(arch, width),
    num_classes=num_classes,
    mean=tuple(mean),
    std=tuple(std),
    conv_input_gradient=conv_input_gradient,
    dtype=dtype,
  )


def inference_logits(
  model: ResNet, variables: dict[str, Any], noise: bool
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The model in inference mode (BatchNorm's running statistics) as a function of
  (inputs, noise key), the form the attacks and prediction rules take."""
  return lambda x, key: model.apply(variables, x, train=False, noise=noise, rngs={'noise': key})


def model_apply(model: ResNet, variables: dict[str, Any], train: bool, noise: bool):
  """The model as apply(inputs, noise key, draws=None, record=False) -> (logits,
  updates), the form `draw_noise` and `noise_drawn_ahead` take: in training mode (batch
  statistics, their update returned) or inference mode; `draws` replays noise drawn
  ahead, `record` returns the draws among the updates."""

  def apply(inputs, noise_key, draws=None, record=False):
    both = variables if draws is None else {**variables, DRAWS: draws}
    mutable = ['batch_stats'] * train + [DRAWS] * record
    return model.apply(
      both, inputs, train=train, noise=noise, rngs={'noise': noise_key}, mutable=mutable
    )

  return apply


def draw_noise(apply: Callable[..., Any], like: jax.Array, keys: jax.Array) -> Any:
  """The draws `apply(inputs, key, draws, record) -> (logits, updates)` makes under each
  of `keys` (inputs shaped like `like`), stacked over the keys: one vectorized draw per
  noise variable for all keys, where drawing at each call would run many tiny ops on
  XLA:CPU. The bits are each key's own draw's: threefry hashes each key separately.
  Noise a model draws without recording it (not through `layers.draw_normal`, as a
  user's model may) is not among them: it is drawn at each call, as before."""
  return jax.vmap(lambda key: apply(like, key, None, True)[1].get(DRAWS, {}))(keys)


def noise_drawn_ahead(
  apply: Callable[..., Any], drawn: Any, keys: jax.Array
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`apply` as a logits function of (inputs, noise key) that replays `drawn`
  (`draw_noise`'s draws for `keys`) instead of drawing: for an attack's loop.

  The logits may differ from a draw at the call in their last bits only, where XLA
  fuses the noise differently. A call with a key not among `keys` gives NaN logits and
  gradients, loudly wrong.
  """
  known = jax.random.key_data(keys)

  def logits_fn(inputs: jax.Array, key: jax.Array) -> jax.Array:
    hits = jnp.all(known == jax.random.key_data(key), axis=-1)
    draws = jax.tree.map(lambda maps: maps[jnp.argmax(hits)], drawn)
    logits = apply(inputs, key, draws, False)[0]
    return logits * jnp.where(jnp.any(hits), 1.0, jnp.nan)  # NaN gradients too.

  return logits_fn
