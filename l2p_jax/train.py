"""Training of the five methods: the train state, one jitted step per training phase,
the per-epoch evaluation, and the loop with checkpoints, metrics and resume.

Everything random is a pure function of (config.seed, step): a run resumed from a
checkpoint continues bit-identically to one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import time
from typing import Any

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from l2p_jax import (attacks, checkpointing, data, locking, models, objectives, optim,
                     sharding)
from l2p_jax.metrics import MetricsWriter, read_metrics
from l2p_jax.plots import plot_noise_evolution

ADV_LABELS = ('prediction', 'true')
ATTACK_BATCHNORMS = ('batch', 'running')
ALTERNATIONS = ('paper', 'authors_code')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Streams folded into the root key, so no two uses of the seed share random numbers.
_INIT, _TRAIN, _EVAL = 0, 1, 2


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
    return {'params': self.params, 'perturb': self.perturb,
            'batch_stats': self.batch_stats}


@dataclasses.dataclass(frozen=True)
class Phase:
  """What changes between epochs and changes the compiled step."""
  noise: bool  # Noise layers draw noise.
  adversarial: bool  # The loss includes PGD examples.
  train_perturb: bool  # The perturb collection is updated.


class ConfigError(ValueError):
  """A config value no run can use."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for values no run can use, naming the field and what is accepted."""
  def check(ok, message):
    if not ok:
      raise ConfigError(message)
  check(config.method in models.METHODS,
        f'Unknown method {config.method!r}; expected one of {models.METHODS}.')
  try:
    models.resnet_layout(config.model.arch, config.model.width)
  except ValueError as error:
    raise ConfigError(f'model.arch={config.model.arch!r}, model.width='
                      f'{config.model.width}: {error}') from None
  check(config.optim.learning_rate > 0,
        f'optim.learning_rate must be positive, got {config.optim.learning_rate}.')
  check(config.model.dtype in DTYPES,
        f'Unknown model.dtype {config.model.dtype!r}; expected one of {tuple(DTYPES)}.')
  check(config.adv.labels in ADV_LABELS,
        f'Unknown adv.labels {config.adv.labels!r}; expected one of {ADV_LABELS}.')
  check(config.l2p.alternation in ALTERNATIONS,
        f'Unknown l2p.alternation {config.l2p.alternation!r}; expected one of '
        f'{ALTERNATIONS}.')
  check(config.method != 'none' or config.adv.start_epoch < 0,
        f'method=none trains on clean images only, but adv.start_epoch='
        f'{config.adv.start_epoch}; use method=vanilla for PGD training or set '
        'adv.start_epoch=-1.')
  check(config.method in ('none',) or config.adv.start_epoch >= 0,
        f'method={config.method} needs adversarial training, but adv.start_epoch='
        f'{config.adv.start_epoch}; use method=none for clean training.')
  check(config.adv.clean_weight >= 0 and config.adv.adv_weight >= 0 and
        config.adv.clean_weight + config.adv.adv_weight > 0,
        f'adv.clean_weight={config.adv.clean_weight} and adv.adv_weight='
        f'{config.adv.adv_weight} must be non-negative and not both zero.')
  check(config.num_epochs > 0, f'num_epochs must be positive, got {config.num_epochs}.')
  check(0 <= config.l2p.noise_start_epoch < config.num_epochs,
        f'l2p.noise_start_epoch={config.l2p.noise_start_epoch} must be in '
        f'[0, num_epochs={config.num_epochs}).')
  check(config.adv.eps >= 0 and config.adv.steps >= 1 and config.eval.pgd_steps >= 1,
        f'adv.eps={config.adv.eps} must be >= 0 and adv.steps={config.adv.steps}, '
        f'eval.pgd_steps={config.eval.pgd_steps} at least 1.')
  check(config.adv.attack_batchnorm in ATTACK_BATCHNORMS,
        f'Unknown adv.attack_batchnorm {config.adv.attack_batchnorm!r}; expected one of '
        f'{ATTACK_BATCHNORMS}.')
  check(config.optim.optimizer in optim.OPTIMIZERS,
        f'Unknown optim.optimizer {config.optim.optimizer!r}; expected one of '
        f'{optim.OPTIMIZERS}.')
  check(config.bnn.prior_sigma > 0 and config.model.bnn_init_sigma > 0,
        f'bnn.prior_sigma={config.bnn.prior_sigma} and model.bnn_init_sigma='
        f'{config.model.bnn_init_sigma} must be positive.')
  check(config.bnn.kl_scope in models.KL_SCOPES,
        f'Unknown bnn.kl_scope {config.bnn.kl_scope!r}; expected one of '
        f'{models.KL_SCOPES}.')
  check(config.model.bnn_mean_init in models.BAYES_MEAN_INITS,
        f'Unknown model.bnn_mean_init {config.model.bnn_mean_init!r}; expected one of '
        f'{models.BAYES_MEAN_INITS}.')
  check(config.bnn.kl_alpha >= 0 and (config.bnn.kl_examples is None
                                      or config.bnn.kl_examples > 0),
        f'bnn.kl_alpha={config.bnn.kl_alpha} must be >= 0 and bnn.kl_examples='
        f'{config.bnn.kl_examples} positive (or None for the training split\'s size).')
  for name in ('checkpoint_every_steps', 'log_every_steps', 'keep_checkpoints'):
    check(config[name] > 0, f'{name} must be positive, got {config[name]}.')


def phase_for_epoch(config: ml_collections.ConfigDict, epoch: int) -> Phase:
  """Noise on from l2p.noise_start_epoch for L2P (always for PNI and Adv-BNN), PGD
  examples from adv.start_epoch, noise parameters trained while noise is on."""
  has_noise = config.method in ('l2p', 'pni', 'adv_bnn')
  noise = has_noise and (config.method != 'l2p'
                         or epoch >= config.l2p.noise_start_epoch)
  adversarial = config.adv.start_epoch >= 0 and epoch >= config.adv.start_epoch
  return Phase(noise=noise, adversarial=adversarial, train_perturb=noise)


def regularizer_weight(config: ml_collections.ConfigDict, epoch: int) -> float:
  """gamma / tau(t) for L2P once noise is on, else 0."""
  if config.method != 'l2p' or epoch < config.l2p.noise_start_epoch:
    return 0.0
  return config.l2p.gamma / objectives.harmonic_tau(epoch, config.l2p.noise_start_epoch)


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                mean: Any, std: Any) -> models.ResNet:
  """The network of `config.method` and `config.model`, normalizing with mean/std."""
  m = config.model
  return models.create_model(
      m.arch, num_classes, config.method, width=m.width, mean=tuple(mean),
      std=tuple(std), l2p_init=m.l2p_init, l2p_per_example=m.l2p_per_example,
      pni_mode=m.pni_mode, pni_init=m.pni_init, bnn_init_sigma=m.bnn_init_sigma,
      bnn_mean_init=m.get('bnn_mean_init', 'kaiming_normal'),
      bnn_batchnorm=m.get('bnn_batchnorm', False), dtype=DTYPES[m.dtype])


def create_train_state(model: models.ResNet, optimizers: dict, key: jax.Array,
                       image_shape: tuple[int, ...]) -> TrainState:
  """Initial variables (from `key`) and optimizer states, with empty epoch sums."""
  params_key, noise_key = jax.random.split(key)
  variables = model.init({'params': params_key, 'noise': noise_key},
                         jnp.zeros((1, *image_shape), jnp.float32))
  perturb = variables.get('perturb', {})
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'], perturb=perturb,
      batch_stats=variables['batch_stats'],
      opt_state={'params': optimizers['params'].init(variables['params']),
                 'perturb': optimizers['perturb'].init(perturb)},
      loss_sum=jnp.zeros((), jnp.float32), correct_sum=jnp.zeros((), jnp.int32),
      seen=jnp.zeros((), jnp.int32), nonfinite_step=-jnp.ones((), jnp.int32))


def reset_epoch_sums(state: TrainState) -> TrainState:
  """Zeroes the per-epoch accumulators at the start of an epoch."""
  return state.replace(loss_sum=jnp.zeros_like(state.loss_sum),
                       correct_sum=jnp.zeros_like(state.correct_sum),
                       seen=jnp.zeros_like(state.seen))


def restart_optimizers(state: TrainState, optimizers: dict) -> TrainState:
  """Fresh optimizer states for both collections (Adv-BNN's code makes a new Adam
  at every learning-rate stage); the variables stay as they are."""
  return state.replace(opt_state={c: optimizers[c].init(getattr(state, c))
                                  for c in ('params', 'perturb')})


def kl_loss_weight(config: ml_collections.ConfigDict, train_split_size: int) -> float:
  """alpha / N of Adv-BNN's loss, N the whole training split's size unless
  bnn.kl_examples names another (a subset run keeps the full run's prior)."""
  return config.bnn.kl_alpha / (config.bnn.kl_examples or train_split_size)


def step_keys(seed: int, step: jax.Array) -> dict[str, jax.Array]:
  """The keys of training step `step`: augmentation, clean noise, PGD, adversarial noise."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _TRAIN), step)
  return {name: jax.random.fold_in(key, i)
          for i, name in enumerate(('augment', 'clean', 'pgd', 'adv'))}


def pgd_attack(config: ml_collections.ConfigDict, steps: int):
  """The configured L-inf PGD with `steps` steps, as a function of (logits_fn, key, x, y)."""
  return functools.partial(
      attacks.pgd, eps=config.adv.eps, steps=steps, step_size=config.adv.step_size,
      random_start=config.adv.random_start, unroll=True if config.adv.unroll else 1)


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


def step_objective(state: TrainState, batch: dict[str, jax.Array],
                   reg_weight: jax.Array, *, phase: Phase, model: models.ResNet,
                   config: ml_collections.ConfigDict, kl_weight: float) -> StepObjective:
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
    return model.apply({'params': params, 'perturb': perturb,
                        'batch_stats': batch_stats}, inputs, train=True,
                       noise=phase.noise, rngs={'noise': key},
                       mutable=['batch_stats'])

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
        frozen = {**frozen, 'batch_stats': jax.lax.stop_gradient(
            first_clean[2]['batch_stats'])}
      logits_fn = lambda inputs, key: model.apply(  # noqa: E731
          frozen, inputs, train=False, noise=phase.noise, rngs={'noise': key})
    else:
      logits_fn = lambda inputs, key: forward(  # noqa: E731
          frozen['params'], frozen['perturb'], frozen['batch_stats'], inputs, key)[0]
    target = y if config.adv.labels == 'true' else jnp.argmax(first_clean[0], axis=-1)
    x_adv = pgd_attack(config, config.adv.steps)(
        logits_fn, keys['pgd'], x, target).x_adv

  def rest(params, perturb, clean_logits, updates):
    adv_logits = None
    if x_adv is not None:
      # A loss of the adversarial term alone (Adv-BNN's code) runs only the
      # adversarial batch through the network: its statistics alone move BatchNorm's.
      stats = (state.batch_stats if config.adv.clean_weight == 0
               else updates['batch_stats'])
      adv_logits, updates = forward(params, perturb, stats, x_adv, keys['adv'])
    loss = objectives.mixed_loss(clean_logits, adv_logits, y,
                                 config.adv.clean_weight, config.adv.adv_weight)
    if config.method == 'adv_bnn':
      loss += kl_weight * models.bayes_kl(params, perturb, config.bnn.prior_sigma,
                                          config.bnn.kl_scope)
    total = loss - reg_weight * objectives.l2p_regularizer(perturb)
    return total, (loss, updates['batch_stats'], clean_logits)

  def objective(params, perturb):
    return rest(params, perturb, *clean_pass(params, perturb))

  def gradients(params, perturb, clean=None):
    logits, pullback, updates = clean or jax.vjp(clean_pass, params, perturb,
                                                 has_aux=True)
    (g_params, g_perturb, g_logits), aux = jax.grad(
        rest, argnums=(0, 1, 2), has_aux=True)(params, perturb, logits, updates)
    c_params, c_perturb = pullback(g_logits)
    return (jax.tree.map(jnp.add, g_params, c_params),
            jax.tree.map(jnp.add, g_perturb, c_perturb)), aux

  return StepObjective(objective, gradients, first_clean)


def descend(state: TrainState, collection: str, grads: Any, lr: jax.Array,
            optimizers: dict, theta_floor: float) -> TrainState:
  """One SGD update of one collection ('params' or 'perturb'); the other collection
  and its optimizer state stay exactly as they were. L2P maps are floored after."""
  variables, opt_state = optim.update(optimizers[collection], grads,
                                      state.opt_state[collection],
                                      getattr(state, collection), lr)
  if collection == 'perturb':
    variables = models.project_perturb(variables, theta_floor)
  return state.replace(**{collection: variables},
                       opt_state={**state.opt_state, collection: opt_state})


def train_step(state: TrainState, batch: dict[str, jax.Array], lr: jax.Array,
               reg_weight: jax.Array, *, phase: Phase, model: models.ResNet,
               config: ml_collections.ConfigDict, optimizers: dict,
               kl_weight: float) -> TrainState:
  """One training iteration of `config.method` in `phase` on a uint8 batch."""
  step = functools.partial(descend, lr=lr, optimizers=optimizers,
                           theta_floor=config.l2p.theta_floor)
  start = state
  l2p_noise = config.method == 'l2p' and phase.train_perturb
  paper = l2p_noise and config.l2p.alternation == 'paper'
  if l2p_noise and not paper:
    # The authors' code: a theta step on the regularizer alone, then (at the new
    # theta) the clean pass, PGD and a joint step on the loss without it.
    g_reg = jax.grad(lambda p: -reg_weight * objectives.l2p_regularizer(p))(
        state.perturb)
    state = step(state, 'perturb', g_reg)
  objective = step_objective(state, batch, reg_weight if paper else 0.0, phase=phase,
                             model=model, config=config, kl_weight=kl_weight)
  grad = objective.gradients
  if paper:
    # Alternating back-propagation: theta with W fixed, then W with the new theta.
    (_, g_perturb), aux = grad(state.params, state.perturb, objective.first_clean)
    state = step(state, 'perturb', g_perturb)
    (g_params, _), (_, batch_stats, _) = grad(state.params, state.perturb)
    state = step(state, 'params', g_params)
  else:
    (g_params, g_perturb), aux = grad(state.params, state.perturb,
                                      objective.first_clean)
    batch_stats = aux[1]
    state = step(state, 'params', g_params)
    if phase.train_perturb:
      state = step(state, 'perturb', g_perturb)
  loss, _, clean_logits = aux  # Reported: the loss at the iteration's first pass.
  correct = jnp.sum(jnp.argmax(clean_logits, -1) == batch['label'])
  # NaN weights can give finite logits (XLA:CPU did), so the state is checked too.
  finite = jnp.isfinite(loss) & all_finite(
      (state.params, state.perturb, state.opt_state, batch_stats))
  nonfinite = (start.nonfinite_step < 0) & ~finite
  return state.replace(
      step=start.step + 1, batch_stats=batch_stats,
      loss_sum=start.loss_sum + loss, correct_sum=start.correct_sum + correct,
      seen=start.seen + batch['label'].shape[0],
      nonfinite_step=jnp.where(nonfinite, start.step, start.nonfinite_step))


def all_finite(tree: Any) -> jax.Array:
  """True when no leaf of `tree` holds a NaN or an infinity."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step_on_split(state: TrainState, split: dict[str, jax.Array],
                        order: jax.Array, epoch_start: jax.Array, lr: jax.Array,
                        reg_weight: jax.Array, *, batch_size: int,
                        batch_sharding: jax.sharding.Sharding, **step_kwargs) -> TrainState:
  """`train_step` on batch `state.step - epoch_start` of the epoch ordered by `order`,
  gathered from a split kept on the device, so a step needs nothing from the host."""
  batch = data.take_train_batch(split, order, state.step - epoch_start, batch_size)
  batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
  return train_step(state, batch, lr, reg_weight, **step_kwargs)


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array],
              key: jax.Array, *, noise: bool, model: models.ResNet,
              config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Correct predictions on clean and PGD inputs of a masked batch (one noise draw,
  BatchNorm running statistics, true labels)."""
  x, y, mask = data.to_float(batch['image']), batch['label'], batch['mask']
  clean_key, pgd_key, adv_key = jax.random.split(key, 3)

  def logits_fn(inputs, k):
    return model.apply(variables, inputs, train=False, noise=noise, rngs={'noise': k})

  x_adv = pgd_attack(config, config.eval.pgd_steps)(logits_fn, pgd_key, x, y).x_adv
  clean = jnp.argmax(logits_fn(x, clean_key), -1) == y
  robust = jnp.argmax(logits_fn(x_adv, adv_key), -1) == y
  return jnp.sum(clean & mask), jnp.sum(robust & mask)


def summarize(record: dict[str, Any]) -> str:
  """One console line for an epoch's record."""
  parts = [f"epoch {record['epoch'] + 1}", f"lr {record['learning_rate']:.4g}",
           f"loss {record['train_loss']:.4f}",
           f"train acc {record['train_accuracy']:.4f}"]
  if 'eval_clean_accuracy' in record:
    parts += [f"clean acc {record['eval_clean_accuracy']:.4f}",
              f"PGD acc {record['eval_pgd_accuracy']:.4f}"]
  if record['noise']:
    means = [v['mean'] for v in record['noise'].values()]
    parts.append(f'mean noise {sum(means) / len(means):.4f}')
  return ' | '.join(parts)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss, parameter or optimizer state."""


class TrainingInterrupted(RuntimeError):
  """The run was stopped by Ctrl-C (KeyboardInterrupt); it resumes from a checkpoint."""


def first_examples(split: data.HostSplit, n: int, field: str) -> data.HostSplit:
  """The first n examples of a split (all when n == 0)."""
  if n == 0:
    return split
  if not 0 < n <= split.num_examples:
    raise ConfigError(f'{field}={n} must be between 1 and the {split.num_examples} '
                     f'examples of {split.name}/{split.split} (0 means all).')
  return dataclasses.replace(split, images=split.images[:n], labels=split.labels[:n])


def load_data(config: ml_collections.ConfigDict
              ) -> tuple[data.HostSplit, data.HostSplit, int]:
  """The configured training and evaluation splits in host memory, and the size of
  the whole training split (before data.train_examples takes its first examples)."""
  d = config.data
  load = functools.partial(data.load_split, d.dataset, source=d.source,
                           data_dir=d.data_dir or None, local_dir=d.local_dir or None,
                           download=d.download)
  full_train = load(d.train_split)
  train = first_examples(full_train, d.train_examples, 'data.train_examples')
  evaluation = first_examples(load(d.eval_split), d.eval_examples,
                              'data.eval_examples')
  return train, evaluation, full_train.num_examples


# The constants of the PyTorch codes, for runs that must match them: the L2P code's
# std is the widespread (0.2023, 0.1994, 0.2010), not CIFAR-10's true pixel std.
CODE_NORMALIZATIONS = {
    'l2p_code': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'pni_code': (tuple(v / 255 for v in (125.3, 123.0, 113.9)),
                 tuple(v / 255 for v in (63.0, 62.1, 66.7))),
}


def normalization(config: ml_collections.ConfigDict,
                  split: data.HostSplit) -> tuple[list[float], list[float]]:
  """Per-channel mean and std for the model: by default the dataset's own (known
  values, else computed from the training split); or one of CODE_NORMALIZATIONS."""
  choice = config.data.normalization
  if choice in CODE_NORMALIZATIONS:
    mean, std = CODE_NORMALIZATIONS[choice]
  elif choice != 'dataset':
    raise ValueError(f'Unknown data.normalization {choice!r}; expected one of '
                     f"{('dataset', *CODE_NORMALIZATIONS)}.")
  elif config.data.dataset in data.KNOWN_CHANNEL_STATS:
    mean, std = data.KNOWN_CHANNEL_STATS[config.data.dataset]
  else:
    mean, std = data.channel_stats(split.images)
  if len(mean) != split.images.shape[-1]:
    raise ValueError(f'data.normalization={choice!r} has {len(mean)} channels but '
                     f'{split.name} images have {split.images.shape[-1]}.')
  return [float(v) for v in mean], [float(v) for v in std]


def evaluate(eval_fn, variables: dict[str, Any], split: data.HostSplit,
             mesh: jax.sharding.Mesh, batch_size: int, key: jax.Array) -> dict[str, float]:
  """Clean and PGD accuracy over a whole split, every example counted once."""
  clean = robust = 0
  batches = data.device_batches(mesh, data.eval_batches(split, batch_size))
  for i, batch in enumerate(batches):
    c, r = eval_fn(variables, batch, jax.random.fold_in(key, i))
    clean, robust = clean + c, robust + r
  n = split.num_examples
  return {'clean_accuracy': float(clean) / n, 'pgd_accuracy': float(robust) / n}


# Errors whose message is the whole story: train.py prints them without a traceback.
USER_ERRORS = (ConfigError, NonFiniteLossError, TrainingInterrupted,
               data.DatasetNotFoundError, data.DatasetFileError,
               checkpointing.CheckpointMismatchError,
               checkpointing.CheckpointUnreadableError, locking.WorkdirLockedError)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from the newest readable checkpoint there.

  Leaves config.json, checkpoints/, metrics.jsonl, tensorboard/ and (for randomized
  methods) noise_evolution.png in `workdir`; returns the final state. Process 0 holds
  the workdir's lock for the run; Ctrl-C raises TrainingInterrupted naming the step a
  rerun resumes from.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:  # The processes of one run share the workdir.
      stack.enter_context(locking.WorkdirLock(workdir))
    checkpoints = checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                            keep=config.keep_checkpoints)
    stack.callback(checkpoints.close)
    try:
      return _train_and_evaluate(config, workdir, checkpoints)
    except KeyboardInterrupt:
      checkpoints.wait()  # A save under way completes: the rerun starts from it.
      step = checkpoints.latest_step()
      raise TrainingInterrupted(
          'interrupted; rerun the same command to resume from ' +
          (f'step {step}.' if step is not None else 'the start (no checkpoint yet).')
      ) from None


def resume(checkpoints: checkpointing.Checkpoints, config: ml_collections.ConfigDict,
           state: TrainState, workdir: str) -> tuple[TrainState, int | None]:
  """The state of the newest readable checkpoint compatible with `config` (`state`
  itself, step None, when there is none) after refusing a config that changes what a
  step means and warning about (and recording) any other change.

  Unreadable newer checkpoints are moved to WORKDIR/unreadable_checkpoints/, so the
  resumed run can write those steps again.
  """
  if checkpoints.latest_step() is None:
    return state, None
  changes = []

  def check(meta: dict[str, Any], where: str) -> None:
    changes[:] = checkpointing.check_compatible(meta['config'], config, where)

  step, state, _, unreadable = checkpoints.restore_newest_readable(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                   state), check=check)
  if jax.process_index() == 0:
    for bad in unreadable:
      aside = os.path.join(workdir, 'unreadable_checkpoints', str(bad))
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(checkpoints.path(bad), aside)
      logging.warning('Moved the unreadable checkpoint %s to %s.', checkpoints.path(bad),
                      aside)
    tqdm.write(f'Resuming from {checkpoints.path(step)}.')
    if changes:
      changed = os.path.join(workdir, f'config.{step}.json')
      with open(changed, 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
      logging.warning('Resuming %s with a changed config (written to %s):\n  %s',
                      checkpoints.path(step), changed, '\n  '.join(changes))
  if unreadable:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('l2p_jax: unreadable checkpoints moved')
    checkpoints.reload()
  return state, step


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        checkpoints: checkpointing.Checkpoints) -> TrainState:
  """train_and_evaluate, in a workdir this run holds, saving to `checkpoints`."""
  mesh = sharding.make_mesh()
  try:
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(config.eval_batch_size, mesh)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  latest = checkpoints.latest_step()
  if latest is not None:  # Refuse a changed model or step before loading the data.
    try:
      checkpointing.check_compatible(checkpoints.meta(latest)['config'], config,
                                     checkpoints.path(latest))
    except checkpointing.CheckpointMismatchError:
      raise
    except Exception:  # pylint: disable=broad-except
      pass  # An unreadable checkpoint: resume() warns and falls back to an older one.
  train_split, eval_split, train_split_size = load_data(config)
  mean, std = normalization(config, train_split)
  model = build_model(config, train_split.num_classes, mean, std)
  steps_per_epoch = data.steps_per_epoch(train_split.num_examples, config.batch_size)
  optimizers = optim.make_optimizers(config.optim.momentum, config.optim.nesterov,
                                     config.optim.weight_decay, config.optim.optimizer)
  replicated = sharding.replicated_sharding(mesh)
  root = jax.random.key(config.seed)
  init = jax.jit(functools.partial(create_train_state, model, optimizers,
                                   image_shape=train_split.images.shape[1:]),
                 out_shardings=replicated)
  state = init(jax.random.fold_in(root, _INIT))

  meta = {'config': config.to_dict(), 'num_classes': train_split.num_classes,
          'mean': mean, 'std': std, 'image_shape': list(train_split.images.shape[1:])}
  state, latest = resume(checkpoints, config, state, workdir)
  config_path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0 and not os.path.exists(config_path):
    with open(config_path, 'w') as f:  # The first run's; changes go to config.STEP.json.
      f.write(config.to_json_best_effort(indent=2))

  step_kwargs = dict(model=model, config=config, optimizers=optimizers,
                     kl_weight=kl_loss_weight(config, train_split_size))
  restart = jax.jit(functools.partial(restart_optimizers, optimizers=optimizers),
                    out_shardings=replicated)
  if config.data.on_device:
    device_split = data.put_on_mesh(mesh, train_split)
    step_fn = jax.jit(
        functools.partial(train_step_on_split, batch_size=config.batch_size,
                          batch_sharding=sharding.data_sharding(mesh), **step_kwargs),
        static_argnames='phase', donate_argnums=0)
  else:
    step_fn = jax.jit(functools.partial(train_step, **step_kwargs),
                      static_argnames='phase', donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model, config=config),
                    static_argnames='noise')
  writer = MetricsWriter(workdir)
  step = int(state.step)
  writer.drop_epochs_from(step // steps_per_epoch)
  last_saved = latest

  def save(step_now: int) -> None:
    nonlocal last_saved
    check_finite(state, checkpoints, last_saved)
    if step_now != last_saved:
      checkpoints.save(step_now, state, meta)
      last_saved = step_now

  for epoch in range(step // steps_per_epoch, config.num_epochs):
    phase = phase_for_epoch(config, epoch)
    lr = optim.learning_rate(epoch, config.optim.learning_rate,
                             config.optim.lr_boundaries, config.optim.lr_decay)
    reg_weight = regularizer_weight(config, epoch)
    start = step - epoch * steps_per_epoch
    if start == 0:
      state = reset_epoch_sums(state)
      if config.optim.restart_at_boundaries and epoch in config.optim.lr_boundaries:
        state = restart(state)
    started = time.time()
    # Per-epoch values go to the devices once here, not with every step.
    lr_on_mesh, reg_weight_on_mesh, epoch_start = sharding.replicate(
        mesh, (np.float32(lr), np.float32(reg_weight), np.int32(epoch * steps_per_epoch)))
    if config.data.on_device:
      order = data.epoch_order_on_mesh(mesh, config.seed, epoch,
                                       train_split.num_examples)
      inputs = itertools.repeat((device_split, order, epoch_start),
                                steps_per_epoch - start)
    else:
      inputs = ((batch,) for batch in data.device_batches(mesh, data.train_batches(
          train_split, seed=config.seed, epoch=epoch, batch_size=config.batch_size,
          start_step=start)))
    bar = tqdm(total=steps_per_epoch, initial=start, unit='step', dynamic_ncols=True,
               desc=f'epoch {epoch + 1}/{config.num_epochs}',
               disable=not config.progress_bar or jax.process_index() != 0)
    for step_inputs in inputs:
      state = step_fn(state, *step_inputs, lr_on_mesh, reg_weight_on_mesh, phase=phase)
      step += 1
      bar.update()
      if step % config.log_every_steps == 0:
        check_finite(state, checkpoints, last_saved)
        loss = float(state.loss_sum) / (step - epoch * steps_per_epoch)
        bar.set_postfix(loss=f'{loss:.4f}')
        writer.scalars(step, {'train/loss_running': loss, 'train/learning_rate': lr})
      # The epoch's last step is saved after its record is written (below), so that
      # a crash in between redoes the epoch rather than lose its record.
      if step % config.checkpoint_every_steps == 0 and step < (epoch + 1) * steps_per_epoch:
        save(step)
    bar.close()

    record = {'epoch': epoch, 'step': step, 'learning_rate': lr,
              'regularizer_weight': reg_weight,
              'train_loss': float(state.loss_sum) / steps_per_epoch,
              'train_accuracy': float(state.correct_sum) / int(state.seen),
              'epoch_seconds': time.time() - started}
    if (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs:
      results = evaluate(functools.partial(eval_fn, noise=phase.noise),
                         state.variables, eval_split, mesh, config.eval_batch_size,
                         jax.random.fold_in(jax.random.fold_in(root, _EVAL), epoch))
      record.update({f'eval_{k}': v for k, v in results.items()})
    record['noise'] = objectives.noise_statistics(state.perturb)
    check_finite(state, checkpoints, last_saved)
    writer.epoch(record)
    save(step)
    if jax.process_index() == 0:
      tqdm.write(summarize(record))
  checkpoints.wait()
  writer.close()
  if jax.process_index() == 0 and config.method in ('l2p', 'pni', 'adv_bnn'):
    plot_noise_evolution(read_metrics(writer.path),
                         os.path.join(workdir, 'noise_evolution.png'),
                         title=f'{config.method} {config.model.arch}')
  return state


def check_finite(state: TrainState, checkpoints: checkpointing.Checkpoints,
                 last_saved: int | None) -> None:
  """Raises NonFiniteLossError naming the step and the last good checkpoint."""
  bad = int(state.nonfinite_step)
  if bad >= 0:
    where = (checkpoints.path(last_saved) if last_saved is not None
             else 'none (no checkpoint was written yet)')
    raise NonFiniteLossError(
        f'Non-finite loss or train state (parameters, noise parameters or optimizer '
        f'state) at step {bad}. Last good checkpoint: {where}. '
        'Lower optim.learning_rate or check the data; rerunning the same command '
        'resumes from that checkpoint.')

