"""The `data` mesh, batch placement and the data pipeline on 8 simulated CPU devices.

JAX is already initialised with one device in the pytest process, so multi-device
checks run in a subprocess with XLA_FLAGS forcing 8 host devices.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from l2p_jax.runtime import sharding


def run_with_devices(code: str, num_devices: int = 8) -> str:
  """Runs a Python snippet with `num_devices` CPU devices; returns its stdout."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
  )
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_one_device_mesh_and_placement():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.size == jax.device_count() == 1
  batch = {'image': np.arange(24, dtype=np.uint8).reshape(4, 3, 2), 'label': np.arange(4)}
  placed = sharding.shard_batch(mesh, batch)
  np.testing.assert_array_equal(placed['image'], batch['image'])
  assert placed['label'].sharding == sharding.data_sharding(mesh)
  with pytest.raises(ValueError, match='0'):
    sharding.check_batch_size(0, mesh)


def test_batch_split_over_8_devices():
  out = run_with_devices("""
      import jax, numpy as np
      from jax.sharding import PartitionSpec as P
      from l2p_jax.runtime import sharding
      mesh = sharding.make_mesh()
      assert mesh.size == 8 and sharding.make_mesh(4).size == 4
      host = {'image': np.arange(16 * 4 * 4 * 3, dtype=np.uint8).reshape(16, 4, 4, 3),
              'label': np.arange(16, dtype=np.int32)}
      placed = sharding.shard_batch(mesh, host)
      for key, array in placed.items():
        assert array.sharding.spec == P('data'), array.sharding
        shards = array.addressable_shards
        assert len(shards) == 8 and {s.device for s in shards} == set(jax.devices())
        for shard in shards:
          assert shard.data.shape[0] == 2
          np.testing.assert_array_equal(shard.data, host[key][shard.index])
        np.testing.assert_array_equal(np.asarray(array), host[key])
      state = jax.device_put(np.ones(3), sharding.replicated_sharding(mesh))
      assert state.sharding.is_fully_replicated
      for bad in (lambda: sharding.check_batch_size(12, mesh),
                  lambda: sharding.shard_batch(mesh, {'label': np.arange(12)})):
        try:
          bad()
        except ValueError as e:
          assert '12' in str(e) and '8' in str(e), e
        else:
          raise AssertionError('batch of 12 on 8 devices accepted')
      print('ok')
  """)
  assert out.strip() == 'ok'


def test_data_pipeline_on_8_devices():
  out = run_with_devices("""
      import jax, numpy as np
      from jax.sharding import PartitionSpec as P
      from l2p_jax import data
      from l2p_jax.runtime import sharding
      mesh = sharding.make_mesh()
      rng = np.random.default_rng(0)
      split = data.HostSplit(
          name='toy', split='train', num_classes=10,
          images=rng.integers(0, 256, (44, 8, 8, 3), dtype=np.uint8),
          labels=rng.integers(0, 10, 44, dtype=np.int32))
      train = dict(seed=1, epoch=2, batch_size=16)
      placed = list(data.device_batches(mesh, data.train_batches(split, **train)))
      assert len(placed) == 2
      for step, batch in enumerate(placed):
        host = data.train_batch(split, step=step, **train)
        for key in host:
          assert len(batch[key].addressable_shards) == 8
          np.testing.assert_array_equal(np.asarray(batch[key]), host[key])
      # The split kept on the devices gives the same batches, split on `data`.
      on_mesh = data.put_on_mesh(mesh, split)
      order = data.epoch_order_on_mesh(mesh, 1, 2, split.num_examples)
      assert on_mesh['image'].sharding.is_fully_replicated
      take = jax.jit(lambda arrays, order, step: jax.lax.with_sharding_constraint(
          data.take_train_batch(arrays, order, step, 16), sharding.data_sharding(mesh)))
      for step in range(2):
        gathered = take(on_mesh, order, jax.device_put(np.int32(step)))
        host = data.train_batch(split, step=step, **train)
        for key in host:
          assert gathered[key].sharding.spec == P('data'), gathered[key].sharding
          np.testing.assert_array_equal(np.asarray(gathered[key]), host[key])
      evals = list(data.device_batches(mesh, data.eval_batches(split, 16)))
      assert len(evals) == 3 and sum(int(b['mask'].sum()) for b in evals) == 44
      # Augmenting a sharded batch: output stays sharded and equals the same
      # augmentation computed on one device.
      augment = jax.jit(data.augment)
      key = jax.random.key(5)
      sharded = augment(key, placed[0]['image'])
      single = augment(key, jax.device_put(np.asarray(placed[0]['image']),
                                           jax.devices()[0]))
      assert sharded.sharding.spec[0] == 'data', sharded.sharding
      np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
      print('ok')
  """)
  assert out.strip() == 'ok'
