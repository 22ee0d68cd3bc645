"""Prediction rules for randomized classifiers, accuracy, and transfer-attack matrices.

A randomized model gives a different answer per noise draw, so "its prediction" is a
rule: one draw ('single'), the majority of the draws' labels ('vote'), or the argmax of
the draws' mean softmax ('mean_softmax', Adv-BNN's rule). Draw j uses the noise key
fold_in(key, j).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
RULES = ('single', 'vote', 'mean_softmax')


def _check_rule(rule: str) -> None:
  if rule not in RULES:
    raise ValueError(f'Unknown prediction rule {rule!r}; expected one of {RULES}.')


def combine_draws(logits: jax.Array, rule: str) -> jax.Array:
  """Labels (N,) from logits (draws, N, C) of several noise draws under `rule`;
  'single' takes the first draw, 'vote' breaks ties toward the lower class index."""
  _check_rule(rule)
  if rule == 'single':
    return jnp.argmax(logits[0], axis=-1)
  if rule == 'vote':
    votes = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1]).sum(axis=0)
    return jnp.argmax(votes, axis=-1)
  return jnp.argmax(jax.nn.softmax(logits, axis=-1).mean(axis=0), axis=-1)


def predict(
  logits_fn: LogitsFn, key: jax.Array, x: jax.Array, *, draws: int = 1, rule: str = 'single'
) -> jax.Array:
  """Predicted labels (N,) of a possibly randomized model under `rule` over `draws`
  noise draws, run one draw at a time ('single' runs only the first)."""
  _check_rule(rule)
  if draws < 1:
    raise ValueError(f'draws must be at least 1, got {draws}.')
  draws = 1 if rule == 'single' else draws
  logits = jax.lax.map(lambda j: logits_fn(x, jax.random.fold_in(key, j)), jnp.arange(draws))
  return combine_draws(logits, rule)


def accuracy(predictions: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Fraction of correct predictions among the examples where `mask` is true (all if
  None), so that padded batches do not count; weight it by mask.sum() to aggregate."""
  correct = predictions == labels
  if mask is None:
    return correct.mean()
  mask = mask.astype(bool)
  return jnp.sum(correct & mask) / jnp.maximum(jnp.sum(mask), 1)


def transfer_matrix(
  adversarial: Mapping[str, jax.Array],
  labels: jax.Array,
  targets: Mapping[str, LogitsFn],
  key: jax.Array,
  *,
  draws: int = 1,
  rule: str = 'single',
  mask: jax.Array | None = None,
) -> dict[str, dict[str, jax.Array]]:
  """Accuracy of every target model on every source's adversarial examples,
  matrix[source][target]; every cell uses the same noise key, so a model's diagonal cell
  equals its white-box accuracy computed with that key."""
  return {
    source: {
      target: accuracy(predict(fn, key, x_adv, draws=draws, rule=rule), labels, mask)
      for target, fn in targets.items()
    }
    for source, x_adv in adversarial.items()
  }
