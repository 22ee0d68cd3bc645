"""Prediction rules for randomized classifiers.

A randomized model gives a different answer per noise draw, so "its prediction" is a
rule: one draw ('single'), the majority of the draws' labels ('vote'), or the argmax of
the draws' mean softmax ('mean_softmax', Adv-BNN's rule). Draw j uses the noise key
fold_in(key, j).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2p_jax.attacks.core import LogitsFn

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
