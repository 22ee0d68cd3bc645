"""Batches from a split in host memory, laid out on the device mesh, and augmentation.

Every training batch is a pure function of (seed, epoch, step), so a run resumes at any
step without iterator state; evaluation batches have a fixed shape and a mask so the
last partial batch neither recompiles nor is counted twice. Training batches come
either from the host (gathered there, then transferred) or from a copy of the whole
split kept on every device (gathered inside the jitted step: no transfer per step);
both give the same batches. Augmentation runs in JAX on the sharded batch, from an
explicit key.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from l2p_jax.data.sources import HostSplit
from l2p_jax.runtime.sharding import replicate, shard_batch

Batch = dict[str, np.ndarray]

# Folded into the seed's key to keep the shuffle stream apart from the streams a
# training loop derives from the same seed by fold_in(step): no step counter gets here.
_SHUFFLE_STREAM = 2**32 - 1


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Number of full training batches in an epoch (the last partial batch is dropped)."""
  steps = num_examples // batch_size
  if steps == 0:
    raise ValueError(f'Batch size {batch_size} exceeds the {num_examples} examples.')
  return steps


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Number of evaluation batches: every example once, the last batch padded."""
  return -(-num_examples // batch_size)


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the examples in epoch `epoch`, the same on every machine (threefry)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _SHUFFLE_STREAM), epoch)
  order = np.asarray(jax.random.permutation(key, num_examples))
  order.setflags(write=False)  # Cached and shared between calls.
  return order


def train_batch(split: HostSplit, *, seed: int, epoch: int, step: int, batch_size: int) -> Batch:
  """Host batch `step` of epoch `epoch` (this process's rows of the global batch)."""
  steps = steps_per_epoch(split.num_examples, batch_size)
  if not 0 <= step < steps:
    raise IndexError(f'Step {step} outside an epoch of {steps} steps.')
  order = epoch_permutation(seed, epoch, split.num_examples)
  return _gather(split, order[step * batch_size : (step + 1) * batch_size])


def train_batches(
  split: HostSplit, *, seed: int, epoch: int, batch_size: int, start_step: int = 0
) -> Iterator[Batch]:
  """Host batches of one training epoch from `start_step` on (resuming mid-epoch)."""
  for step in range(start_step, steps_per_epoch(split.num_examples, batch_size)):
    yield train_batch(split, seed=seed, epoch=epoch, step=step, batch_size=batch_size)


# A split kept on the device may take at most this share of a device's memory; the
# rest is for the model, the optimizer state and the step's activations.
MAX_SPLIT_SHARE = 0.5


def check_split_fits(split: HostSplit, bytes_limit: int | None) -> None:
  """Raises ValueError when the split would take more than MAX_SPLIT_SHARE of a
  device's `bytes_limit` (None: the backend does not say, as on CPU)."""
  size = split.images.nbytes + split.labels.nbytes
  if bytes_limit is not None and size > MAX_SPLIT_SHARE * bytes_limit:
    raise ValueError(
      f'The training split {split.name}/{split.split} takes {size:,} bytes '
      f'({size / 2**30:.2f} GiB), more than {MAX_SPLIT_SHARE:.0%} of the '
      f'{bytes_limit:,} bytes a device has; set --config.data.on_device=False to '
      'feed batches from the host.'
    )


def put_on_mesh(mesh: Mesh, split: HostSplit) -> Batch:
  """The whole split (uint8 images, int32 labels) copied to every device of the mesh.

  CIFAR's 50,000 training images take 150 MB per device. Every process passes the
  same full split (each loads it), so this works across hosts as well. A split that
  would crowd out the model fails here, before anything is copied.
  """
  stats = mesh.local_devices[0].memory_stats()
  check_split_fits(split, stats.get('bytes_limit') if stats else None)
  return replicate(mesh, {'image': split.images, 'label': split.labels})


def epoch_order_on_mesh(mesh: Mesh, seed: int, epoch: int, num_examples: int) -> jax.Array:
  """`epoch_permutation` copied to every device: one transfer per epoch."""
  return replicate(mesh, epoch_permutation(seed, epoch, num_examples))


def take_train_batch(
  arrays: dict[str, jax.Array], order: jax.Array, step: jax.Array, batch_size: int
) -> dict[str, jax.Array]:
  """Batch `step` of the epoch whose order is `order`, gathered from a split on the
  device (jittable): the same rows, in the same order, as `train_batch`."""
  rows = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size)
  return {name: jnp.take(array, rows, axis=0) for name, array in arrays.items()}


def eval_batches(split: HostSplit, batch_size: int) -> Iterator[Batch]:
  """Host batches of the whole split in order, each example once, with a `mask`.

  The last batch is padded to `batch_size` (with example 0, mask False) so that all
  batches have one shape and the evaluation step compiles once.
  """
  for start in range(0, split.num_examples, batch_size):
    index = np.arange(start, start + batch_size)
    mask = index < split.num_examples
    yield _gather(split, np.where(mask, index, 0), mask=mask)


def device_batches(
  mesh: Mesh, batches: Iterable[Batch], prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """Places host batches on the mesh (split on `data`), keeping `prefetch` there at once.

  Transfers are asynchronous, so with prefetch=2 batch k+1 moves while step k computes.
  """
  if prefetch < 1:
    raise ValueError(f'prefetch must be at least 1, got {prefetch}.')
  batches = iter(batches)
  queue = collections.deque()

  def enqueue(n: int) -> None:
    queue.extend(shard_batch(mesh, batch) for batch in itertools.islice(batches, n))

  enqueue(prefetch)
  while queue:
    yield queue.popleft()
    enqueue(1)


def to_float(images: jax.Array) -> jax.Array:
  """uint8 images to float32 in [0, 1], the model's input range."""
  return jnp.asarray(images, jnp.float32) / 255.0


def augment(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
  """Standard CIFAR augmentation of a uint8 batch (N, H, W, C), returned in [0, 1].

  Each example independently: zero-pad by `pad` pixels, take a random H x W window
  (a shift in [-pad, pad] per axis), and flip left-right with probability 1/2.
  Jittable; works on a batch sharded over the `data` axis.
  """
  n, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (n,))
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crop = jax.vmap(
    lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, channels)
    )
  )
  cropped = crop(padded, offsets)
  return to_float(jnp.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped))


def _gather(split: HostSplit, index: np.ndarray, **extra: np.ndarray) -> Batch:
  """Takes the rows of `index` (and of `extra` arrays) that belong to this process.

  Every process computes the same global index vector and takes its contiguous
  share, which `shard_batch` joins back into one global array.
  """

  def share(array: np.ndarray) -> np.ndarray:
    return np.split(array, jax.process_count())[jax.process_index()]

  index = share(index)
  return {
    'image': split.images[index],
    'label': split.labels[index],
    **{name: share(value) for name, value in extra.items()},
  }
