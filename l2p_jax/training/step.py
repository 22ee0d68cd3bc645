"""The train state and the jitted steps of the five methods: one training iteration
per phase (clean or adversarial, noise on or off) and the per-epoch evaluation step.

As in Flax's examples, a step is one loss function of (params, perturb)
(`step_loss_fn`), differentiated with `jax.value_and_grad` by the method's update rule
(`joint_update`, `l2p_paper_update`, `l2p_code_update`), and `train_step` returns
(state, metrics); the loop sums the metrics of an epoch in `EpochMetrics`.

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
import numpy as np

from l2p_jax import attacks, data, models
from l2p_jax.training import objectives, optim

# Streams folded into the root key, so no two uses of the seed share random numbers.
INIT_STREAM, TRAIN_STREAM, EVAL_STREAM = 0, 1, 2


@flax.struct.dataclass
class TrainState:
  """The variables, the optimizer states and the step count: what a step updates."""

  step: jax.Array
  params: Any
  perturb: Any
  batch_stats: Any
  opt_state: Any  # {'params': ..., 'perturb': ...}, one optax state per collection.

  @property
  def variables(self) -> dict[str, Any]:
    return {'params': self.params, 'perturb': self.perturb, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class EpochMetrics:
  """The current epoch's step metrics summed so far, checkpointed beside the state so
  a resumed epoch reports what an uninterrupted one would."""

  loss_sum: jax.Array  # Sum of step losses.
  correct_sum: jax.Array  # Clean training examples classified right.
  seen: jax.Array  # Training examples seen.
  nonfinite_step: jax.Array  # First step with a non-finite loss or state, -1 if none.

  @classmethod
  def empty(cls) -> EpochMetrics:
    """No step yet (NumPy values, for the loop to place on its mesh)."""
    return cls(np.float32(0), np.int32(0), np.int32(0), np.int32(-1))

  def add(self, metrics: dict[str, jax.Array]) -> EpochMetrics:
    """These sums with one more step's `metrics` (as `train_step` returns them)."""
    nonfinite = (self.nonfinite_step < 0) & ~metrics['finite']
    return EpochMetrics(
      loss_sum=self.loss_sum + metrics['loss'],
      correct_sum=self.correct_sum + metrics['correct'],
      seen=self.seen + metrics['count'],
      nonfinite_step=jnp.where(nonfinite, metrics['step'], self.nonfinite_step),
    )


def checkpoint_tree(state: TrainState, metrics: EpochMetrics) -> dict[str, Any]:
  """The state's and the epoch metrics' fields as the one dict a checkpoint holds (the
  layout of the checkpoints written when the sums were fields of the state)."""
  return {
    f.name: getattr(tree, f.name) for tree in (state, metrics) for f in dataclasses.fields(tree)
  }


def from_checkpoint_tree(tree: dict[str, Any]) -> tuple[TrainState, EpochMetrics]:
  """`checkpoint_tree`'s inverse: (state, epoch metrics)."""
  fields = lambda cls: {f.name: tree[f.name] for f in dataclasses.fields(cls)}
  return TrainState(**fields(TrainState)), EpochMetrics(**fields(EpochMetrics))


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


def epoch_schedule(config: ml_collections.ConfigDict, epoch: int) -> tuple[Phase, float, float]:
  """(phase, learning rate, regularizer weight) of every step of `epoch`."""
  lr = optim.learning_rate(
    epoch, config.optim.learning_rate, config.optim.lr_boundaries, config.optim.lr_decay
  )
  return phase_for_epoch(config, epoch), lr, regularizer_weight(config, epoch)


def create_train_state(
  model: models.ResNet, optimizers: dict, key: jax.Array, image_shape: tuple[int, ...]
) -> TrainState:
  """Initial variables (from `key`) and optimizer states."""
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


def train_forward(
  model: models.ResNet, variables: dict[str, Any], x: jax.Array, key: jax.Array, noise: bool
) -> tuple[jax.Array, dict[str, Any]]:
  """(logits, BatchNorm updates) of the model in training mode (batch statistics)."""
  return model.apply(
    variables, x, train=True, noise=noise, rngs={'noise': key}, mutable=['batch_stats']
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
  config: ml_collections.ConfigDict,
) -> jax.Array:
  """The step's PGD examples on the `frozen` variables, given the clean pass there (its
  logits are the targets under adv.labels=prediction).

  The model attacked is in training mode with BatchNorm statistics left alone, or
  (adv.attack_batchnorm=running, as the authors' codes) in eval mode with the running
  statistics as the step's passes so far left them: after the clean pass (L2P's and
  PNI's code), or as the step found them when the loss has no clean term (Adv-BNN's
  code attacks first).
  """
  if config.adv.attack_batchnorm == 'running':
    if config.adv.clean_weight > 0:
      frozen = {**frozen, 'batch_stats': clean_batch_stats}
    logits_fn = models.inference_logits(model, frozen, phase.noise)
  else:
    logits_fn = lambda inputs, key: train_forward(model, frozen, inputs, key, phase.noise)[0]
  target = y if config.adv.labels == 'true' else jnp.argmax(clean_logits, axis=-1)
  return pgd_attack(config, config.adv.steps)(logits_fn, key, x, target).x_adv


def step_loss_fn(
  state: TrainState,
  batch: dict[str, jax.Array],
  reg_weight: jax.Array,
  *,
  phase: Phase,
  model: models.ResNet,
  config: ml_collections.ConfigDict,
  kl_weight: float,
  x_adv: jax.Array | None = None,
):
  """The loss of training step `state.step` as a function of (params, perturb).

  loss_fn(params, perturb) -> (objective, (loss, batch_stats, clean_logits, x_adv)):
  the objective is the training loss (the 0.5/0.5 mix of clean and PGD cross-entropies,
  plus Adv-BNN's KL) minus `reg_weight` times L2P's regularizer. Augmentation and noise
  draws are fixed by the step's keys. In an adversarial phase the PGD examples are made
  from the loss's own clean pass on the variables frozen (no gradient flows through
  PGD), unless `x_adv` gives them (a second gradient in the same step).
  """
  keys = step_keys(config.seed, state.step)
  x = data.augment(keys['augment'], batch['image'])
  y = batch['label']

  def loss_fn(params, perturb):
    variables = {'params': params, 'perturb': perturb, 'batch_stats': state.batch_stats}
    clean_logits, updates = train_forward(model, variables, x, keys['clean'], phase.noise)
    adv_logits, examples = None, x_adv
    if phase.adversarial:
      if examples is None:
        frozen, clean = jax.lax.stop_gradient((variables, (clean_logits, updates['batch_stats'])))
        examples = adversarial_examples(
          frozen, *clean, x, y, keys['pgd'], phase=phase, model=model, config=config
        )
      # A loss of the adversarial term alone (Adv-BNN's code) runs only the
      # adversarial batch through the network: its statistics alone move BatchNorm's.
      if config.adv.clean_weight > 0:
        variables = {**variables, 'batch_stats': updates['batch_stats']}
      adv_logits, updates = train_forward(model, variables, examples, keys['adv'], phase.noise)
    loss = objectives.mixed_loss(
      clean_logits, adv_logits, y, config.adv.clean_weight, config.adv.adv_weight
    )
    if config.method == 'adv_bnn':
      loss += kl_weight * models.bayes_kl(
        params, perturb, config.bnn.prior_sigma, config.bnn.kl_scope
      )
    objective = loss - reg_weight * objectives.l2p_regularizer(perturb)
    return objective, (loss, updates['batch_stats'], clean_logits, examples)

  return loss_fn


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


def joint_update(state: TrainState, loss_at, step, reg_weight, *, train_perturb: bool):
  """Both collections step on one gradient of the loss (every method; the noise
  parameters only while they are trained). Returns (state, loss aux)."""
  grad_fn = jax.value_and_grad(loss_at(state, reg_weight=reg_weight), argnums=(0, 1), has_aux=True)
  (_, aux), (g_params, g_perturb) = grad_fn(state.params, state.perturb)
  state = step(state, 'params', g_params)
  if train_perturb:
    state = step(state, 'perturb', g_perturb)
  return state, aux


def l2p_paper_update(state: TrainState, loss_at, step, reg_weight):
  """The paper's alternating back-propagation: theta steps with W fixed, then W with
  the new theta fixed, both on the loss minus the regularizer and the same PGD
  examples. Returns (state, aux of the first pass with the second's BatchNorm
  statistics)."""
  loss_fn = loss_at(state, reg_weight=reg_weight)
  (_, aux), (_, g_perturb) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
    state.params, state.perturb
  )
  state = step(state, 'perturb', g_perturb)
  loss_fn = loss_at(state, reg_weight=reg_weight, x_adv=aux[3])
  (_, (_, batch_stats, *_)), (g_params, _) = jax.value_and_grad(
    loss_fn, argnums=(0, 1), has_aux=True
  )(state.params, state.perturb)
  state = step(state, 'params', g_params)
  return state, (aux[0], batch_stats, *aux[2:])


def l2p_code_update(state: TrainState, loss_at, step, reg_weight):
  """The authors' code: a theta step on the regularizer alone, then (at the new
  theta) PGD and a joint step on the loss without it. Returns (state, loss aux)."""
  g_reg = jax.grad(lambda p: -reg_weight * objectives.l2p_regularizer(p))(state.perturb)
  state = step(state, 'perturb', g_reg)
  return joint_update(state, loss_at, step, 0.0, train_perturb=True)


def update_rule(config: ml_collections.ConfigDict, phase: Phase):
  """The update of `config.method` in `phase`: L2P's alternation while its noise is
  trained, the joint update otherwise."""
  if config.method == 'l2p' and phase.train_perturb:
    return l2p_paper_update if config.l2p.alternation == 'paper' else l2p_code_update
  return functools.partial(joint_update, train_perturb=phase.train_perturb)


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
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One training iteration of `config.method` in `phase` on a uint8 batch: (the new
  state, its metrics: the loss at the iteration's first pass, clean examples right,
  examples seen, whether loss and state are finite, and the step's index)."""
  step = functools.partial(
    descend, lr=lr, optimizers=optimizers, theta_floor=config.l2p.theta_floor
  )
  loss_at = functools.partial(
    step_loss_fn, batch=batch, phase=phase, model=model, config=config, kl_weight=kl_weight
  )
  new, (loss, batch_stats, clean_logits, _) = update_rule(config, phase)(
    state, loss_at, step, reg_weight
  )
  new = new.replace(step=state.step + 1, batch_stats=batch_stats)
  # NaN weights can give finite logits (XLA:CPU did), so the state is checked too.
  finite = jnp.isfinite(loss) & all_finite((new.params, new.perturb, new.opt_state, batch_stats))
  metrics = {
    'loss': loss,
    'correct': jnp.sum(jnp.argmax(clean_logits, -1) == batch['label']),
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
