"""Device mesh helpers for data parallelism: a `data` axis, batch split, state replicated.

The same code serves 1 CPU, several GPUs and multi-host TPU slices: `jax.jit` over a
1-D mesh, with the compiler inserting the cross-device reductions (no `jax.pmap`).
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(num_devices: int | None = None) -> Mesh:
  """Returns a 1-D mesh named `data` over the first `num_devices` devices (default: all).

  The axis is `Auto`, so shardings propagate through model and attack code without
  annotations; only inputs are placed explicitly.
  """
  devices = jax.devices()
  if num_devices is None:
    num_devices = len(devices)
  return jax.make_mesh(
    (num_devices,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:num_devices]
  )


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits an array's leading (batch) axis over the `data` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (parameters, optimizer state)."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over the mesh's devices."""
  if batch_size <= 0 or batch_size % mesh.size:
    raise ValueError(
      f'global batch size {batch_size} must be a positive multiple of the number of '
      f'devices {mesh.size}; use a multiple of {mesh.size}, or fewer devices '
      '(--cpu_devices=N on a CPU, CUDA_VISIBLE_DEVICES on GPUs).'
    )


def mesh_for_batches(batch_sizes: dict[str, int], error: type[Exception]) -> Mesh:
  """The mesh of every device, raising `error('FIELD: why')` for the first of
  `batch_sizes` (config field -> global batch size) that does not split over it."""
  mesh = make_mesh()
  for field, batch_size in batch_sizes.items():
    try:
      check_batch_size(batch_size, mesh)
    except ValueError as why:
      raise error(f'{field}: {why}') from None
  return mesh


def shard_batch(mesh: Mesh, batch: Any) -> Any:
  """Turns a tree of host arrays (this process's rows of the global batch) into global
  jax.Arrays split on their leading axis; with one process the rows are the whole batch.
  """
  sharding = data_sharding(mesh)
  for leaf in jax.tree.leaves(batch):
    check_batch_size(np.shape(leaf)[0] * jax.process_count(), mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Copies a tree of host arrays (the same in every process) to every device of the
  mesh; works across hosts, where `jax.device_put` of a host value may not."""
  sharding = replicated_sharding(mesh)

  def put(value):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(put, tree)
