"""Tiny trained checkpoints for the evaluation tests: ResNet-8 runs of configs/cifar.py's
tiny variant on a learnable fake CIFAR-10 (fake_datasets) of 512 training and 128 test
images."""

import pathlib

import fake_datasets
import pytest

from configs import cifar as cifar_configs
from l2p_jax.training import loop


def train_runs(
  tmp_path_factory: pytest.TempPathFactory, epochs: dict[str, int]
) -> dict[str, pathlib.Path]:
  """The workdir of every method of `epochs`, trained for its number of epochs."""
  cifar = fake_datasets.write_cifar10(tmp_path_factory.mktemp('cifar'), train=512, test=128)
  base, workdirs = tmp_path_factory.mktemp('runs'), {}
  for method, count in epochs.items():
    config = cifar_configs.get_config(f'{method},resnet8,cifar10,tiny')
    config.data.source, config.data.local_dir = 'local', str(cifar)
    config.progress_bar, config.num_epochs = False, count
    workdirs[method] = base / method
    loop.train_and_evaluate(config, str(workdirs[method]))
  return workdirs
