"""L-inf APGD (Croce & Hein, ICML 2020), the gradient attacks of AutoAttack, with EOT.

Follows Algorithm 1 of the paper as the authors' `autopgd_base.py` implements it:
step size 2 eps, momentum 0.75 from the second iteration on, checkpoints after
0.22, 0.41, 0.57, ... of the iterations (window shrinking by 0.03 to at least 0.06),
and at a checkpoint the step size is halved and the iterate (and its gradient) reset to
the best point found when
  condition 1: the loss increased in at most rho * (window length) of the window's
    steps (the code's `<=`; the paper prints `<`), or
  condition 2: the step size was not halved at the previous checkpoint and the best
    loss has not improved since it.
Choices where this implementation departs from the reference: the first window also
counts the step from the starting point (the reference compares against an unfilled
history slot there); the loss that drives the step-size checks and the "fooled" verdict
use the mean over the EOT draws (the reference uses the last draw); the random start is
uniform in the ball (the reference rescales it so its largest entry is eps); and an
example that is never fooled returns its highest-loss point instead of x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from l2p_jax.attacks import core, progress


def checkpoint_steps(steps: int) -> list[int]:
  """Iteration counts after which APGD checks its step size, e.g. for 100 iterations
  22, 41, 57, 70, 80, 87, 93, 99 (the paper's p_j times 100)."""
  window = max(int(0.22 * steps), 1)
  shrink, min_window = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
  points, point = [], window
  while point <= steps:
    points.append(point)
    window = max(window - shrink, min_window)
    point += window
  return points


def _window_lengths(steps: int) -> jax.Array:
  """Per iteration (0-based), the length of the window that a checkpoint closes there,
  0 at iterations that are no checkpoint: the schedule the step-size checks read."""
  points = checkpoint_steps(steps)
  window = np.zeros(steps, np.int32)
  window[np.array(points) - 1] = np.diff([0] + points)
  return jnp.asarray(window)


def _init_state(
  x0: jax.Array, loss0: jax.Array, logits0: jax.Array, grad0: jax.Array, y: jax.Array, eps: float
) -> dict[str, jax.Array]:
  """A run's state at its random start x0 (loss, logits and gradient there): step size
  2 eps, x0 the best point so far, and the step size counted as halved at the last check
  (so that condition 2 cannot fire at the first checkpoint)."""
  return dict(
    x=x0,
    x_prev=x0,
    grad=grad0,
    loss_prev=loss0,
    step_size=jnp.full(loss0.shape, 2.0 * eps, x0.dtype),
    x_best=x0,
    grad_best=grad0,
    loss_best=loss0,
    x_fooled=x0,
    fooled=jnp.argmax(logits0, -1) != y,
    n_increases=jnp.zeros(loss0.shape, jnp.int32),
    loss_best_at_check=loss0,
    halved_at_check=jnp.ones(loss0.shape, bool),
  )


def _momentum_step(
  s: dict[str, jax.Array], i: jax.Array, x: jax.Array, eps: float, momentum: float
) -> jax.Array:
  """Iteration i's next point: a sign step of the current step size projected onto the
  ball, then the momentum average with the previous move (none at i = 0), projected."""
  a = jnp.where(i > 0, momentum, 1.0)
  step_size = core.per_example(s['step_size'], x)
  z = core.linf_project(core.sign_step(s['x'], s['grad'], step_size), x, eps)
  return core.linf_project(s['x'] + a * (z - s['x']) + (1 - a) * (s['x'] - s['x_prev']), x, eps)


def _halve_step_size(
  s: dict[str, jax.Array],
  n_increases: jax.Array,
  loss_best: jax.Array,
  window_length: jax.Array,
  rho: float,
) -> jax.Array:
  """Per example, whether the checkpoint closing a window of `window_length` iterations
  (0: no checkpoint) halves the step size: condition 1 or condition 2 of the paper."""
  condition1 = n_increases <= rho * window_length
  condition2 = ~s['halved_at_check'] & (s['loss_best_at_check'] >= loss_best)
  return (window_length > 0) & (condition1 | condition2)


def _advance(
  s: dict[str, jax.Array],
  y: jax.Array,
  x_new: jax.Array,
  loss_new: jax.Array,
  logits: jax.Array,
  grad: jax.Array,
  window_length: jax.Array,
  rho: float,
) -> dict[str, jax.Array]:
  """The state after moving to x_new (with its loss, logits and gradient): best and
  fooling points updated and, at a checkpoint, the step size halved and the iterate
  reset to the best point where `_halve_step_size` says so."""
  expand = lambda v: core.per_example(v, x_new)
  fooled_now = jnp.argmax(logits, -1) != y
  improved = loss_new > s['loss_best']
  loss_best = jnp.where(improved, loss_new, s['loss_best'])
  x_best = jnp.where(expand(improved), x_new, s['x_best'])
  grad_best = jnp.where(expand(improved), grad, s['grad_best'])
  n_increases = s['n_increases'] + (loss_new > s['loss_prev'])
  is_check = window_length > 0
  halve = _halve_step_size(s, n_increases, loss_best, window_length, rho)
  return dict(
    x=jnp.where(expand(halve), x_best, x_new),
    x_prev=s['x'],
    grad=jnp.where(expand(halve), grad_best, grad),
    loss_prev=loss_new,
    step_size=jnp.where(halve, s['step_size'] / 2, s['step_size']),
    x_best=x_best,
    grad_best=grad_best,
    loss_best=loss_best,
    x_fooled=jnp.where(expand(fooled_now), x_new, s['x_fooled']),
    fooled=s['fooled'] | fooled_now,
    n_increases=jnp.where(is_check, 0, n_increases),
    loss_best_at_check=jnp.where(is_check, loss_best, s['loss_best_at_check']),
    halved_at_check=jnp.where(is_check, halve, s['halved_at_check']),
  )


def apgd(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  eps: float,
  steps: int = 100,
  loss: str = 'ce',
  eot_draws: int = 1,
  restarts: int = 1,
  rho: float = 0.75,
  momentum: float = 0.75,
  unroll: int | bool = 1,
) -> core.AttackResult:
  """L-inf APGD on `loss` ('ce' or 'dlr'; any registered loss works) with gradients
  averaged over `eot_draws` noise draws; returns, per example, the last point found
  that fooled the model (judged by the mean logits of the step's EOT draws) or else the
  highest-loss point, from the first restart that fooled it, else the highest-loss one.

  Restart r uses rkey = fold_in(key, r); (start_key, steps_key) = split(rkey); the
  gradient at iterate t (t = 0 is the random start) uses fold_in(steps_key, t) as the
  EOT key. AutoAttack's version for randomized defenses is `autoattack_rand`.
  """
  return apgd_on_loss(
    logits_fn,
    core.get_loss(loss),
    key,
    x,
    y,
    eps=eps,
    steps=steps,
    eot_draws=eot_draws,
    restarts=restarts,
    rho=rho,
    momentum=momentum,
    unroll=unroll,
  )


def apgd_on_loss(
  logits_fn: core.LogitsFn,
  loss_fn: core.LossFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  eps: float,
  steps: int,
  eot_draws: int,
  restarts: int,
  rho: float,
  momentum: float,
  unroll: int | bool,
) -> core.AttackResult:
  """`apgd` on any loss function (a targeted one included), with the same keys."""
  window = _window_lengths(steps)

  def run(run_key):
    start_key, steps_key = jax.random.split(run_key)
    grad_at = lambda x_, t: core.eot_value_and_grad(
      logits_fn, loss_fn, jax.random.fold_in(steps_key, t), x_, y, eot_draws
    )
    x0 = core.linf_random_start(start_key, x, eps)
    state = _init_state(x0, *grad_at(x0, 0), y, eps)

    def iteration(i, s):
      x_new = _momentum_step(s, i, x, eps, momentum)
      loss_new, logits, grad = grad_at(x_new, i + 1)
      return _advance(s, y, x_new, loss_new, logits, grad, window[i], rho)

    def tracked(i, state):
      s, curve = state
      s = iteration(i, s)
      progress.tick(i + 1, steps)
      return s, curve.at[i + 1].set(core.unfooled(s['fooled']))

    curve = jnp.zeros((steps + 1, *y.shape), bool).at[0].set(core.unfooled(state['fooled']))
    s, curve = jax.lax.fori_loop(0, steps, tracked, (state, curve), unroll=unroll)
    x_adv = jnp.where(core.per_example(s['fooled'], x), s['x_fooled'], s['x_best'])
    return x_adv, s['loss_best'], s['fooled'], curve

  x_adv, _, fooled, curve = core.best_of_restarts(run, key, restarts)
  return core.make_result(x, x_adv, fooled, curve)


def autoattack_rand(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  eps: float,
  steps: int = 100,
  eot_draws: int = 20,
  unroll: int | bool = 1,
) -> core.AttackResult:
  """AutoAttack's version for randomized defenses: APGD-CE then APGD-DLR, no restarts,
  `eot_draws` EOT draws; per example the first of the two that fooled the model, the
  curve CE's followed by DLR's (core.later_rows).

  The CE run uses fold_in(key, 0), the DLR run fold_in(key, 1). Both run on the whole
  batch (AutoAttack runs DLR only on the points CE did not fool; the verdicts are
  the same and a fixed batch shape keeps it jittable).
  """
  results = [
    progress.within(k, 2, apgd)(
      logits_fn,
      jax.random.fold_in(key, k),
      x,
      y,
      eps=eps,
      steps=steps,
      loss=loss,
      eot_draws=eot_draws,
      unroll=unroll,
    )
    for k, loss in enumerate(('ce', 'dlr'))
  ]
  ce, dlr = results
  curve = jnp.concatenate([ce.curve, core.later_rows(dlr.curve, ce.success)])
  return core.first_success(results)._replace(curve=curve)
