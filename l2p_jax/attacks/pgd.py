"""L-inf FGSM and PGD (Madry et al. 2018), with EOT and restarts, for training and eval.

Key layout (documented so that runs can be recomputed): restart r uses
rkey = fold_in(key, r); (start_key, steps_key, eval_key) = split(rkey, 3); step i
computes its gradient with noise keys fold_in(fold_in(steps_key, i), j) for EOT draw j;
the final verdict (`success`, and the loss that ranks restarts) uses the draws
fold_in(eval_key, j).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2p_jax.attacks import core, progress


def pgd(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  eps: float,
  steps: int,
  step_size: float | None = None,
  step_fraction: float | None = None,
  random_start: bool = True,
  restarts: int = 1,
  loss: str = 'ce',
  eot_draws: int = 1,
  unroll: int | bool = 1,
) -> core.AttackResult:
  """L-inf PGD: `steps` sign-gradient ascent steps on `loss`, each projected back onto
  the eps-ball around x and [0, 1]; returns the last iterate of the best restart.

  Each step is `step_size`, or `step_fraction` * eps when that is given instead (exactly
  one of the two), so that an eps sweep with eps traced keeps its step in proportion to
  the radius and still compiles once.
  `eot_draws` > 1 averages each step's gradient over that many noise draws (EOT);
  `restarts` > 1 keeps per example the first restart that fools the model, else the
  highest-loss one; `unroll` is passed to the step loop (True unrolls it fully, which
  XLA:CPU runs much faster). `success` is judged by the mean logits of `eot_draws`
  fresh draws at x_adv; `curve` marks the examples not fooled at each iterate (by the
  mean logits of its gradient's draws) and at x_adv. Jittable with the integer and
  string arguments static; with one restart, unused outputs (success, l2, curve) cost
  nothing under jit.
  """
  if (step_size is None) == (step_fraction is None):
    raise ValueError('pgd takes exactly one of step_size and step_fraction.')
  step_size = step_size if step_fraction is None else step_fraction * eps
  loss_fn = core.get_loss(loss)

  def run(run_key):
    start_key, steps_key, eval_key = jax.random.split(run_key, 3)
    x_adv = core.linf_random_start(start_key, x, eps) if random_start else x

    def step(i, state):
      x_adv, curve = state
      _, logits, grad = core.eot_value_and_grad(
        logits_fn, loss_fn, jax.random.fold_in(steps_key, i), x_adv, y, eot_draws
      )
      curve = curve.at[i].set(core.unfooled(jnp.argmax(logits, -1) != y))
      progress.tick(i + 1, steps)
      return core.linf_project(core.sign_step(x_adv, grad, step_size), x, eps), curve

    curve = jnp.zeros((steps + 1, *y.shape), bool)
    x_adv, curve = jax.lax.fori_loop(0, steps, step, (x_adv, curve), unroll=unroll)
    loss, fooled = core.eot_evaluate(logits_fn, loss_fn, eval_key, x_adv, y, eot_draws)
    return x_adv, loss, fooled, curve.at[steps].set(core.unfooled(fooled))

  x_adv, _, fooled, curve = core.best_of_restarts(run, key, restarts)
  return core.make_result(x, x_adv, fooled, curve)


def pgd_noise_keys(key: jax.Array, steps: int, restarts: int = 1, eot_draws: int = 1) -> jax.Array:
  """The noise keys `pgd` gives its gradients (restart-major, then step, then draw), by
  the key layout above: the keys to draw ahead for a model whose noise costs per call."""
  steps_keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(key, r), 3)[1])(
    jnp.arange(restarts)
  )
  fold = lambda keys, n: jax.vmap(
    lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(n))
  )(keys)
  return fold(fold(steps_keys, steps).reshape(-1), eot_draws).reshape(-1)


def fgsm(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  eps: float,
  loss: str = 'ce',
  eot_draws: int = 1,
) -> core.AttackResult:
  """FGSM (Goodfellow et al. 2015): one sign step of size eps from the clean input,
  clipped to [0, 1]; it is PGD with one step and no random start."""
  return pgd(
    logits_fn,
    key,
    x,
    y,
    eps=eps,
    steps=1,
    step_size=eps,
    random_start=False,
    loss=loss,
    eot_draws=eot_draws,
  )
