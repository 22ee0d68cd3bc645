"""The networks the tests build: a method's network as training builds it, from the
CIFAR config's defaults (the one place they are written) with some model fields changed."""

from configs import cifar
from l2p_jax import data, experiment

CIFAR10_MEAN, CIFAR10_STD = data.KNOWN_CHANNEL_STATS['cifar10']


def create_model(
  arch, num_classes, method='none', *, mean=CIFAR10_MEAN, std=CIFAR10_STD, **model_fields
):
  """`experiment.build_model` of `configs/cifar.py:METHOD,ARCH` with `config.model`'s
  `model_fields` (width, pni_mode, bnn_init_sigma, ...) changed; CIFAR-10's statistics
  unless mean/std are given."""
  config = cifar.get_config(f'{method},{arch}')
  config.model.update(model_fields)
  return experiment.build_model(config, num_classes, mean, std)
