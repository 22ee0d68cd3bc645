"""Dataset sources, offline errors, deterministic batching and augmentation (one device).

Runs offline: TFDS through `tfds.testing.mock_data`, the original archives built here
in tmp_path. Multi-device layout is tested in test_sharding.py.
"""

import gzip
import io
import pickle
import tarfile
import time

import fake_datasets
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from l2p_jax import data
from l2p_jax.data import sources

# --- sources -------------------------------------------------------------------


def cifar_pickle(rng, n, label_key):
  return {
    b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    label_key: rng.integers(0, 10, n).tolist(),
  }


CIFAR_LAYOUTS = {
  'cifar10': (
    'cifar-10-python.tar.gz',
    'cifar-10-batches-py',
    b'labels',
    {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']},
  ),
  'cifar100': (
    'cifar-100-python.tar.gz',
    'cifar-100-python',
    b'fine_labels',
    {'train': ['train'], 'test': ['test']},
  ),
}


def write_cifar(directory, name, extracted):
  """Writes a tiny CIFAR 'python version' dataset; returns the pickles per split."""
  archive, folder, label_key, members = CIFAR_LAYOUTS[name]
  rng = np.random.default_rng(0)
  written = {
    split: [cifar_pickle(rng, 2, label_key) for _ in files] for split, files in members.items()
  }
  blobs = {
    f'{folder}/{member}': pickle.dumps(batch)
    for split, files in members.items()
    for member, batch in zip(files, written[split])
  }
  if extracted:
    (directory / folder).mkdir()
    for path, blob in blobs.items():
      (directory / path).write_bytes(blob)
  else:
    with tarfile.open(directory / archive, 'w:gz') as tar:
      for path, blob in blobs.items():
        info = tarfile.TarInfo(path)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
  return written


@pytest.mark.parametrize('extracted', [False, True], ids=['tar.gz', 'folder'])
@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_local_cifar_archive_and_folder(tmp_path, name, extracted):
  written = write_cifar(tmp_path, name, extracted)
  label_key = CIFAR_LAYOUTS[name][2]
  for split, batches in written.items():
    host = data.load_split(name, split, source='local', local_dir=str(tmp_path))
    rows = np.concatenate([b[b'data'] for b in batches])
    assert host.images.shape == (len(rows), 32, 32, 3) and host.images.dtype == np.uint8
    # CHW rows: red plane first, so pixel (0, 1) red is byte 1, pixel (0, 0) green 1024.
    assert host.images[0, 0, 1, 0] == rows[0, 1]
    assert host.images[0, 0, 0, 1] == rows[0, 1024]
    np.testing.assert_array_equal(host.images, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(host.labels, np.concatenate([b[label_key] for b in batches]))
    assert host.labels.dtype == np.int32
    assert (host.name, host.split, host.num_classes) == (
      name,
      split,
      10 if name == 'cifar10' else 100,
    )


def idx_bytes(array):
  """MNIST idx encoding of a uint8 array: zero, zero, type 0x08, ndim, big-endian dims."""
  header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, '>u4').tobytes()
  return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize('gz', [True, False], ids=['gz', 'plain'])
@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_local_idx_files_gzipped_or_plain(tmp_path, name, gz):
  rng = np.random.default_rng(1)
  expected = {}
  for prefix, n in (('train', 5), ('t10k', 3)):
    images = rng.integers(0, 256, (n, 4, 6), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    expected[prefix] = images, labels
    for kind, array in (('images-idx3-ubyte', images), ('labels-idx1-ubyte', labels)):
      blob = idx_bytes(array)
      path = tmp_path / f'{prefix}-{kind}'
      if gz:
        path.with_name(path.name + '.gz').write_bytes(gzip.compress(blob))
      else:
        path.write_bytes(blob)
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    host = data.load_split(name, split, source='local', local_dir=str(tmp_path))
    images, labels = expected[prefix]
    np.testing.assert_array_equal(host.images, images[..., None])  # Grayscale: C=1.
    np.testing.assert_array_equal(host.labels, labels)
    assert host.num_classes == 10


def test_missing_local_files_name_what_is_expected(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.load_split('cifar10', 'train', source='local', local_dir=str(tmp_path))
  message = str(error.value)
  for expected in (
    str(tmp_path),
    'cifar-10-python.tar.gz',
    'cifar-10-batches-py',
    '--config.data.download=True',
    '--config.data.source=local',
    '--config.data.local_dir',
  ):
    assert expected in message
  assert isinstance(error.value, FileNotFoundError)


def test_missing_tfds_dataset_fails_fast_without_network(tmp_path):
  empty_data_dir = tmp_path / 'tensorflow_datasets'
  start = time.monotonic()
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.load_split('cifar10', 'train', data_dir=str(empty_data_dir))
  assert time.monotonic() - start < 10
  message = str(error.value)
  for expected in (
    str(empty_data_dir / 'cifar10'),
    '--config.data.download=True',
    '--config.data.source=local',
    'cifar-10-python.tar.gz',
  ):
    assert expected in message


def test_missing_tfds_dataset_without_local_reader_says_so(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match='only for cifar10'):
    data.load_split('svhn_cropped', 'train', data_dir=str(tmp_path))


@pytest.mark.skipif(
  __import__('importlib').util.find_spec('tensorflow') is not None,
  reason='TensorFlow installed: tfds could prepare the dataset.',
)
def test_download_without_tensorflow_fails_before_downloading(tmp_path):
  start = time.monotonic()
  with pytest.raises(data.DatasetNotFoundError, match='TensorFlow'):
    data.load_split('cifar10', 'train', data_dir=str(tmp_path), download=True)
  assert time.monotonic() - start < 10


def test_a_failed_download_cleans_up_and_names_the_offline_route(tmp_path, monkeypatch):
  """The network fails mid-download (simulated: no network here): one error naming the
  offline route, and nothing the download left behind."""
  (tmp_path / 'other').mkdir()  # Someone else's: stays.
  find_spec = sources.importlib.util.find_spec
  monkeypatch.setattr(
    sources.importlib.util,
    'find_spec',
    lambda name, *a: object() if name == 'tensorflow' else find_spec(name, *a),
  )

  def download_and_prepare(self, *args, **kwargs):
    partial = tmp_path / 'downloads' / 'cifar-10-python.tar.gz.incomplete'
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b'half an archive')
    (tmp_path / 'cifar10' / '3.0.2.incomplete').mkdir(parents=True)
    raise ConnectionError('Failed to establish a new connection: Network unreachable')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', download_and_prepare)
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.load_split('cifar10', 'train', data_dir=str(tmp_path), download=True)
  message = str(error.value)
  for expected in (
    "Downloading 'cifar10' with tensorflow-datasets failed (ConnectionError: Failed to establish",
    f'under {tmp_path}',
    '--config.data.source=local --config.data.local_dir=DIR',
    'cifar-10-python.tar.gz',
  ):
    assert expected in message, message
  assert sorted(p.name for p in tmp_path.iterdir()) == ['other']


def fake_prepared(data_dir, name, version):
  """What a prepared dataset leaves on disk, enough for load_split to hand over to tfds
  (mock_data then serves random examples with the dataset's real features)."""
  (data_dir / name / version).mkdir(parents=True)
  (data_dir / name / version / 'dataset_info.json').write_text('{}')


@pytest.mark.parametrize(
  'name,shape,num_classes', [('cifar10', (32, 32, 3), 10), ('fashion_mnist', (28, 28, 1), 10)]
)
def test_tfds_source_under_mock_data(tmp_path, name, shape, num_classes):
  fake_prepared(tmp_path, name, '3.0.0')
  with tfds.testing.mock_data(num_examples=12):
    host = data.load_split(name, 'train', data_dir=str(tmp_path))
  assert host.images.shape == (12, *shape) and host.images.dtype == np.uint8
  assert host.labels.shape == (12,) and host.labels.dtype == np.int32
  assert host.num_classes == num_classes
  assert ((0 <= host.labels) & (host.labels < num_classes)).all()


# --- source=auto: TFDS if prepared, else the folder a system package installs ------------


@pytest.fixture
def system_datasets(tmp_path, monkeypatch):
  """/usr/share/datasets faked in tmp_path, holding Debian's Fashion-MNIST, and an empty
  TFDS data directory: the offline machine of a first run."""
  monkeypatch.setattr(sources, 'SYSTEM_DATASETS', tmp_path / 'share')
  fake_datasets.write_idx(tmp_path / 'share' / 'fashion-mnist', train=6, test=4)
  return tmp_path


def test_auto_reads_the_system_packages_folder_when_tfds_has_nothing(system_datasets):
  local = data.load_split(
    'fashion_mnist', 'test', source='local', local_dir=str(system_datasets / 'share/fashion-mnist')
  )
  auto = data.load_split('fashion_mnist', 'test', source='auto', data_dir=str(system_datasets))
  assert auto.num_examples == 4
  np.testing.assert_array_equal(auto.images, local.images)
  np.testing.assert_array_equal(auto.labels, local.labels)


def test_auto_prefers_a_given_local_dir_then_prepared_tfds(system_datasets):
  other = fake_datasets.write_idx(system_datasets / 'other', train=5, test=3)
  assert sources.resolve_source('fashion_mnist', None, str(other), False) == ('local', str(other))
  tfds_dir = str(system_datasets / 'tfds')
  assert sources.resolve_source('fashion_mnist', tfds_dir, None, True) == ('tfds', None)
  fake_prepared(system_datasets / 'tfds', 'fashion_mnist', '3.0.1')
  assert sources.resolve_source('fashion_mnist', tfds_dir, None, False) == ('tfds', None)


@pytest.mark.parametrize('name', ['fashion_mnist', 'cifar10'])
def test_auto_without_data_names_debians_folder_and_package(tmp_path, monkeypatch, name):
  monkeypatch.setattr(sources, 'SYSTEM_DATASETS', tmp_path / 'share')
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.load_split(name, 'train', source='auto', data_dir=str(tmp_path / 'tfds'))
  message = str(error.value)
  for expected in (
    f'no prepared TFDS dataset under {tmp_path / "tfds" / name}',
    "Debian's dataset-fashion-mnist",
    f'puts the files in {tmp_path / "share/fashion-mnist"}'
    if name == 'fashion_mnist'
    else f'puts Fashion-MNIST in {tmp_path / "share/fashion-mnist"}',
    '--config.data.source=local --config.data.local_dir=DIR',
  ):
    assert expected in message, message
  assert (f'nor {tmp_path / "share/fashion-mnist"}' in message) == (name == 'fashion_mnist')


@pytest.mark.parametrize(
  'kwargs,bad,accepted',
  [
    (dict(source='bogus'), 'bogus', "('auto', 'tfds', 'local')"),
    (dict(source='local', local_dir='.', split='validation'), 'validation', "('train', 'test')"),
    (dict(source='local', local_dir='.', name='svhn_cropped'), 'svhn_cropped', 'cifar10'),
  ],
)
def test_unknown_names_are_value_errors(kwargs, bad, accepted):
  args = dict(name='cifar10', split='train') | kwargs
  with pytest.raises(ValueError) as error:
    data.load_split(args.pop('name'), args.pop('split'), **args)
  assert bad in str(error.value) and accepted in str(error.value)


def test_channel_stats_are_exact_and_known_for_cifar():
  images = np.random.default_rng(2).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
  mean, std = data.channel_stats(images)
  np.testing.assert_allclose(mean, (images / 255.0).mean(axis=(0, 1, 2)), atol=1e-12)
  np.testing.assert_allclose(std, (images / 255.0).std(axis=(0, 1, 2)), atol=1e-12)
  assert set(data.KNOWN_CHANNEL_STATS) >= {'cifar10', 'cifar100'}


# --- batches -------------------------------------------------------------------


def indexed_split(n, shape=(2, 2, 1)):
  """A split whose label is the example's index, so batches show which rows they hold."""
  images = (np.arange(n)[:, None, None, None] % 256 * np.ones(shape)).astype(np.uint8)
  return data.HostSplit(
    name='toy', split='train', images=images, labels=np.arange(n, dtype=np.int32), num_classes=n
  )


def test_host_split_is_read_only():
  split = indexed_split(4)
  with pytest.raises(ValueError):
    split.images[0] = 1


def test_a_split_too_big_for_the_device_is_refused_naming_sizes_and_the_switch():
  split = indexed_split(4)  # 4 images of 2x2x1 bytes + 4 int32 labels = 32 bytes.
  data.check_split_fits(split, None)  # The backend gives no limit (CPU): no check.
  data.check_split_fits(split, 64)  # Exactly half of the device: accepted.
  with pytest.raises(
    ValueError,
    match=r'toy/train takes 32 bytes.*50% of the 63 bytes'
    r'.*data\.on_device=False',
  ):
    data.check_split_fits(split, 63)


def test_steps_per_epoch_drops_the_partial_batch():
  assert data.steps_per_epoch(10, 4) == 2
  assert data.steps_per_epoch(8, 4) == 2
  with pytest.raises(ValueError, match='11'):
    data.steps_per_epoch(10, 11)


def test_training_batches_are_a_pure_function_of_seed_epoch_step():
  split = indexed_split(50)
  epoch = [b['label'] for b in data.train_batches(split, seed=3, epoch=0, batch_size=8)]
  assert len(epoch) == 6 and all(labels.shape == (8,) for labels in epoch)
  seen = np.concatenate(epoch)
  assert len(np.unique(seen)) == 48  # Distinct examples; the last 2 dropped.
  data.epoch_permutation.cache_clear()  # Recomputed, not remembered.
  for step, labels in enumerate(epoch):
    batch = data.train_batch(split, seed=3, epoch=0, step=step, batch_size=8)
    np.testing.assert_array_equal(batch['label'], labels)
    np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], labels)
  resumed = data.train_batches(split, seed=3, epoch=0, batch_size=8, start_step=4)
  np.testing.assert_array_equal(np.stack([b['label'] for b in resumed]), np.stack(epoch[4:]))
  for other in (dict(seed=3, epoch=1), dict(seed=4, epoch=0)):
    order = np.concatenate([b['label'] for b in data.train_batches(split, batch_size=8, **other)])
    assert not np.array_equal(order, seen)
  with pytest.raises(IndexError):
    data.train_batch(split, seed=3, epoch=0, step=6, batch_size=8)


def test_shuffle_order_is_pinned():
  # threefry is the same on every machine; this guards against a JAX upgrade changing
  # the order silently, which would break bit-for-bit comparison with old runs.
  np.testing.assert_array_equal(data.epoch_permutation(0, 0, 10), PINNED_PERMUTATION)


PINNED_PERMUTATION = np.array([4, 3, 9, 8, 6, 5, 2, 7, 1, 0])


def test_eval_batches_cover_each_example_exactly_once():
  split = indexed_split(10)
  batches = list(data.eval_batches(split, batch_size=4))
  assert len(batches) == data.num_eval_batches(10, 4) == 3
  assert all(b['image'].shape == (4, 2, 2, 1) and b['mask'].shape == (4,) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert mask.dtype == bool and mask.sum() == 10
  np.testing.assert_array_equal(labels[mask], np.arange(10))  # In order, once each.


# --- augmentation --------------------------------------------------------------


def windows(image, pad):
  """Every window the augmentation may return: each shift in [-pad, pad]^2, flipped
  or not, cut from the zero-padded image."""
  h, w, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  shifted = [
    padded[dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
  ]
  return np.stack(shifted + [s[:, ::-1] for s in shifted])


def test_augment_returns_shifted_padded_windows_flipped_or_not():
  pad = 4
  image = np.arange(1, 8 * 8 * 3 + 1, dtype=np.uint8).reshape(8, 8, 3)  # All distinct.
  batch = np.broadcast_to(image, (2048, 8, 8, 3))
  out = np.asarray(jax.jit(data.augment)(jax.random.key(0), batch))
  assert out.dtype == np.float32 and out.shape == batch.shape
  assert out.min() >= 0 and out.max() <= 1
  candidates = windows(image, pad)
  match = (np.rint(out * 255)[:, None] == candidates[None]).all(axis=(2, 3, 4))
  assert (match.sum(axis=1) == 1).all()  # Each output is exactly one window.
  used = match.any(axis=0)
  assert used.all()  # Every shift, flipped and not, occurs among 2048 examples.
  again = np.asarray(data.augment(jax.random.key(0), batch))
  np.testing.assert_array_equal(out, again)  # Same key, same output; jit == eager.
  assert not np.array_equal(out, np.asarray(data.augment(jax.random.key(1), batch)))


def test_augment_flip_exact_values():
  image = np.arange(1, 17, dtype=np.uint8).reshape(4, 4, 1)
  out = np.asarray(data.augment(jax.random.key(0), np.stack([image] * 64), pad=0))
  flipped = np.array([[4, 3, 2, 1], [8, 7, 6, 5], [12, 11, 10, 9], [16, 15, 14, 13]])
  is_flipped = np.isclose(out, flipped[..., None] / 255, rtol=0, atol=1e-7).all(axis=(1, 2, 3))
  is_same = np.isclose(out, image / 255, rtol=0, atol=1e-7).all(axis=(1, 2, 3))
  assert (is_flipped ^ is_same).all() and 16 < is_flipped.sum() < 48


def test_to_float_scales_to_unit_interval():
  np.testing.assert_allclose(
    np.asarray(data.to_float(np.array([0, 51, 255], np.uint8))), [0.0, 0.2, 1.0], rtol=1e-6
  )
