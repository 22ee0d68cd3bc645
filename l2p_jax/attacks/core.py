"""Parts the attacks are composed of: losses, start, step, projection, EOT, restarts.

Conventions shared by every attack in this package:

* A model is a `logits_fn(x, key) -> logits` on NHWC float inputs in [0, 1]; `key`
  seeds the model's noise (deterministic models ignore it).
* Losses are functions of `(logits, labels)` returning one value per example that the
  attack MAXIMISES. Gradients are taken of the loss summed over the batch, so every
  example's gradient is its own.
* Everything random is derived from the attack's `key` by `jax.random.fold_in` or
  `jax.random.split`, so one key gives bit-identical results.
* Every attack returns an `AttackResult`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from l2p_jax.attacks import progress

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


class AttackResult(NamedTuple):
  """What every attack returns.

  x_adv: adversarial inputs, same shape as x, in [0, 1] and within the attack's budget.
  success: (N,) bool, the attack's own verdict that x_adv is misclassified, judged with
    the noise draw(s) the attack itself used (for a randomized model the evaluator
    should re-judge x_adv with its prediction rule).
  l2: (N,) L2 norm of x_adv - x per example.
  curve: (iterations + 1, N) bool, per example whether the attack had not fooled it (its
    own verdict) at its start and after each iteration (PGD, APGD: of the first restart;
    Square: after each query; APGD-rand, APGD-T, AutoAttack: of every stage, in the order
    they ran), the evidence that it converged; per example so that an evaluator can leave
    out padded rows; None for the others.
  """

  x_adv: jax.Array
  success: jax.Array
  l2: jax.Array
  curve: jax.Array | None = None


def make_result(
  x: jax.Array, x_adv: jax.Array, success: jax.Array, curve: jax.Array | None = None
) -> AttackResult:
  """Bundles an attack's output with the L2 size of its perturbation; x_adv is cut from
  the gradient so that a training loss on it does not differentiate through the attack."""
  x_adv = jax.lax.stop_gradient(x_adv)
  return AttackResult(x_adv, success, l2_norm(x_adv - x), curve)


def unfooled(fooled: jax.Array) -> jax.Array:
  """Which examples are not fooled: one row of an attack's curve."""
  return ~fooled


def l2_norm(delta: jax.Array) -> jax.Array:
  """Per-example L2 norm of a batch of perturbations."""
  return jnp.sqrt(jnp.sum(jnp.square(delta), axis=tuple(range(1, delta.ndim))))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of the true class: raising it makes the true class less likely."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _true_and_best_other(logits: jax.Array, labels: jax.Array):
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  is_true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  best_other = jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=-1)
  return true, best_other


def cw_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """C&W margin max_{j != y} z_j - z_y: positive exactly when the example is fooled."""
  true, best_other = _true_and_best_other(logits, labels)
  return best_other - true


def dlr(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Croce & Hein's difference-of-logits ratio, -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3).

  Invariant to shifting and scaling the logits, which makes it robust to the gradient
  masking that saturated softmaxes cause; it needs at least three classes.
  """
  if logits.shape[-1] < 3:
    raise ValueError(f'The DLR loss needs at least 3 classes, got {logits.shape[-1]}.')
  true, best_other = _true_and_best_other(logits, labels)
  top3 = jax.lax.top_k(logits, 3)[0]
  return (best_other - true) / (top3[:, 0] - top3[:, 2] + 1e-12)


def dlr_targeted(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """Croce & Hein's targeted DLR loss, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), for
  target classes t; it needs at least four classes."""
  if logits.shape[-1] < 4:
    raise ValueError(f'The targeted DLR loss needs at least 4 classes, got {logits.shape[-1]}.')
  take = lambda labels_: jnp.take_along_axis(logits, labels_[:, None], axis=-1)[:, 0]
  top4 = jax.lax.top_k(logits, 4)[0]
  return (take(targets) - take(labels)) / (top4[:, 0] - (top4[:, 2] + top4[:, 3]) / 2 + 1e-12)


LOSSES: dict[str, LossFn] = {'ce': cross_entropy, 'cw': cw_margin, 'dlr': dlr}


def get_loss(name: str) -> LossFn:
  """The loss registered under `name` ('ce', 'cw' or 'dlr')."""
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r}; expected one of {sorted(LOSSES)}.')
  return LOSSES[name]


def linf_project(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """Projects onto the L-inf ball of radius eps around x intersected with [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def linf_random_start(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """A uniform random point of the L-inf ball around x, clipped to [0, 1]."""
  noise = jax.random.uniform(key, x.shape, x.dtype, minval=-eps, maxval=eps)
  return linf_project(x + noise, x, eps)


def sign_step(x: jax.Array, grad: jax.Array, step_size: float | jax.Array) -> jax.Array:
  """One L-inf steepest-ascent step: step_size times the sign of the gradient."""
  return x + step_size * jnp.sign(grad)


def per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes (N,) values to broadcast against a batch shaped like `like`."""
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def mean_over_draws(fn: Callable[[jax.Array], Any], key: jax.Array, draws: int) -> Any:
  """Mean of the pytree fn(fold_in(key, j)) over j < draws, one draw at a time.

  The first draw is computed outside the loop and the sum is divided by `draws`, so
  with one draw the result is bit-identical to fn(fold_in(key, 0)); draws run
  sequentially so memory does not grow with their number.
  """
  if draws < 1:
    raise ValueError(f'draws must be at least 1, got {draws}.')
  first = fn(jax.random.fold_in(key, 0))
  add = lambda j, total: jax.tree.map(jnp.add, total, fn(jax.random.fold_in(key, j)))
  total = jax.lax.fori_loop(1, draws, add, first)
  return jax.tree.map(lambda t: t / draws, total)


def eot_value_and_grad(
  logits_fn: LogitsFn, loss_fn: LossFn, key: jax.Array, x: jax.Array, y: jax.Array, draws: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Loss, logits and input gradient averaged over `draws` noise draws (EOT).

  Returns (loss (N,), logits (N, C), grad like x), each the mean over the draws; draw j
  uses the noise key fold_in(key, j).
  """

  def one_draw(draw_key):
    def summed_loss(x_):
      logits = logits_fn(x_, draw_key)
      loss = loss_fn(logits, y)
      return jnp.sum(loss), (loss, logits)

    (_, (loss, logits)), grad = jax.value_and_grad(summed_loss, has_aux=True)(x)
    return loss, logits, grad

  return mean_over_draws(one_draw, key, draws)


def eot_evaluate(
  logits_fn: LogitsFn, loss_fn: LossFn, key: jax.Array, x: jax.Array, y: jax.Array, draws: int = 1
) -> tuple[jax.Array, jax.Array]:
  """Mean loss over `draws` noise draws and whether the mean logits misclassify x."""

  def one_draw(draw_key):
    logits = logits_fn(x, draw_key)
    return loss_fn(logits, y), logits

  loss, logits = mean_over_draws(one_draw, key, draws)
  return loss, jnp.argmax(logits, axis=-1) != y


def best_of_restarts(
  run: Callable[[jax.Array], tuple[jax.Array, ...]], key: jax.Array, restarts: int
) -> tuple[jax.Array, ...]:
  """Runs run(fold_in(key, r)) -> (x_adv, loss, fooled, curve) for r < restarts and
  keeps, per example, the first restart that fooled the model, else the highest-loss
  one; the curve is the first restart's."""
  if restarts < 1:
    raise ValueError(f'restarts must be at least 1, got {restarts}.')
  with progress.part(0, restarts):
    *first, curve = run(jax.random.fold_in(key, 0))

  def keep_better(r, best):
    x_best, loss_best, fooled_best = best
    with progress.part(r, restarts):
      x_new, loss_new, fooled_new, _ = run(jax.random.fold_in(key, r))
    take = ~fooled_best & (fooled_new | (loss_new > loss_best))
    return (
      jnp.where(per_example(take, x_best), x_new, x_best),
      jnp.where(take, loss_new, loss_best),
      fooled_best | fooled_new,
    )

  return (*jax.lax.fori_loop(1, restarts, keep_better, tuple(first)), curve)


def later_rows(curve: jax.Array, fooled_before: jax.Array) -> jax.Array:
  """A later stage's curve after its start, as rows that continue an earlier stage's
  curve: the examples the earlier stages fooled (`fooled_before`) stay fooled."""
  return curve[1:] & ~fooled_before


def first_success(results: Sequence[AttackResult]) -> AttackResult:
  """Per example, the first result whose attack succeeded, else the first result: the
  worst case over several attacks, as AutoAttack reports it (without curves)."""
  results = [result._replace(curve=None) for result in results]

  def pick(chosen, result):
    take = result.success & ~chosen.success
    return jax.tree.map(
      lambda new, old: jnp.where(per_example(take, old), new, old), result, chosen
    )

  return functools.reduce(pick, results[1:], results[0])
