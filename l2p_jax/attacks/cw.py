"""Carlini & Wagner's L2 attack (S&P 2017), untargeted, with PNI's settings as defaults.

Minimises ||x' - x||^2 + c * max(z_y - max_{j!=y} z_j, -kappa) over x' = (tanh(w) + 1) / 2,
so x' stays in [0, 1] without clipping, with Adam from w = atanh(2x - 1) in every
binary-search step, and searches c per example as Carlini's reference code does: after
a binary step that found an adversarial example, c moves down to the midpoint of its
bounds; otherwise up to the midpoint, or times 10 while no upper bound is known. For a
randomized model it runs in expectation (EOT): steps on the mean logits of several
noise draws, and only points that fool the expected prediction count, by a margin that
grows with how noisy the check's estimate of that prediction is (`eot_z`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from l2p_jax.attacks import core, progress


def expected_margin_bound(
  logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, key: jax.Array, draws: int, z: float
) -> jax.Array:
  """C&W's margin of the expected prediction over `draws` noise draws fold_in(key, j)
  (the log of their mean softmax) less z standard errors of that estimate, the standard
  deviation of the draws' own margins over sqrt(draws): a lower confidence bound on the
  margin of the model's expected prediction (z = 0: the estimate itself)."""
  if z and draws < 2:
    raise ValueError(f'A standard error needs at least 2 draws, got draws={draws} (z={z}).')

  def draw(k):
    logits = logits_fn(x, k)
    margin = core.cw_margin(logits, y)
    return jax.nn.softmax(logits), margin, jnp.square(margin)

  mean_softmax, mean_margin, mean_square = core.mean_over_draws(draw, key, draws)
  estimate = core.cw_margin(jnp.log(mean_softmax), y)
  if not z:
    return estimate
  variance = jnp.maximum(mean_square - jnp.square(mean_margin), 0) * draws / (draws - 1)
  return estimate - z * jnp.sqrt(variance / draws)


def _objective(logits_fn, x, y, w, c, noise_key, *, kappa, draws):
  """C&W's loss summed over the batch at x' = (tanh(w) + 1) / 2, on the logits of the
  noise key (one draw) or their mean over draws fold_in(fold_in(key, 0), j); with
  (x', margin, squared L2) as its aux."""
  x_adv = (jnp.tanh(w) + 1) / 2
  if draws == 1:
    logits = logits_fn(x_adv, noise_key)
  else:
    draw = lambda k: logits_fn(x_adv, k)
    logits = core.mean_over_draws(draw, jax.random.fold_in(noise_key, 0), draws)
  margin = core.cw_margin(logits, y)
  l2_sq = jnp.sum(jnp.square(x_adv - x), axis=tuple(range(1, x.ndim)))
  return jnp.sum(l2_sq + c * jnp.maximum(-margin, -kappa)), (x_adv, margin, l2_sq)


def _fools(logits_fn, x_adv, y, margin, noise_key, kappa, draws, z):
  """Whether each point counts as adversarial: its margin above kappa (one draw), or the
  `expected_margin_bound` over fresh draws fold_in(fold_in(key, 1), j) above kappa."""
  if draws > 1:
    fresh = jax.random.fold_in(noise_key, 1)
    margin = expected_margin_bound(logits_fn, x_adv, y, fresh, draws, z)
  return margin > kappa


def _search_c(found, c, lower, upper):
  """Carlini's search over c, per example: (c, lower, upper) after a binary step, c down
  to the midpoint of its bounds where it found an adversarial point, else up to the
  midpoint, or times 10 while no upper bound is known."""
  upper = jnp.where(found, jnp.minimum(upper, c), upper)
  lower = jnp.where(found, lower, jnp.maximum(lower, c))
  return jnp.where(jnp.isfinite(upper), (lower + upper) / 2, c * 10), lower, upper


def _early_abort(t, loss, abort, period: int, on_mean: bool):
  """Carlini & Wagner's early abort: its state (last loss checked, the period's sum, stop)
  after iteration t. Every `period` iterations, stop if the batch's loss is above 0.9999
  x the last one checked; `on_mean` checks the loss averaged over the period just ended
  instead of one iteration's, for a loss estimated from noise draws, whose noise alone
  can look like a plateau."""
  last, period_sum, _ = abort
  if on_mean:
    period_sum = period_sum + loss
    check = (t + 1) % period == 0
    value = period_sum / period
    period_sum = jnp.where(check, 0.0, period_sum)
  else:
    check = t % period == 0
    value = loss
  return jnp.where(check, value, last), period_sum, check & (value > 0.9999 * last)


def _iterate(iteration, state, steps: int, abort_early: bool, unroll: int | bool):
  """`steps` iterations of a binary step, or with early abort until its stop flag (the
  last entry of the state's last, `_early_abort`'s) is set."""
  if not abort_early:
    return jax.lax.fori_loop(0, steps, iteration, state, unroll=unroll)
  going = lambda t_state: (t_state[0] < steps) & ~t_state[1][-1][-1]
  step = lambda t_state: (t_state[0] + 1, iteration(*t_state))
  return jax.lax.while_loop(going, step, (0, state))[1]


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
  eot_draws: int = 1,
  eot_z: float = 0.0,
  abort_early: bool = False,
  abort_on_mean: bool = False,
  unroll: int | bool = 1,
) -> core.AttackResult:
  """C&W L2: per example, the smallest-L2 adversarial point seen over all binary-search
  steps (x itself where none was found); `success` says which examples were fooled
  (margin max_{j!=y} z_j - z_y > kappa at the point) and `l2` is the L2 distance whose
  mean over successes the evaluator reports.

  One draw (eot_draws=1): iteration t of binary step b runs the model with noise key
  k = fold_in(fold_in(key, b), t), and a point counts as adversarial under that draw. In
  expectation (eot_draws > 1, randomized models): each Adam step is on the logits averaged
  over draws fold_in(fold_in(k, 0), j), j < eot_draws, and a point counts only if the
  `expected_margin_bound` of fresh draws fold_in(fold_in(k, 1), j) (eot_z standard errors
  below the estimate) exceeds kappa: the point kept passed one of many checks, and without
  the bound, where one check is noisy, it passed by luck.
  `abort_early` (Carlini & Wagner's): a binary step stops, that iteration unrecorded, when
  a check (every max(steps // 10, 1) iterations) finds the batch's loss > 0.9999 x the last;
  `abort_on_mean` checks the loss averaged over those iterations (`_early_abort`)."""
  optimizer = optax.adam(learning_rate)
  w0 = jnp.arctanh(jnp.clip(2 * x - 1, -1 + 1e-6, 1 - 1e-6))
  inf = jnp.full(y.shape, jnp.inf, x.dtype)
  period = max(steps // 10, 1)
  no_abort = (inf[0], jnp.zeros((), x.dtype), False)  # `_early_abort`'s state.
  objective = functools.partial(_objective, logits_fn, x, y, kappa=kappa, draws=eot_draws)

  def binary_step(b, search):
    c, lower, upper, best_l2_sq, best_x = search

    def iteration(t, state):
      w, opt_state, found, best_l2_sq, best_x, abort = state
      noise_key = jax.random.fold_in(jax.random.fold_in(key, b), t)
      (loss, (x_adv, margin, l2_sq)), grad = jax.value_and_grad(objective, has_aux=True)(
        w, c, noise_key
      )
      abort = _early_abort(t, loss, abort, period, abort_on_mean)
      stopped = abort_early & abort[-1]
      fooled = _fools(logits_fn, x_adv, y, margin, noise_key, kappa, eot_draws, eot_z) & ~stopped
      better = fooled & (l2_sq < best_l2_sq)
      updates, opt_state = optimizer.update(grad, opt_state)
      progress.tick(b * steps + t + 1, binary_steps * steps)
      return (
        optax.apply_updates(w, updates),
        opt_state,
        found | fooled,
        jnp.where(better, l2_sq, best_l2_sq),
        jnp.where(core.per_example(better, x), x_adv, best_x),
        abort,
      )

    state = (w0, optimizer.init(w0), jnp.zeros(y.shape, bool), best_l2_sq, best_x, no_abort)
    _, _, found, best_l2_sq, best_x, _ = _iterate(iteration, state, steps, abort_early, unroll)
    return *_search_c(found, c, lower, upper), best_l2_sq, best_x

  search = (jnp.full(y.shape, c_init, x.dtype), jnp.zeros(y.shape, x.dtype), inf, inf, x)
  *_, best_l2_sq, best_x = jax.lax.fori_loop(0, binary_steps, binary_step, search)
  return core.make_result(x, best_x, jnp.isfinite(best_l2_sq))
