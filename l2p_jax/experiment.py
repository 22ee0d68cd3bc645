"""What a training config builds: its validation, its model, its data splits and the
model's input normalization, shared by training, evaluation, interop and benchmarks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from l2p_jax import data, methods, models
from l2p_jax.errors import UserError
from l2p_jax.training import optim

ADV_LABELS = ('prediction', 'true')
ATTACK_BATCHNORMS = ('batch', 'running')
ALTERNATIONS = ('paper', 'authors_code')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class ConfigError(UserError, ValueError):
  """A config value no run can use."""


def _require(ok: bool, message: str) -> None:
  """Raises ConfigError(message) unless `ok`."""
  if not ok:
    raise ConfigError(message)


def _check_model(config: ml_collections.ConfigDict) -> methods.Method:
  """The method and the network: a known method (its record returned), architecture/width,
  dtype, convolution gradient and Bayesian mean initialization."""
  try:
    method = methods.get(config.method)
  except methods.UnknownMethodError as error:
    raise ConfigError(str(error)) from None
  try:
    models.resnet_layout(config.model.arch, config.model.width)
  except ValueError as error:
    raise ConfigError(
      f'model.arch={config.model.arch!r}, model.width={config.model.width}: {error}'
    ) from None
  _require(
    config.model.dtype in DTYPES,
    f'Unknown model.dtype {config.model.dtype!r}; expected one of {tuple(DTYPES)}.',
  )
  _require(
    config.model.conv_input_gradient in models.CONV_INPUT_GRADIENTS,
    f'Unknown model.conv_input_gradient {config.model.conv_input_gradient!r}; expected one '
    f'of {models.CONV_INPUT_GRADIENTS}.',
  )
  _require(
    config.model.bnn_mean_init in models.BNN_MEAN_INITS,
    f'Unknown model.bnn_mean_init {config.model.bnn_mean_init!r}; expected one of '
    f'{models.BNN_MEAN_INITS}.',
  )
  return method


def _check_optim(config: ml_collections.ConfigDict) -> None:
  """The optimizer: a known one and a positive learning rate."""
  _require(
    config.optim.learning_rate > 0,
    f'optim.learning_rate must be positive, got {config.optim.learning_rate}.',
  )
  _require(
    config.optim.optimizer in optim.OPTIMIZERS,
    f'Unknown optim.optimizer {config.optim.optimizer!r}; expected one of {optim.OPTIMIZERS}.',
  )


def _check_schedule(config: ml_collections.ConfigDict) -> None:
  """The run's length and its checkpoint and logging intervals: all positive."""
  _require(config.num_epochs > 0, f'num_epochs must be positive, got {config.num_epochs}.')
  for name in ('checkpoint_every_steps', 'log_every_steps', 'keep_checkpoints'):
    _require(config[name] > 0, f'{name} must be positive, got {config[name]}.')


def _check_adversarial(config: ml_collections.ConfigDict, method: methods.Method) -> None:
  """Adversarial training: on for every method but none, its labels, loss weights, PGD
  budget and batch-norm mode valid."""
  _require(
    config.adv.labels in ADV_LABELS,
    f'Unknown adv.labels {config.adv.labels!r}; expected one of {ADV_LABELS}.',
  )
  adversarial = method.adversarial
  _require(
    adversarial or config.adv.start_epoch < 0,
    f'method={config.method} trains on clean images only, but adv.start_epoch='
    f'{config.adv.start_epoch}; use method=vanilla for PGD training or set '
    'adv.start_epoch=-1.',
  )
  _require(
    not adversarial or config.adv.start_epoch >= 0,
    f'method={config.method} needs adversarial training, but adv.start_epoch='
    f'{config.adv.start_epoch}; use method=none for clean training.',
  )
  _require(
    config.adv.clean_weight >= 0
    and config.adv.adv_weight >= 0
    and config.adv.clean_weight + config.adv.adv_weight > 0,
    f'adv.clean_weight={config.adv.clean_weight} and adv.adv_weight='
    f'{config.adv.adv_weight} must be non-negative and not both zero.',
  )
  _require(
    config.adv.eps >= 0 and config.adv.steps >= 1 and config.eval.pgd_steps >= 1,
    f'adv.eps={config.adv.eps} must be >= 0 and adv.steps={config.adv.steps}, '
    f'eval.pgd_steps={config.eval.pgd_steps} at least 1.',
  )
  _require(
    config.adv.attack_batchnorm in ATTACK_BATCHNORMS,
    f'Unknown adv.attack_batchnorm {config.adv.attack_batchnorm!r}; expected one of '
    f'{ATTACK_BATCHNORMS}.',
  )


def _check_l2p(config: ml_collections.ConfigDict) -> None:
  """Learn2Perturb: a known alternation and a noise start inside the run."""
  _require(
    config.l2p.alternation in ALTERNATIONS,
    f'Unknown l2p.alternation {config.l2p.alternation!r}; expected one of {ALTERNATIONS}.',
  )
  _require(
    0 <= config.l2p.noise_start_epoch < config.num_epochs,
    f'l2p.noise_start_epoch={config.l2p.noise_start_epoch} must be in '
    f'[0, num_epochs={config.num_epochs}).',
  )


def _check_bnn(config: ml_collections.ConfigDict) -> None:
  """Adv-BNN: positive prior and initial sigmas, a known KL scope and a valid KL weight."""
  _require(
    config.bnn.prior_sigma > 0 and config.model.bnn_init_sigma > 0,
    f'bnn.prior_sigma={config.bnn.prior_sigma} and model.bnn_init_sigma='
    f'{config.model.bnn_init_sigma} must be positive.',
  )
  _require(
    config.bnn.kl_scope in models.KL_SCOPES,
    f'Unknown bnn.kl_scope {config.bnn.kl_scope!r}; expected one of {models.KL_SCOPES}.',
  )
  _require(
    config.bnn.kl_alpha >= 0 and (config.bnn.kl_examples is None or config.bnn.kl_examples > 0),
    f'bnn.kl_alpha={config.bnn.kl_alpha} must be >= 0 and bnn.kl_examples='
    f"{config.bnn.kl_examples} positive (or None for the training split's size).",
  )


def _check_choices(config: ml_collections.ConfigDict) -> None:
  """Named choices the sections' checks leave to the model: PNI's noise granularity."""
  _require(
    config.model.pni_mode in models.PNI_MODES,
    f'Unknown model.pni_mode {config.model.pni_mode!r}; expected one of {models.PNI_MODES}.',
  )


def check_batch_fits(config: ml_collections.ConfigDict, train: data.HostSplit) -> None:
  """Refuses a batch larger than the training examples: no step could be taken."""
  _require(
    config.batch_size <= train.num_examples,
    f'batch_size={config.batch_size} exceeds the {train.num_examples} training examples '
    f'of {train.name}/{train.split}; lower batch_size or raise data.train_examples.',
  )


def validate_config(config: ml_collections.ConfigDict) -> methods.Method:
  """Raises ConfigError for values no run can use, naming the field and what is accepted;
  the checks run section by section, so a config with several errors reports the first
  section's. Returns config.method's record, for the run to pass down."""
  method = _check_model(config)
  _check_optim(config)
  _check_schedule(config)
  _check_adversarial(config, method)
  _check_l2p(config)
  _check_bnn(config)
  _check_choices(config)
  return method


# Model fields added after the first runs, with the value those runs were trained with:
# the saved config of an older run builds the network its checkpoint holds.
MODEL_FIELDS_ADDED_LATER = {
  'bnn_mean_init': 'kaiming_normal',
  'bnn_batchnorm': False,
  'conv_input_gradient': 'auto',
}


def build_model(
  config: ml_collections.ConfigDict, method: methods.Method, num_classes: int, mean: Any, std: Any
) -> nn.Module:
  """The network of `method` (config.method's record, which builds it) on
  `config.model`'s ResNet, normalizing with mean/std."""
  config = ml_collections.ConfigDict(config.to_dict())
  for field, value in MODEL_FIELDS_ADDED_LATER.items():
    if field not in config.model:
      config.model[field] = value
  m = config.model
  base = models.resnet_settings(
    m.arch,
    num_classes,
    width=m.width,
    mean=mean,
    std=std,
    conv_input_gradient=m.conv_input_gradient,
    dtype=DTYPES[m.dtype],
  )
  return method.network(config, base)


def first_examples(split: data.HostSplit, n: int, field: str) -> data.HostSplit:
  """The first n examples of a split (all when n == 0)."""
  if n == 0:
    return split
  if not 0 < n <= split.num_examples:
    raise ConfigError(
      f'{field}={n} must be between 1 and the {split.num_examples} '
      f'examples of {split.name}/{split.split} (0 means all).'
    )
  return dataclasses.replace(split, images=split.images[:n], labels=split.labels[:n])


def read_split(settings: Mapping[str, Any], split: str) -> data.HostSplit:
  """Split `split` of the dataset that a training config's `data` section (or a mapping
  of its fields) names, read into host memory: training and evaluation read alike."""
  return data.load_split(
    settings['dataset'],
    split,
    source=settings['source'],
    data_dir=settings['data_dir'] or None,
    local_dir=settings['local_dir'] or None,
    download=settings['download'],
  )


def load_data(config: ml_collections.ConfigDict) -> tuple[data.HostSplit, data.HostSplit, int]:
  """The configured training and evaluation splits in host memory, and the size of
  the whole training split (before data.train_examples takes its first examples)."""
  d = config.data
  full_train = read_split(d, d.train_split)
  train = first_examples(full_train, d.train_examples, 'data.train_examples')
  check_batch_fits(config, train)
  evaluation = first_examples(read_split(d, d.eval_split), d.eval_examples, 'data.eval_examples')
  return train, evaluation, full_train.num_examples


# The constants of the PyTorch codes, for runs that must match them: the L2P code's
# std is the widespread (0.2023, 0.1994, 0.2010), not CIFAR-10's true pixel std.
CODE_NORMALIZATIONS = {
  'l2p_code': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
  'pni_code': (
    tuple(v / 255 for v in (125.3, 123.0, 113.9)),
    tuple(v / 255 for v in (63.0, 62.1, 66.7)),
  ),
}


def known_normalization(config: ml_collections.ConfigDict) -> tuple[Any, Any] | None:
  """The per-channel (mean, std) that config.data.normalization names without looking at
  the data: one of CODE_NORMALIZATIONS, or the dataset's known values; None when they
  are to be computed from the training split."""
  choice = config.data.normalization
  if choice in CODE_NORMALIZATIONS:
    return CODE_NORMALIZATIONS[choice]
  if choice != 'dataset':
    raise ValueError(
      f'Unknown data.normalization {choice!r}; expected one of {("dataset", *CODE_NORMALIZATIONS)}.'
    )
  return data.KNOWN_CHANNEL_STATS.get(config.data.dataset)


def normalization(
  config: ml_collections.ConfigDict, split: data.HostSplit
) -> tuple[list[float], list[float]]:
  """Per-channel mean and std for the model: by default the dataset's own (known
  values, else computed from the training split); or one of CODE_NORMALIZATIONS."""
  choice = config.data.normalization
  mean, std = known_normalization(config) or data.channel_stats(split.images)
  if len(mean) != split.images.shape[-1]:
    raise ValueError(
      f'data.normalization={choice!r} has {len(mean)} channels but '
      f'{split.name} images have {split.images.shape[-1]}.'
    )
  return [float(v) for v in mean], [float(v) for v in std]
