"""The epoch schedule: each epoch's phase (noise, PGD examples, noise parameters
trained), learning rate and regularizer weight, asked of the method's record."""

from __future__ import annotations

import dataclasses

import ml_collections

from l2p_jax import methods
from l2p_jax.training import optim


@dataclasses.dataclass(frozen=True)
class Phase:
  """What changes between epochs and changes the compiled step."""

  noise: bool  # Noise layers draw noise.
  adversarial: bool  # The loss includes PGD examples.
  train_perturb: bool  # The perturb collection is updated.


def phase_for_epoch(config: ml_collections.ConfigDict, method: methods.Method, epoch: int) -> Phase:
  """Noise on for a randomized method (config.method's record) from its record's
  noise_start_epoch (L2P's l2p.noise_start_epoch, PNI's and Adv-BNN's 0), PGD examples
  from adv.start_epoch, noise parameters trained while noise is on."""
  noise = method.randomized and epoch >= method.noise_start_epoch(config)
  adversarial = config.adv.start_epoch >= 0 and epoch >= config.adv.start_epoch
  return Phase(noise=noise, adversarial=adversarial, train_perturb=noise)


def regularizer_weight(
  config: ml_collections.ConfigDict, method: methods.Method, epoch: int
) -> float:
  """The weight of the method's regularizer once its noise is on (L2P's gamma / tau(t)),
  else 0."""
  if method.regularizer is None or epoch < method.noise_start_epoch(config):
    return 0.0
  return method.regularizer.weight(config, epoch)


def epoch_schedule(
  config: ml_collections.ConfigDict, method: methods.Method, epoch: int
) -> tuple[Phase, float, float]:
  """(phase, learning rate, regularizer weight) of every step of `epoch`."""
  lr = optim.learning_rate(
    epoch, config.optim.learning_rate, config.optim.lr_boundaries, config.optim.lr_decay
  )
  return phase_for_epoch(config, method, epoch), lr, regularizer_weight(config, method, epoch)
