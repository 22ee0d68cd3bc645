"""The jitted steps of every method: one training iteration per phase (clean or
adversarial, noise on or off) and the per-epoch evaluation step.

As in Flax's examples, a step is one loss function of (params, perturb)
(`step_loss_fn`), differentiated with `jax.value_and_grad` by the method's update rule
(`l2p_jax.training.rules`), and `train_step` returns (state, metrics); the loop sums the
metrics of an epoch in `EpochMetrics`. A step gets what it needs of the config, and the
method's record, as `StepSettings`, built once and hashable (a static argument).

Everything random is a pure function of (settings.seed, step): a run resumed from a
checkpoint continues bit-identically to one that was never interrupted.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from l2p_jax import attacks, data, models
from l2p_jax.training import objectives
from l2p_jax.training.rules import StepAux, StepSettings, UpdateRule, descend, joint_update
from l2p_jax.training.schedule import Phase
from l2p_jax.training.train_state import TrainState

# Streams folded into the root key, so no two uses of the seed share random numbers.
INIT_STREAM, TRAIN_STREAM, EVAL_STREAM = 0, 1, 2


def kl_loss_weight(config: ml_collections.ConfigDict, train_split_size: int) -> float:
  """alpha / N of Adv-BNN's loss, N the whole training split's size unless
  bnn.kl_examples names another (a subset run keeps the full run's prior)."""
  return config.bnn.kl_alpha / (config.bnn.kl_examples or train_split_size)


def step_keys(seed: int, step: jax.Array) -> dict[str, jax.Array]:
  """The keys of training step `step`: augmentation, clean noise, PGD, adversarial noise."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), TRAIN_STREAM), step)
  return {
    name: jax.random.fold_in(key, i) for i, name in enumerate(('augment', 'clean', 'pgd', 'adv'))
  }


def pgd_attack(settings: StepSettings, steps: int):
  """The configured L-inf PGD with `steps` steps, as a function of (logits_fn, key, x, y)."""
  return functools.partial(
    attacks.pgd,
    eps=settings.eps,
    steps=steps,
    step_size=settings.step_size,
    random_start=settings.random_start,
    unroll=True if settings.unroll else 1,
  )


def adversarial_examples(
  frozen: dict[str, Any],
  clean_logits: jax.Array,
  clean_batch_stats: Any,
  x: jax.Array,
  y: jax.Array,
  key: jax.Array,
  *,
  phase: Phase,
  model: models.ResNet,
  settings: StepSettings,
) -> jax.Array:
  """The step's PGD examples on the `frozen` variables, given the clean pass there (its
  logits are the targets under adv.labels=prediction).

  The model attacked is in training mode with BatchNorm statistics left alone, or
  (adv.attack_batchnorm=running, as the authors' codes) in eval mode with the running
  statistics as the step's passes so far left them: after the clean pass (L2P's and
  PNI's code), or as the step found them when the loss has no clean term (Adv-BNN's
  code attacks first). With adv.draw_noise_ahead the noise of PGD's steps is drawn
  before its loop, in one vectorized draw (`models.draw_noise`: the same draws, fewer
  ops); the clean and adversarial passes draw theirs at the call, which measured
  faster than drawing them ahead too.
  """
  train = settings.attack_batchnorm != 'running'
  if not train and settings.clean_weight > 0:
    frozen = {**frozen, 'batch_stats': clean_batch_stats}
  apply = models.model_apply(model, frozen, train, phase.noise)
  if settings.draw_noise_ahead and phase.noise:
    noise_keys = attacks.pgd_noise_keys(key, settings.steps)
    drawn = models.draw_noise(apply, x, noise_keys)
    logits_fn = models.noise_drawn_ahead(apply, drawn, noise_keys)
  else:
    logits_fn = lambda inputs, noise_key: apply(inputs, noise_key)[0]
  target = y if settings.labels == 'true' else jnp.argmax(clean_logits, axis=-1)
  return pgd_attack(settings, settings.steps)(logits_fn, key, x, target).x_adv


def step_loss_fn(
  state: TrainState,
  batch: dict[str, jax.Array],
  reg_weight: jax.Array,
  *,
  phase: Phase,
  model: models.ResNet,
  settings: StepSettings,
  x_adv: jax.Array | None = None,
):
  """The loss of training step `state.step` as a function of (params, perturb).

  loss_fn(params, perturb) -> (objective, StepAux): the objective is the training loss
  (the 0.5/0.5 mix of clean and PGD cross-entropies, plus the method's loss term:
  Adv-BNN's KL) minus `reg_weight` times the method's regularizer (L2P's).
  Augmentation and noise draws are fixed by the step's keys. In an adversarial phase
  the PGD examples are made from the loss's own clean pass on the variables frozen (no
  gradient flows through PGD), unless `x_adv` gives them (a second gradient in the
  same step).
  """
  method = settings.method
  keys = step_keys(settings.seed, state.step)
  x = data.augment(keys['augment'], batch['image'])
  y = batch['label']

  def loss_fn(params, perturb):
    variables = {'params': params, 'perturb': perturb, 'batch_stats': state.batch_stats}

    def forward(variables, inputs, name):
      return models.model_apply(model, variables, True, phase.noise)(inputs, keys[name])

    clean_logits, updates = forward(variables, x, 'clean')
    adv_logits, examples = None, x_adv
    if phase.adversarial:
      if examples is None:
        frozen, clean = jax.lax.stop_gradient((variables, (clean_logits, updates['batch_stats'])))
        examples = adversarial_examples(
          frozen, *clean, x, y, keys['pgd'], phase=phase, model=model, settings=settings
        )
      # A loss of the adversarial term alone (Adv-BNN's code) runs only the
      # adversarial batch through the network: its statistics alone move BatchNorm's.
      if settings.clean_weight > 0:
        variables = {**variables, 'batch_stats': updates['batch_stats']}
      adv_logits, updates = forward(variables, examples, 'adv')
    loss = objectives.mixed_loss(
      clean_logits, adv_logits, y, settings.clean_weight, settings.adv_weight
    )
    if method.loss_term is not None:
      loss += method.loss_term(params, perturb, settings)
    objective = loss
    if method.regularizer is not None:
      objective = loss - reg_weight * method.regularizer.value(perturb)
    return objective, StepAux(loss, updates['batch_stats'], clean_logits, examples)

  return loss_fn


def update_rule(settings: StepSettings, phase: Phase) -> UpdateRule:
  """The method's update in `phase`: its own while its noise parameters train (L2P's
  alternation), the joint update otherwise."""
  if phase.train_perturb and settings.method.noise_update is not None:
    return settings.method.noise_update(settings)
  return functools.partial(joint_update, train_perturb=phase.train_perturb)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  lr: jax.Array,
  reg_weight: jax.Array,
  *,
  phase: Phase,
  model: models.ResNet,
  settings: StepSettings,
  optimizers: dict,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One training iteration of the method in `phase` on a uint8 batch: (the new state,
  its metrics: the loss at the iteration's first pass, clean examples right, examples
  seen, whether loss and state are finite, and the step's index)."""
  step = functools.partial(descend, lr=lr, optimizers=optimizers, theta_floor=settings.theta_floor)
  loss_at = functools.partial(
    step_loss_fn, batch=batch, phase=phase, model=model, settings=settings
  )
  new, aux = update_rule(settings, phase)(state, loss_at, step, reg_weight)
  new = new.replace(step=state.step + 1, batch_stats=aux.batch_stats)
  # NaN weights can give finite logits (XLA:CPU did), so the state is checked too.
  finite = jnp.isfinite(aux.loss) & all_finite(
    (new.params, new.perturb, new.opt_state, aux.batch_stats)
  )
  metrics = {
    'loss': aux.loss,
    'correct': jnp.sum(jnp.argmax(aux.clean_logits, -1) == batch['label']),
    'count': jnp.asarray(batch['label'].shape[0], jnp.int32),
    'finite': finite,
    'step': state.step,
  }
  return new, metrics


def all_finite(tree: Any) -> jax.Array:
  """True when no leaf of `tree` holds a NaN or an infinity."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step_on_split(
  state: TrainState,
  split: dict[str, jax.Array],
  order: jax.Array,
  epoch_start: jax.Array,
  lr: jax.Array,
  reg_weight: jax.Array,
  *,
  batch_size: int,
  batch_sharding: jax.sharding.Sharding,
  **step_kwargs,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` on batch `state.step - epoch_start` of the epoch ordered by `order`,
  gathered from a split kept on the device, so a step needs nothing from the host."""
  batch = data.take_train_batch(split, order, state.step - epoch_start, batch_size)
  batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
  return train_step(state, batch, lr, reg_weight, **step_kwargs)


def accumulating(step_fn):
  """`step_fn` (a train step) as (state, epoch metrics, *inputs) -> (state, epoch
  metrics with the step's added): the loop's jitted step."""

  def step_and_add(state, epoch_metrics, *args, **kwargs):
    state, metrics = step_fn(state, *args, **kwargs)
    return state, epoch_metrics.add(metrics)

  return step_and_add


def eval_step(
  variables: dict[str, Any],
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  noise: bool,
  model: models.ResNet,
  settings: StepSettings,
) -> tuple[jax.Array, jax.Array]:
  """Correct predictions on clean and PGD inputs of a masked batch (one noise draw,
  BatchNorm running statistics, true labels)."""
  x, y, mask = data.to_float(batch['image']), batch['label'], batch['mask']
  clean_key, pgd_key, adv_key = jax.random.split(key, 3)
  logits_fn = models.inference_logits(model, variables, noise)

  x_adv = pgd_attack(settings, settings.eval_pgd_steps)(logits_fn, pgd_key, x, y).x_adv
  clean = jnp.argmax(logits_fn(x, clean_key), -1) == y
  robust = jnp.argmax(logits_fn(x_adv, adv_key), -1) == y
  return jnp.sum(clean & mask), jnp.sum(robust & mask)
