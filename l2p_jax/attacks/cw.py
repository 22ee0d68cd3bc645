"""Carlini & Wagner's L2 attack (S&P 2017), untargeted, with PNI's settings as defaults.

Minimises ||x' - x||^2 + c * max(z_y - max_{j!=y} z_j, -kappa) over x' = (tanh(w) + 1) / 2,
so x' stays in [0, 1] without clipping, with Adam from w = atanh(2x - 1) in every
binary-search step, and searches c per example as Carlini's reference code does: after
a binary step that found an adversarial example, c moves down to the midpoint of its
bounds; otherwise up to the midpoint, or times 10 while no upper bound is known.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from l2p_jax.attacks import core


def cw_l2(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  c_init: float = 0.01,
  learning_rate: float = 5e-4,
  kappa: float = 0.0,
  binary_steps: int = 9,
  steps: int = 10,
  unroll: int | bool = 1,
) -> core.AttackResult:
  """C&W L2: per example, the smallest-L2 adversarial point seen over all binary-search
  steps (x itself where none was found); `success` says which examples were fooled
  (margin max_{j!=y} z_j - z_y > kappa at the point, under that iteration's noise draw)
  and `l2` is the L2 distance whose mean over successes the evaluator reports.

  Iteration t of binary step b runs the model with noise key fold_in(fold_in(key, b), t).
  """
  optimizer = optax.adam(learning_rate)
  to_x = lambda w: (jnp.tanh(w) + 1) / 2  # noqa: E731
  w0 = jnp.arctanh(jnp.clip(2 * x - 1, -1 + 1e-6, 1 - 1e-6))
  inf = jnp.full(y.shape, jnp.inf, x.dtype)

  def objective(w, c, noise_key):
    x_adv = to_x(w)
    margin = core.cw_margin(logits_fn(x_adv, noise_key), y)
    l2_sq = jnp.sum(jnp.square(x_adv - x), axis=tuple(range(1, x.ndim)))
    return jnp.sum(l2_sq + c * jnp.maximum(-margin, -kappa)), (x_adv, margin, l2_sq)

  def binary_step(b, search):
    c, lower, upper, best_l2_sq, best_x = search

    def iteration(t, state):
      w, opt_state, found, best_l2_sq, best_x = state
      (_, (x_adv, margin, l2_sq)), grad = jax.value_and_grad(objective, has_aux=True)(
        w, c, jax.random.fold_in(jax.random.fold_in(key, b), t)
      )
      fooled = margin > kappa
      better = fooled & (l2_sq < best_l2_sq)
      updates, opt_state = optimizer.update(grad, opt_state)
      return (
        optax.apply_updates(w, updates),
        opt_state,
        found | fooled,
        jnp.where(better, l2_sq, best_l2_sq),
        jnp.where(core.per_example(better, x), x_adv, best_x),
      )

    _, _, found, best_l2_sq, best_x = jax.lax.fori_loop(
      0,
      steps,
      iteration,
      (w0, optimizer.init(w0), jnp.zeros(y.shape, bool), best_l2_sq, best_x),
      unroll=unroll,
    )
    upper = jnp.where(found, jnp.minimum(upper, c), upper)
    lower = jnp.where(found, lower, jnp.maximum(lower, c))
    c = jnp.where(jnp.isfinite(upper), (lower + upper) / 2, c * 10)
    return c, lower, upper, best_l2_sq, best_x

  search = (jnp.full(y.shape, c_init, x.dtype), jnp.zeros(y.shape, x.dtype), inf, inf, x)
  *_, best_l2_sq, best_x = jax.lax.fori_loop(0, binary_steps, binary_step, search)
  return core.make_result(x, best_x, jnp.isfinite(best_l2_sq))
