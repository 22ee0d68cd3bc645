"""The train state and the jitted steps of the five methods: one training iteration
per phase (clean or adversarial, noise on or off) and the per-epoch evaluation step.

Everything random is a pure function of (config.seed, step): a run resumed from a
checkpoint continues bit-identically to one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from l2p_jax import attacks, data, models, objectives, optim

# Streams folded into the root key, so no two uses of the seed share random numbers.
INIT_STREAM, TRAIN_STREAM, EVAL_STREAM = 0, 1, 2


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes, and all a checkpoint needs to resume."""

  step: jax.Array
  params: Any
  perturb: Any
  batch_stats: Any
  opt_state: Any  # {'params': ..., 'perturb': ...}, one optax state per collection.
  loss_sum: jax.Array  # Sum of step losses in the current epoch.
  correct_sum: jax.Array  # Clean training examples classified right this epoch.
  seen: jax.Array  # Training examples seen this epoch.
  nonfinite_step: jax.Array  # First step with a non-finite loss, -1 if none.

  @property
  def variables(self) -> dict[str, Any]:
    return {'params': self.params, 'perturb': self.perturb, 'batch_stats': self.batch_stats}


@dataclasses.dataclass(frozen=True)
class Phase:
  """What changes between epochs and changes the compiled step."""

  noise: bool  # Noise layers draw noise.
  adversarial: bool  # The loss includes PGD examples.
  train_perturb: bool  # The perturb collection is updated.


def phase_for_epoch(config: ml_collections.ConfigDict, epoch: int) -> Phase:
  """Noise on from l2p.noise_start_epoch for L2P (always for PNI and Adv-BNN), PGD
  examples from adv.start_epoch, noise parameters trained while noise is on."""
  has_noise = config.method in models.RANDOMIZED_METHODS
  noise = has_noise and (config.method != 'l2p' or epoch >= config.l2p.noise_start_epoch)
  adversarial = config.adv.start_epoch >= 0 and epoch >= config.adv.start_epoch
  return Phase(noise=noise, adversarial=adversarial, train_perturb=noise)


def regularizer_weight(config: ml_collections.ConfigDict, epoch: int) -> float:
  """gamma / tau(t) for L2P once noise is on, else 0."""
  if config.method != 'l2p' or epoch < config.l2p.noise_start_epoch:
    return 0.0
  return config.l2p.gamma / objectives.harmonic_tau(epoch, config.l2p.noise_start_epoch)


def create_train_state(
  model: models.ResNet, optimizers: dict, key: jax.Array, image_shape: tuple[int, ...]
) -> TrainState:
  """Initial variables (from `key`) and optimizer states, with empty epoch sums."""
  params_key, noise_key = jax.random.split(key)
  variables = model.init(
    {'params': params_key, 'noise': noise_key}, jnp.zeros((1, *image_shape), jnp.float32)
  )
  perturb = variables.get('perturb', {})
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables['params'],
    perturb=perturb,
    batch_stats=variables['batch_stats'],
    opt_state={
      'params': optimizers['params'].init(variables['params']),
      'perturb': optimizers['perturb'].init(perturb),
    },
    loss_sum=jnp.zeros((), jnp.float32),
    correct_sum=jnp.zeros((), jnp.int32),
    seen=jnp.zeros((), jnp.int32),
    nonfinite_step=-jnp.ones((), jnp.int32),
  )


def reset_epoch_sums(state: TrainState) -> TrainState:
  """Zeroes the per-epoch accumulators at the start of an epoch."""
  return state.replace(
    loss_sum=jnp.zeros_like(state.loss_sum),
    correct_sum=jnp.zeros_like(state.correct_sum),
    seen=jnp.zeros_like(state.seen),
  )


def restart_optimizers(state: TrainState, optimizers: dict) -> TrainState:
  """Fresh optimizer states for both collections (Adv-BNN's code makes a new Adam
  at every learning-rate stage); the variables stay as they are."""
  return state.replace(
    opt_state={c: optimizers[c].init(getattr(state, c)) for c in ('params', 'perturb')}
  )


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


def pgd_attack(config: ml_collections.ConfigDict, steps: int):
  """The configured L-inf PGD with `steps` steps, as a function of (logits_fn, key, x, y)."""
  return functools.partial(
    attacks.pgd,
    eps=config.adv.eps,
    steps=steps,
    step_size=config.adv.step_size,
    random_start=config.adv.random_start,
    unroll=True if config.adv.unroll else 1,
  )


@dataclasses.dataclass(frozen=True)
class StepObjective:
  """The objective of one training step and a cheaper way to its gradient.

  objective(params, perturb) -> (total, aux): the training loss minus L2P's
    regularizer; aux is (training loss, updated batch_stats, clean logits).
  gradients(params, perturb, clean=None) -> ((d/d params, d/d perturb), aux): the
    same as `jax.grad(objective, (0, 1), has_aux=True)`, assembled from the vjp of the
    clean forward pass and the gradient of the rest; `clean=first_clean` reuses the
    clean pass the PGD targets were read from, valid at the state's own variables.
  first_clean: (logits, vjp, batch_stats updates) of the clean pass at the state's
    variables.
  """

  objective: Any
  gradients: Any
  first_clean: Any


def step_objective(
  state: TrainState,
  batch: dict[str, jax.Array],
  reg_weight: jax.Array,
  *,
  phase: Phase,
  model: models.ResNet,
  config: ml_collections.ConfigDict,
  kl_weight: float,
) -> StepObjective:
  """The objective of training step `state.step` as a function of (params, perturb).

  Augmentation, noise draws and the PGD examples (made once, with the state's
  variables, the model in training mode, BatchNorm statistics left alone) are fixed
  by the step's keys. PGD attacks the prediction of the loss's own clean forward pass
  at the state's variables, so that pass runs once, not twice.
  """
  keys = step_keys(config.seed, state.step)
  x = data.augment(keys['augment'], batch['image'])
  y = batch['label']

  def forward(params, perturb, batch_stats, inputs, key):
    return model.apply(
      {'params': params, 'perturb': perturb, 'batch_stats': batch_stats},
      inputs,
      train=True,
      noise=phase.noise,
      rngs={'noise': key},
      mutable=['batch_stats'],
    )

  def clean_pass(params, perturb):
    return forward(params, perturb, state.batch_stats, x, keys['clean'])

  first_clean = jax.vjp(clean_pass, state.params, state.perturb, has_aux=True)
  x_adv = None
  if phase.adversarial:
    frozen = jax.lax.stop_gradient(state.variables)
    if config.adv.attack_batchnorm == 'running':
      # The codes attack in eval mode with the running statistics as the step's passes
      # so far left them: after the clean pass (L2P's and PNI's code), or as the step
      # found them when the loss has no clean term (Adv-BNN's code attacks first).
      if config.adv.clean_weight > 0:
        frozen = {**frozen, 'batch_stats': jax.lax.stop_gradient(first_clean[2]['batch_stats'])}
      logits_fn = models.inference_logits(model, frozen, phase.noise)
    else:
      logits_fn = lambda inputs, key: forward(  # noqa: E731
        frozen['params'], frozen['perturb'], frozen['batch_stats'], inputs, key
      )[0]
    target = y if config.adv.labels == 'true' else jnp.argmax(first_clean[0], axis=-1)
    x_adv = pgd_attack(config, config.adv.steps)(logits_fn, keys['pgd'], x, target).x_adv

  def rest(params, perturb, clean_logits, updates):
    adv_logits = None
    if x_adv is not None:
      # A loss of the adversarial term alone (Adv-BNN's code) runs only the
      # adversarial batch through the network: its statistics alone move BatchNorm's.
      stats = state.batch_stats if config.adv.clean_weight == 0 else updates['batch_stats']
      adv_logits, updates = forward(params, perturb, stats, x_adv, keys['adv'])
    loss = objectives.mixed_loss(
      clean_logits, adv_logits, y, config.adv.clean_weight, config.adv.adv_weight
    )
    if config.method == 'adv_bnn':
      loss += kl_weight * models.bayes_kl(
        params, perturb, config.bnn.prior_sigma, config.bnn.kl_scope
      )
    total = loss - reg_weight * objectives.l2p_regularizer(perturb)
    return total, (loss, updates['batch_stats'], clean_logits)

  def objective(params, perturb):
    return rest(params, perturb, *clean_pass(params, perturb))

  def gradients(params, perturb, clean=None):
    logits, pullback, updates = clean or jax.vjp(clean_pass, params, perturb, has_aux=True)
    (g_params, g_perturb, g_logits), aux = jax.grad(rest, argnums=(0, 1, 2), has_aux=True)(
      params, perturb, logits, updates
    )
    c_params, c_perturb = pullback(g_logits)
    return (
      jax.tree.map(jnp.add, g_params, c_params),
      jax.tree.map(jnp.add, g_perturb, c_perturb),
    ), aux

  return StepObjective(objective, gradients, first_clean)


def descend(
  state: TrainState,
  collection: str,
  grads: Any,
  lr: jax.Array,
  optimizers: dict,
  theta_floor: float,
) -> TrainState:
  """One SGD update of one collection ('params' or 'perturb'); the other collection
  and its optimizer state stay exactly as they were. L2P maps are floored after."""
  variables, opt_state = optim.update(
    optimizers[collection], grads, state.opt_state[collection], getattr(state, collection), lr
  )
  if collection == 'perturb':
    variables = models.project_perturb(variables, theta_floor)
  return state.replace(
    **{collection: variables}, opt_state={**state.opt_state, collection: opt_state}
  )


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  lr: jax.Array,
  reg_weight: jax.Array,
  *,
  phase: Phase,
  model: models.ResNet,
  config: ml_collections.ConfigDict,
  optimizers: dict,
  kl_weight: float,
) -> TrainState:
  """One training iteration of `config.method` in `phase` on a uint8 batch."""
  step = functools.partial(
    descend, lr=lr, optimizers=optimizers, theta_floor=config.l2p.theta_floor
  )
  start = state
  l2p_noise = config.method == 'l2p' and phase.train_perturb
  paper = l2p_noise and config.l2p.alternation == 'paper'
  if l2p_noise and not paper:
    # The authors' code: a theta step on the regularizer alone, then (at the new
    # theta) the clean pass, PGD and a joint step on the loss without it.
    g_reg = jax.grad(lambda p: -reg_weight * objectives.l2p_regularizer(p))(state.perturb)
    state = step(state, 'perturb', g_reg)
  objective = step_objective(
    state,
    batch,
    reg_weight if paper else 0.0,
    phase=phase,
    model=model,
    config=config,
    kl_weight=kl_weight,
  )
  grad = objective.gradients
  if paper:
    # Alternating back-propagation: theta with W fixed, then W with the new theta.
    (_, g_perturb), aux = grad(state.params, state.perturb, objective.first_clean)
    state = step(state, 'perturb', g_perturb)
    (g_params, _), (_, batch_stats, _) = grad(state.params, state.perturb)
    state = step(state, 'params', g_params)
  else:
    (g_params, g_perturb), aux = grad(state.params, state.perturb, objective.first_clean)
    batch_stats = aux[1]
    state = step(state, 'params', g_params)
    if phase.train_perturb:
      state = step(state, 'perturb', g_perturb)
  loss, _, clean_logits = aux  # Reported: the loss at the iteration's first pass.
  correct = jnp.sum(jnp.argmax(clean_logits, -1) == batch['label'])
  # NaN weights can give finite logits (XLA:CPU did), so the state is checked too.
  finite = jnp.isfinite(loss) & all_finite(
    (state.params, state.perturb, state.opt_state, batch_stats)
  )
  nonfinite = (start.nonfinite_step < 0) & ~finite
  return state.replace(
    step=start.step + 1,
    batch_stats=batch_stats,
    loss_sum=start.loss_sum + loss,
    correct_sum=start.correct_sum + correct,
    seen=start.seen + batch['label'].shape[0],
    nonfinite_step=jnp.where(nonfinite, start.step, start.nonfinite_step),
  )


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
) -> TrainState:
  """`train_step` on batch `state.step - epoch_start` of the epoch ordered by `order`,
  gathered from a split kept on the device, so a step needs nothing from the host."""
  batch = data.take_train_batch(split, order, state.step - epoch_start, batch_size)
  batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
  return train_step(state, batch, lr, reg_weight, **step_kwargs)


def eval_step(
  variables: dict[str, Any],
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  noise: bool,
  model: models.ResNet,
  config: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array]:
  """Correct predictions on clean and PGD inputs of a masked batch (one noise draw,
  BatchNorm running statistics, true labels)."""
  x, y, mask = data.to_float(batch['image']), batch['label'], batch['mask']
  clean_key, pgd_key, adv_key = jax.random.split(key, 3)
  logits_fn = models.inference_logits(model, variables, noise)

  x_adv = pgd_attack(config, config.eval.pgd_steps)(logits_fn, pgd_key, x, y).x_adv
  clean = jnp.argmax(logits_fn(x, clean_key), -1) == y
  robust = jnp.argmax(logits_fn(x_adv, adv_key), -1) == y
  return jnp.sum(clean & mask), jnp.sum(robust & mask)
