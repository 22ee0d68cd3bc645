"""What a training step is made of, below the registry that names its parts: the step's
settings (`StepSettings`), what its loss returns beside the objective (`StepAux`), and
the update rules that differentiate that loss and descend (`joint_update`, L2P's
`l2p_paper_update` and `l2p_code_update`, chosen by `l2p_alternation`).

A rule gets `loss_at(state, reg_weight=, x_adv=)`, the step's loss function of (params,
perturb) at `state`, and `step(state, collection, grads)`, one `descend`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections

from l2p_jax import models
from l2p_jax.training import optim
from l2p_jax.training.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the steps use of a training config: the method's record, its PGD and loss
  settings (adv.*, the eval PGD's steps), Adv-BNN's KL weight (alpha / N), prior and
  scope, L2P's alternation and theta floor, and the seed."""

  method: Any  # The method's record (`l2p_jax.methods.Method`), looked up by the caller.
  seed: int
  eps: float
  steps: int
  step_size: float
  random_start: bool
  unroll: bool
  draw_noise_ahead: bool
  labels: str  # PGD's targets: 'true' labels or the clean 'prediction'.
  attack_batchnorm: str  # BatchNorm statistics PGD sees: 'batch' or 'running'.
  clean_weight: float
  adv_weight: float
  eval_pgd_steps: int
  kl_weight: float
  prior_sigma: float
  kl_scope: str
  alternation: str
  theta_floor: float

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, method: Any, kl_weight: float
  ) -> StepSettings:
    """The settings of `config` for `method` (config.method's record), with Adv-BNN's
    KL weight (see `step.kl_loss_weight`)."""
    adv = config.adv
    return cls(
      method=method,
      seed=config.seed,
      eps=adv.eps,
      steps=adv.steps,
      step_size=adv.step_size,
      random_start=adv.random_start,
      unroll=adv.unroll,
      draw_noise_ahead=adv.draw_noise_ahead,
      labels=adv.labels,
      attack_batchnorm=adv.attack_batchnorm,
      clean_weight=adv.clean_weight,
      adv_weight=adv.adv_weight,
      eval_pgd_steps=config.eval.pgd_steps,
      kl_weight=kl_weight,
      prior_sigma=config.bnn.prior_sigma,
      kl_scope=config.bnn.kl_scope,
      alternation=config.l2p.alternation,
      theta_floor=config.l2p.theta_floor,
    )


class StepAux(NamedTuple):
  """What a loss function returns beside its objective."""

  loss: jax.Array  # The training loss (the objective without the regularizer).
  batch_stats: Any  # BatchNorm statistics after the loss's passes.
  clean_logits: jax.Array
  x_adv: jax.Array | None  # The PGD examples (None in a clean phase).


# update(state, loss_at, descend, reg_weight) -> (state, aux): see `joint_update`.
UpdateRule = Callable[..., tuple[TrainState, StepAux]]


def descend(
  state: TrainState,
  collection: str,
  grads: Any,
  lr: jax.Array,
  optimizers: dict,
  theta_floor: float,
) -> TrainState:
  """One optimizer update of one collection ('params' or 'perturb'); the other
  collection and its optimizer state stay exactly as they were. L2P maps are floored
  after."""
  variables, opt_state = optim.update(
    optimizers[collection], grads, state.opt_state[collection], getattr(state, collection), lr
  )
  if collection == 'perturb':
    variables = models.project_perturb(variables, theta_floor)
  return state.replace(
    **{collection: variables}, opt_state={**state.opt_state, collection: opt_state}
  )


def joint_update(
  state: TrainState, loss_at, step, reg_weight, *, train_perturb: bool
) -> tuple[TrainState, StepAux]:
  """Both collections step on one gradient of the loss (every method; the noise
  parameters only while they are trained)."""
  grad_fn = jax.value_and_grad(loss_at(state, reg_weight=reg_weight), argnums=(0, 1), has_aux=True)
  (_, aux), (g_params, g_perturb) = grad_fn(state.params, state.perturb)
  state = step(state, 'params', g_params)
  if train_perturb:
    state = step(state, 'perturb', g_perturb)
  return state, aux


def l2p_paper_update(state: TrainState, loss_at, step, reg_weight) -> tuple[TrainState, StepAux]:
  """The paper's alternating back-propagation: theta steps with W fixed, then W with
  the new theta fixed, both on the loss minus the regularizer and the same PGD
  examples. Returns the first pass's aux with the second's BatchNorm statistics."""
  with jax.named_scope('theta_pass'):  # Names the ops for benchmarks/step_passes.py.
    loss_fn = loss_at(state, reg_weight=reg_weight)
    (_, aux), (_, g_perturb) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      state.params, state.perturb
    )
    state = step(state, 'perturb', g_perturb)
  with jax.named_scope('w_pass'):
    loss_fn = loss_at(state, reg_weight=reg_weight, x_adv=aux.x_adv)
    (_, second), (g_params, _) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      state.params, state.perturb
    )
    state = step(state, 'params', g_params)
  return state, aux._replace(batch_stats=second.batch_stats)


def l2p_code_update(
  state: TrainState, loss_at, step, reg_weight, *, regularizer
) -> tuple[TrainState, StepAux]:
  """The authors' code: a theta step on the `regularizer` alone, then (at the new
  theta) PGD and a joint step on the loss without it."""
  g_reg = jax.grad(lambda p: -reg_weight * regularizer(p))(state.perturb)
  state = step(state, 'perturb', g_reg)
  return joint_update(state, loss_at, step, 0.0, train_perturb=True)


def l2p_alternation(settings: StepSettings) -> UpdateRule:
  """l2p.alternation's update: the paper's theta-then-W steps, or the authors' code's
  regularizer step then joint step."""
  if settings.alternation == 'paper':
    return l2p_paper_update
  return functools.partial(l2p_code_update, regularizer=settings.method.regularizer.value)
