"""Training objectives of the five methods: the clean/adversarial mix, L2P's harmonic
regularizer, and Adv-BNN's KL term, as functions of logits and variables."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from l2p_jax.attacks import core as attack_core


def mean_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch."""
  return attack_core.cross_entropy(logits, labels).mean()


def mixed_loss(
  clean_logits: jax.Array,
  adv_logits: jax.Array | None,
  labels: jax.Array,
  clean_weight: float,
  adv_weight: float,
) -> jax.Array:
  """alpha * CE(clean) + beta * CE(adversarial) (supplementary eq. 3); plain CE on the
  clean batch when there are no adversarial logits (before adversarial training starts)."""
  if adv_logits is None:
    return mean_cross_entropy(clean_logits, labels)
  return clean_weight * mean_cross_entropy(clean_logits, labels) + adv_weight * mean_cross_entropy(
    adv_logits, labels
  )


def harmonic_tau(epoch: int, noise_start_epoch: int) -> float:
  """tau(t) = sum_{i=1}^{t-s+1} 1/i: the harmonic number of noise epochs so far.

  The supplementary's eq. 1 as printed divides by zero at its first term and the
  authors' code in the first noise epoch; the count starts at 1 here (tau(s) = 1).
  """
  if epoch < noise_start_epoch:
    raise ValueError(
      f'tau is undefined before noise starts: epoch {epoch} < '
      f'noise_start_epoch {noise_start_epoch}.'
    )
  return sum(1.0 / i for i in range(1, epoch - noise_start_epoch + 2))


def l2p_regularizer(perturb: Any) -> jax.Array:
  """sum over every L2P noise map of sum(sqrt(theta)); the loss adds -gamma/tau times it,
  which rewards larger noise with a weight that fades as training goes on."""
  flat = traverse_util.flatten_dict(perturb or {})
  return sum(
    (jnp.sum(jnp.sqrt(v)) for k, v in flat.items() if k[-1] == 'theta'), jnp.zeros((), jnp.float32)
  )


def noise_statistics(perturb: Any) -> dict[str, dict[str, float]]:
  """Per-layer mean/min/max of each noise scale (L2P theta, PNI alpha, Bayesian sigma),
  the numbers behind the supplementary's Figure 1."""
  stats = {}
  for path, value in traverse_util.flatten_dict(perturb or {}).items():
    name = path[-1]
    if name.endswith('_log_sigma'):
      value, name = jnp.exp(value), name[: -len('_log_sigma')] + '_sigma'
    value = jax.device_get(value)
    stats['/'.join(path[:-1] + (name,))] = {
      'mean': float(value.mean()),
      'min': float(value.min()),
      'max': float(value.max()),
    }
  return stats
