"""The registry of defenses: one record per method, which the rest of the library asks
instead of comparing method names.

A new defense is one `register(Method(...))` call; training, evaluation and the grid
then know it by `config.method`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from l2p_jax import models
from l2p_jax.errors import UserError
from l2p_jax.training import objectives, rules
from l2p_jax.training.rules import StepSettings, UpdateRule


class UnknownMethodError(UserError, ValueError):
  """A method name that no record is registered under."""


def plain_network(config: ml_collections.ConfigDict, base: dict[str, Any]) -> models.ResNet:
  """The ResNet without randomization (no defence, vanilla PGD training)."""
  del config  # A plain network has no settings of its own.
  return models.ResNet(**base)


def from_the_first_epoch(config: ml_collections.ConfigDict) -> int:
  """Noise from epoch 0 (PNI, Adv-BNN and, by default, a new randomized method)."""
  del config  # The same for every config.
  return 0


@dataclasses.dataclass(frozen=True)
class Regularizer:
  """A term the training objective subtracts: weight(config, epoch) * value(perturb), the
  weight asked for the epochs whose noise is on (0 before), so a larger value is
  rewarded."""

  value: Callable[[Any], jax.Array]
  weight: Callable[[ml_collections.ConfigDict, int], float]


@dataclasses.dataclass(frozen=True)
class Method:
  """One defense.

  name: `config.method`; title: its name in tables; randomized: its network draws noise
  at test time (and is judged over draws); config_section: the config section of its own
  settings (None: it has none; Adv-BNN's is `bnn`, the name old runs' configs carry);
  authors_prediction: (rule, draws) of the prediction its authors judge it by.

  Model construction: network(config, base) is the method's Flax module, given the
  training config and `models.resnet_settings`' keyword arguments of the plain ResNet
  (layout, num_classes, mean, std, conv_input_gradient, dtype); it takes `train` and
  `noise` as ResNet does and draws from the 'noise' RNG stream. adversarial: the method
  trains on PGD examples (none trains on clean images only).

  Training (`l2p_jax.training.rules`; the defaults are a randomized method's plain training, as
  PNI's): noise_start_epoch(config) is the first epoch a randomized method's network
  draws noise (and its noise parameters train); loss_term(params, perturb, settings) is
  added to the training loss (Adv-BNN's KL); regularizer is subtracted from it at its
  scheduled weight (L2P's); noise_update(settings) is the update rule of the epochs its
  noise parameters train (L2P's alternation), None: one joint step on both collections.
  """

  name: str
  title: str
  randomized: bool
  config_section: str | None = None
  authors_prediction: tuple[str, int] = ('single', 1)
  # --- Model construction ---
  network: Callable[[ml_collections.ConfigDict, dict[str, Any]], nn.Module] = plain_network
  adversarial: bool = True
  # --- Training ---
  noise_start_epoch: Callable[[ml_collections.ConfigDict], int] = from_the_first_epoch
  loss_term: Callable[[Any, Any, StepSettings], jax.Array] | None = None
  regularizer: Regularizer | None = None
  noise_update: Callable[[StepSettings], UpdateRule] | None = None


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` to the registry (replacing a record of the same name) and returns it."""
  _REGISTRY[method.name] = method
  return method


def get(name: str) -> Method:
  """The record of method `name`; UnknownMethodError naming the known ones if none."""
  if name not in _REGISTRY:
    raise UnknownMethodError(f'Unknown method {name!r}; expected one of {names()}.')
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered methods' names, in registration order (the paper's table order)."""
  return tuple(_REGISTRY)


# The networks of the paper's methods.


def _pni_network(config: ml_collections.ConfigDict, base: dict[str, Any]) -> models.ResNet:
  """PNI-W: every kernel W + alpha * N(0, std(W)^2), alpha learned (He et al. 2019)."""
  noise = models.WeightNoise('pni', pni_mode=config.model.pni_mode, pni_init=config.model.pni_init)
  return models.ResNet(**base, weight_noise=noise)


def _adv_bnn_network(config: ml_collections.ConfigDict, base: dict[str, Any]) -> models.ResNet:
  """Adv-BNN: mean-field Gaussian weights (and BatchNorm, as in its code, if asked)."""
  m = config.model
  noise = models.WeightNoise(
    'adv_bnn',
    bnn_init_sigma=m.bnn_init_sigma,
    bnn_mean_init=m.bnn_mean_init,
    bnn_batchnorm=m.bnn_batchnorm,
  )
  return models.ResNet(**base, weight_noise=noise)


def _l2p_network(config: ml_collections.ConfigDict, base: dict[str, Any]) -> models.ResNet:
  """Learn2Perturb: learned feature noise after the stem and every block."""
  noise = models.FeatureNoiseSpec(
    enabled=True, init_scale=config.model.l2p_init, per_example=config.model.l2p_per_example
  )
  return models.ResNet(**base, feature_noise=noise)


# The training behaviour of the paper's methods.


def _adv_bnn_kl(params: Any, perturb: Any, settings: StepSettings) -> jax.Array:
  """Adv-BNN's alpha / N times the KL of the weight posterior from its Gaussian prior."""
  return settings.kl_weight * models.bnn_kl(
    params, perturb, settings.prior_sigma, settings.kl_scope
  )


def _l2p_regularizer_weight(config: ml_collections.ConfigDict, epoch: int) -> float:
  """gamma / tau(epoch): the harmonic decay from the first noise epoch."""
  return config.l2p.gamma / objectives.harmonic_tau(epoch, config.l2p.noise_start_epoch)


NONE = register(Method('none', 'No defence', randomized=False, adversarial=False))
VANILLA = register(Method('vanilla', 'Vanilla', randomized=False))
PNI = register(Method('pni', 'PNI-W', randomized=True, network=_pni_network))
# Adv-BNN's acc_under_attack.py sums the softmax of 50 weight draws.
ADV_BNN = register(
  Method(
    'adv_bnn',
    'Adv-BNN',
    randomized=True,
    config_section='bnn',
    authors_prediction=('mean_softmax', 50),
    network=_adv_bnn_network,
    loss_term=_adv_bnn_kl,
  )
)
L2P = register(
  Method(
    'l2p',
    'Learn2Perturb',
    randomized=True,
    config_section='l2p',
    network=_l2p_network,
    noise_start_epoch=lambda config: config.l2p.noise_start_epoch,
    # sum(sqrt(theta)) over L2P's noise maps, at gamma / tau(epoch).
    regularizer=Regularizer(objectives.l2p_regularizer, _l2p_regularizer_weight),
    noise_update=rules.l2p_alternation,
  )
)

# The paper's five methods; the registry may hold more (a user's own defense).
METHODS = names()
