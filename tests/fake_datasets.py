"""Tiny datasets in the original CIFAR-10 'python version' and MNIST idx layouts, made in the
test.

Each class has its own mean colour plus noise, so a small network can learn it in a
few steps: the loss going down is then a property of the training code.
"""

import gzip
import pathlib
import pickle

import numpy as np


def learnable_images(
  rng: np.random.Generator, labels: np.ndarray, num_classes: int = 10
) -> np.ndarray:
  """uint8 (N, 32, 32, 3) images whose colour depends on the label."""
  palette = rng.integers(40, 216, (num_classes, 3))
  noise = rng.normal(0, 25, (len(labels), 32, 32, 3))
  return np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_cifar10(
  directory: pathlib.Path, train: int = 500, test: int = 100, seed: int = 0
) -> pathlib.Path:
  """Writes cifar-10-batches-py/ with `train` and `test` examples into `directory`."""
  rng = np.random.default_rng(seed)
  folder = pathlib.Path(directory) / 'cifar-10-batches-py'
  folder.mkdir(parents=True, exist_ok=True)
  sizes = np.diff(np.linspace(0, train, 6).astype(int)).tolist() + [test]
  names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
  for name, n in zip(names, sizes):
    labels = rng.integers(0, 10, n)
    images = learnable_images(np.random.default_rng(seed + 1), labels)
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # CHW rows, as CIFAR stores.
    (folder / name).write_bytes(pickle.dumps({b'data': rows, b'labels': labels.tolist()}))
  return pathlib.Path(directory)


def write_idx(
  directory: pathlib.Path, train: int = 64, test: int = 16, seed: int = 0
) -> pathlib.Path:
  """Writes the four gzipped (Fashion-)MNIST idx files of 28x28 images into `directory`."""
  rng = np.random.default_rng(seed)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for prefix, n in (('train', train), ('t10k', test)):
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    images = learnable_images(rng, labels)[..., 0][:, :28, :28]
    for kind, array in (('images-idx3-ubyte', images), ('labels-idx1-ubyte', labels)):
      header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, '>u4').tobytes()
      (directory / f'{prefix}-{kind}.gz').write_bytes(gzip.compress(header + array.tobytes()))
  return directory
