"""Reading a dataset split into host memory, from TFDS or from the original archives.

Two sources give the same `HostSplit`: `tfds` (a prepared tensorflow-datasets
dataset, read with `tfds.data_source`, no TensorFlow needed) and `local` (the files
the dataset authors distribute, for machines without network); `auto` picks one of them
(`resolve_source`), so that a first run needs no data setting where a system package
installed the files. Nothing is downloaded unless asked, and a missing dataset fails
fast with one error saying how to get it; a download that fails removes what it left
and names the offline route.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gzip
import importlib.util
import os
import pathlib
import pickle
import shutil
import tarfile
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import tensorflow_datasets as tfds

from l2p_jax.errors import UserError

SOURCES = ('auto', 'tfds', 'local')
LOCAL_SPLITS = ('train', 'test')

# Per-channel mean and std of the training images in [0, 1] units (population std
# over all pixels), so configs need not read the data to normalize.
KNOWN_CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


# Where distribution packages install a dataset's original files, which source=auto reads
# when nothing else is given: the folder under SYSTEM_DATASETS and the Debian package.
SYSTEM_DATASETS = pathlib.Path('/usr/share/datasets')
SYSTEM_PACKAGES: dict[str, tuple[str, str]] = {
  'fashion_mnist': ('fashion-mnist', 'dataset-fashion-mnist')
}


class DatasetNotFoundError(UserError, FileNotFoundError):
  """The requested dataset is not on this machine and may not be downloaded."""


class DataConfigError(UserError, ValueError):
  """A data setting names no source, no local reader or no split there is."""


class DatasetFileError(UserError, ValueError):
  """A dataset file is there but cannot be read (truncated, or of another format)."""


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """One split in host memory: uint8 images (N, H, W, C) and int32 labels (N,).

  The arrays are made read-only: every batch is gathered from them.
  """

  name: str
  split: str
  images: np.ndarray
  labels: np.ndarray
  num_classes: int

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(
        f'images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}'
      )
    if self.labels.shape != self.images.shape[:1]:
      raise ValueError(f'{len(self.labels)} labels for {len(self.images)} images')
    for array in (self.images, self.labels):
      array.setflags(write=False)

  @property
  def num_examples(self) -> int:
    return len(self.labels)


def load_split(
  name: str,
  split: str,
  *,
  source: str = 'tfds',
  data_dir: str | None = None,
  local_dir: str | None = None,
  download: bool = False,
) -> HostSplit:
  """Reads split `split` of dataset `name` (a TFDS name) into host memory.

  source='tfds' reads the dataset prepared under `data_dir` (default: TFDS_DATA_DIR
  or ~/tensorflow_datasets), preparing it first only if `download`; source='local'
  reads the original archives from `local_dir` (see `LOCAL_FORMATS`) and never
  downloads; source='auto' reads what `resolve_source` picks. Raises
  DatasetNotFoundError when the data is not there.
  """
  if source == 'auto':
    source, local_dir = resolve_source(name, data_dir, local_dir, download)
  if source == 'tfds':
    images, labels, num_classes = _read_tfds(name, split, data_dir, download)
  elif source == 'local':
    images, labels, num_classes = _read_local(name, split, local_dir)
  else:
    raise DataConfigError(f'Unknown data.source {source!r}; expected one of {SOURCES}.')
  return HostSplit(
    name=name,
    split=split,
    images=np.ascontiguousarray(images),
    labels=labels.astype(np.int32),
    num_classes=num_classes,
  )


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean and std of uint8 images (..., C) in [0, 1] units.

  Counts the 256 pixel values per channel instead of converting the split to float,
  so it needs no memory beyond one channel.
  """
  counts = np.stack(
    [np.bincount(images[..., c].ravel(), minlength=256) for c in range(images.shape[-1])]
  )
  values = np.arange(256) / 255.0
  mean = counts @ values / counts.sum(axis=1)
  var = counts @ values**2 / counts.sum(axis=1) - mean**2
  return mean, np.sqrt(np.maximum(var, 0.0))


def resolve_source(
  name: str, data_dir: str | None, local_dir: str | None, download: bool
) -> tuple[str, str | None]:
  """The (source, local_dir) that source='auto' reads: local from `local_dir` if given,
  else TFDS if prepared under `data_dir` or `download` allows preparing it, else local
  from the system package's folder (`SYSTEM_PACKAGES`) if it is there."""
  if local_dir:
    return 'local', local_dir
  prepared = _tfds_prepared_dir(name, data_dir)
  if download or any(prepared.glob('**/dataset_info.json')):
    return 'tfds', None
  folder = system_folder(name)
  if folder is not None and folder.is_dir():
    return 'local', str(folder)
  looked = f'no prepared TFDS dataset under {prepared}' + (f', nor {folder}' if folder else '')
  raise DatasetNotFoundError(_not_found_message(name, looked))


def system_folder(name: str) -> pathlib.Path | None:
  """Where a system package installs dataset `name`'s original files (None: no package)."""
  return SYSTEM_DATASETS / SYSTEM_PACKAGES[name][0] if name in SYSTEM_PACKAGES else None


# --- tensorflow-datasets ---------------------------------------------------------


def _tfds_prepared_dir(name: str, data_dir: str | None) -> pathlib.Path:
  """The folder under which TFDS keeps dataset `name` once prepared."""
  root = pathlib.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
  dataset_name, kwargs = tfds.core.naming.parse_builder_name_kwargs(name)
  return root / str(dataset_name) / kwargs.get('config', '') / kwargs.get('version', '')


def _read_tfds(
  name: str, split: str, data_dir: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray, int]:
  """Reads a TFDS split with `tfds.data_source` (array_record files, no TensorFlow)."""
  root = pathlib.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
  prepared = _tfds_prepared_dir(name, data_dir)
  # Look on disk ourselves before any tfds call: without prepared files tfds may try
  # to reach the network (GCS metadata, downloads), which hangs on offline machines.
  if not any(prepared.glob('**/dataset_info.json')):
    if not download:
      raise DatasetNotFoundError(
        _not_found_message(name, f'no prepared TFDS dataset under {prepared}, and download=False')
      )
    if importlib.util.find_spec('tensorflow') is None:
      raise DatasetNotFoundError(
        _not_found_message(
          name,
          f'no prepared TFDS dataset under {prepared}, and tfds '
          'needs TensorFlow to prepare (encode) image datasets, which is not '
          'installed (`pip install tensorflow-cpu` once, for preparing only)',
        )
      )
  before = _tree(root)
  try:
    # data_source picks array_record only when neither data_dir nor builder_kwargs are
    # given; with data_dir it would default to TFRecord, which has no random access.
    source = tfds.data_source(
      name,
      split=split,
      data_dir=root,
      download=download,
      builder_kwargs={'file_format': 'array_record'},
    )
  except (OSError, tfds.download.DownloadError) as error:  # requests' errors are OSErrors.
    if not download:
      raise
    removed = _remove_new(root, before)
    raise DatasetNotFoundError(
      f'Downloading {name!r} with tensorflow-datasets failed '
      f'({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}); '
      f'removed the {removed} partial files and folders it left under {root}. '
      f'Without network, {_offline_route(name)}.'
    ) from None
  features = source.dataset_info.features
  if None in features['image'].shape:
    raise ValueError(
      f'{name} has images of varying size {features["image"].shape}; '
      'only fixed-size image datasets are supported.'
    )
  examples = [source[i] for i in range(len(source))]
  images = np.stack([example['image'] for example in examples])
  labels = np.array([example['label'] for example in examples])
  return images, labels, features['label'].num_classes


def _tree(root: pathlib.Path) -> set[str]:
  """Every file and folder under `root`."""
  return {os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files}


def _remove_new(root: pathlib.Path, before: set[str]) -> int:
  """Removes what appeared under `root` since `before` (outermost first); the count."""
  removed = 0
  for path in sorted(_tree(root) - before):
    if os.path.lexists(path):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
      removed += 1
  return removed


# --- original archives -------------------------------------------------------------


def _read_cifar(
  directory: pathlib.Path,
  split: str,
  *,
  archive: str,
  folder: str,
  members: dict[str, tuple[str, ...]],
  label_key: bytes,
) -> tuple[np.ndarray, np.ndarray]:
  """Reads CIFAR 'python version' pickles from the .tar.gz or its extracted folder."""

  def read(files: Callable[[str], BinaryIO]) -> tuple[np.ndarray, np.ndarray]:
    batches = []
    for member in members[split]:
      with files(f'{folder}/{member}') as f:
        batches.append(pickle.load(f, encoding='bytes'))
    images = np.concatenate([b[b'data'] for b in batches]).astype(np.uint8)
    labels = np.concatenate([b[label_key] for b in batches])
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

  if (directory / folder).is_dir():
    return read(lambda path: open(directory / path, 'rb'))
  with tarfile.open(directory / archive) as tar:
    return read(tar.extractfile)


def _read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads an MNIST idx file (4-byte magic, big-endian dims, bytes), gzipped or not."""
  gz = path.with_name(path.name + '.gz')
  read = gz if gz.exists() else path
  try:
    data = gzip.decompress(read.read_bytes()) if read is gz else read.read_bytes()
  except (EOFError, gzip.BadGzipFile) as error:
    raise DatasetFileError(
      f'{read} is truncated or not gzip data ({error}); download it again.'
    ) from None
  ndim = data[3] if len(data) >= 4 else 0
  if not ndim or len(data) < 4 + 4 * ndim:
    raise DatasetFileError(
      f'{read} is truncated or not an idx file: {len(data)} bytes '
      'without a complete idx header; download it again.'
    )
  shape = np.frombuffer(data, dtype='>u4', count=ndim, offset=4)
  expected = 4 + 4 * ndim + int(np.prod(shape))
  if len(data) != expected:
    raise DatasetFileError(
      f'{read} is truncated or not an idx file: {len(data)} bytes, but its header '
      f'describes {expected} ({"x".join(map(str, shape))}); download it again.'
    )
  return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_mnist(directory: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads MNIST-format idx files; grayscale images come out as (N, H, W, 1)."""
  prefix = {'train': 'train', 'test': 't10k'}[split]
  images = _read_idx(directory / f'{prefix}-images-idx3-ubyte')
  labels = _read_idx(directory / f'{prefix}-labels-idx1-ubyte')
  return images[..., None], labels


@dataclasses.dataclass(frozen=True)
class LocalFormat:
  """A dataset's original distribution files: what local_dir must hold, a reader, and
  the classes and image shape it gives (which also tell a converted model its input)."""

  expected: str  # For the error message when the files are missing.
  read: Callable[[pathlib.Path, str], tuple[np.ndarray, np.ndarray]]
  num_classes: int
  image_shape: tuple[int, int, int]  # (height, width, channels) of every image.


_MNIST_FILES = (
  'train-images-idx3-ubyte, train-labels-idx1-ubyte, '
  't10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may end in .gz)'
)

LOCAL_FORMATS: dict[str, LocalFormat] = {
  'cifar10': LocalFormat(
    expected='cifar-10-python.tar.gz or its extracted folder cifar-10-batches-py',
    read=functools.partial(
      _read_cifar,
      archive='cifar-10-python.tar.gz',
      folder='cifar-10-batches-py',
      members={'train': tuple(f'data_batch_{i}' for i in range(1, 6)), 'test': ('test_batch',)},
      label_key=b'labels',
    ),
    num_classes=10,
    image_shape=(32, 32, 3),
  ),
  'cifar100': LocalFormat(
    expected='cifar-100-python.tar.gz or its extracted folder cifar-100-python',
    read=functools.partial(
      _read_cifar,
      archive='cifar-100-python.tar.gz',
      folder='cifar-100-python',
      members={'train': ('train',), 'test': ('test',)},
      label_key=b'fine_labels',
    ),
    num_classes=100,
    image_shape=(32, 32, 3),
  ),
  'mnist': LocalFormat(_MNIST_FILES, _read_mnist, num_classes=10, image_shape=(28, 28, 1)),
  'fashion_mnist': LocalFormat(_MNIST_FILES, _read_mnist, num_classes=10, image_shape=(28, 28, 1)),
}


def _read_local(name: str, split: str, local_dir: str | None) -> tuple[np.ndarray, np.ndarray, int]:
  """Reads a split from the original distribution files in `local_dir`."""
  if name not in LOCAL_FORMATS:
    close = difflib.get_close_matches(name, LOCAL_FORMATS, n=1)
    raise DataConfigError(
      f'data.dataset={name!r} has no local reader; data.source=local reads '
      f'{", ".join(sorted(LOCAL_FORMATS))}'
      + (f' (did you mean {close[0]!r}?)' if close else ' (data.source=tfds reads the others)')
      + '.'
    )
  if split not in LOCAL_SPLITS:
    raise DataConfigError(
      f'Unknown split {split!r} for data.source=local; expected one of {LOCAL_SPLITS}.'
    )
  if local_dir is None:
    raise DataConfigError(
      'data.source=local needs data.local_dir, the directory holding the files.'
    )
  directory = pathlib.Path(local_dir).expanduser()
  if directory.exists() and not directory.is_dir():
    raise DatasetNotFoundError(
      f'data.local_dir={local_dir} is a file; it must be the folder holding '
      f'{LOCAL_FORMATS[name].expected}.'
    )
  try:
    images, labels = LOCAL_FORMATS[name].read(directory, split)
  except FileNotFoundError as e:
    raise DatasetNotFoundError(_not_found_message(name, f'{e.filename} is missing')) from e
  return images, labels, LOCAL_FORMATS[name].num_classes


def _not_found_message(name: str, looked: str) -> str:
  """The one explanation of a missing dataset: where we looked and the three ways out."""
  return (
    f'Dataset {name!r} not found: {looked}. Get it one of three ways:\n'
    '  1. allow tensorflow-datasets to download and prepare it (network; '
    'TensorFlow for preparing): --config.data.source=tfds '
    '--config.data.download=True [--config.data.data_dir=DIR]\n'
    f'  2. {_offline_route(name)}.\n'
    f'  3. {_system_route(name)}.'
  )


def _system_route(name: str) -> str:
  """Where a system package puts the files, which data.source=auto (the default) reads."""
  if name in SYSTEM_PACKAGES:
    return (
      f"install Debian's {SYSTEM_PACKAGES[name][1]}, which puts the files in "
      f'{system_folder(name)}, read with data.source=auto (the default)'
    )
  return (
    "for a first run offline, Debian's dataset-fashion-mnist puts Fashion-MNIST in "
    f'{system_folder("fashion_mnist")}, read with data.source=auto (the default): '
    '--config configs/cifar.py:l2p,resnet8,fashion_mnist,tiny'
  )


def _offline_route(name: str) -> str:
  """How to read `name` from its original files without network."""
  if name in LOCAL_FORMATS:
    return (
      f'read the original files offline: --config.data.source=local '
      f'--config.data.local_dir=DIR, where DIR holds {LOCAL_FORMATS[name].expected}'
    )
  return (
    f'read the original files offline: --config.data.source=local (only for '
    f'{", ".join(LOCAL_FORMATS)}; there is none for this dataset)'
  )
