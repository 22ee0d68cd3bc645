"""Multi-process runs on one machine: two processes on the loopback address, each with two
simulated CPU devices, against one process with four; a killed process and a restart.

Every process is a subprocess with a deadline; whatever is still running when a test
ends (passing or failing) is killed, so no process is left behind or waits forever.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import chex
import fake_datasets
import pytest

from l2p_jax import checkpointing
from l2p_jax.runtime.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tiny config cut to one epoch of 4 steps, all adversarial; a checkpoint every 2.
TRAIN_FLAGS = (
  '--config.num_epochs=1',
  '--config.data.train_examples=256',
  '--config.adv.start_epoch=0',
  '--config.checkpoint_every_steps=2',
)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def launched(
  argv: list[str],
  logs: pathlib.Path,
  *,
  num_processes: int = 2,
  devices: int = 2,
  port: int | None = None,
  env_coordinator: bool = False,
):
  """Starts `argv` as `num_processes` processes with `devices` CPU devices each, joined
  on the loopback address when more than one (the address by flag, or by
  $JAX_COORDINATOR_ADDRESS with `env_coordinator`); output goes to LOGS-<i>.txt, the
  working directory (where a crash would leave a core file) is LOGS's folder. Kills
  any process still running on exit."""
  env = dict(
    os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
  )
  address = f'127.0.0.1:{port}'
  if env_coordinator:
    env['JAX_COORDINATOR_ADDRESS'] = address
  processes = []
  try:
    for i in range(num_processes):
      joined = (
        []
        if num_processes == 1
        else [
          *([] if env_coordinator else [f'--coordinator_address={address}']),
          f'--num_processes={num_processes}',
          f'--process_id={i}',
        ]
      )
      with open(f'{logs}-{i}.txt', 'w') as out:
        processes.append(
          subprocess.Popen(
            [sys.executable, *argv, *joined],
            cwd=pathlib.Path(logs).parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
          )
        )
    yield processes
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.wait()


def log(logs: pathlib.Path, i: int) -> str:
  return pathlib.Path(f'{logs}-{i}.txt').read_text()


def finish(processes: list[subprocess.Popen], logs: pathlib.Path, timeout: float) -> None:
  """Waits for every process to exit 0 within `timeout` seconds (all together)."""
  deadline = time.time() + timeout
  for i, p in enumerate(processes):
    try:
      p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      pytest.fail(f'process {i} still running after {timeout} s:\n' + log(logs, i)[-3000:])
    assert p.returncode == 0, f'process {i} failed:\n' + log(logs, i)[-3000:]


def train_argv(cifar_dir: pathlib.Path, workdir: pathlib.Path, *extra: str) -> list[str]:
  return [
    str(ROOT / 'train.py'),
    '--config',
    f'{ROOT}/configs/cifar.py:l2p,resnet8,cifar10,tiny',
    '--workdir',
    str(workdir),
    '--config.data.source=local',
    f'--config.data.local_dir={cifar_dir}',
    *TRAIN_FLAGS,
    *extra,
  ]


def restore(workdir: pathlib.Path, step: int) -> dict:
  checkpoints = checkpointing.Checkpoints(str(workdir / 'checkpoints'), read_only=True)
  state, _ = checkpoints.restore(step)
  checkpoints.close()
  return state


def without_time(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k != 'epoch_seconds'} for r in records]


@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
  return fake_datasets.write_cifar10(tmp_path_factory.mktemp('cifar'), train=256, test=128)


@dataclasses.dataclass
class Runs:
  """What the module's training jobs left: their folder, the killed job's command and
  port (for the restart), and how its kill went ('' if as planned)."""

  folder: pathlib.Path
  killed_argv: list[str]
  killed_port: int
  kill_problem: str
  survivor_returncode: int | None


@pytest.fixture(scope='module')
def runs(cifar_dir: pathlib.Path, tmp_path_factory) -> Runs:
  """Three jobs of the same 4 steps at once: two processes of two devices (two/), one
  process of four (one/), and two processes again (killed/) of which process 1 is
  SIGKILLed once checkpoint 2 exists, its heartbeat timeout set to 10 s.

  Run together because process 0 of a two-process job mostly waits: process 1
  compiles everything, while process 0 loads it from the persistent compilation cache.
  """
  tmp = tmp_path_factory.mktemp('runs')
  killed_argv = train_argv(
    cifar_dir, tmp / 'killed', '--heartbeat_timeout_seconds=10', '--config.progress_bar=False'
  )
  port, problem, killed_at = free_port(), '', None
  with (
    launched(train_argv(cifar_dir, tmp / 'two'), tmp / 'two', port=free_port()) as two,
    launched(train_argv(cifar_dir, tmp / 'one'), tmp / 'one', num_processes=1, devices=4) as one,
    launched(killed_argv, tmp / 'killed', port=port) as killed,
  ):
    deadline = time.time() + 400
    while not problem and (killed_at is None or killed[0].poll() is None):
      if killed_at is None and (tmp / 'killed' / 'checkpoints' / '2').exists():
        killed[1].kill()
        killed_at = time.time()
      elif killed_at is None and any(p.poll() is not None for p in killed):
        problem = 'a process ended before checkpoint 2:\n' + ''.join(
          log(tmp / 'killed', i)[-3000:] for i in range(2)
        )
      elif killed_at is None and time.time() > deadline:
        problem = 'no checkpoint 2 within 400 s'
      elif killed_at is not None and time.time() > killed_at + 90:
        problem = (
          'process 0 kept running 90 s after process 1 died:\n' + log(tmp / 'killed', 0)[-3000:]
        )
      time.sleep(0.05)
    survivor_returncode = killed[0].poll()
    finish(one, tmp / 'one', timeout=400)
    finish(two, tmp / 'two', timeout=400)
  return Runs(tmp, killed_argv, port, problem, survivor_returncode)


# Run as two processes: checks that each process gets its own rows of the global
# batches and that the global arrays assembled from them are the intended batches.
BATCH_SCRIPT = """
import sys
from absl import flags
import jax
import numpy as np
from jax.experimental import multihost_utils
from l2p_jax import data
from l2p_jax.runtime import distributed, sharding

flags.FLAGS(sys.argv)
distributed.initialize_from_flags()
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
rank = jax.process_index()
n = 20
split = data.HostSplit('fake', 'train', np.zeros((n, 2, 2, 3), np.uint8),
                       np.arange(n, dtype=np.int32), 10)  # label == row
mesh = sharding.make_mesh()
half = slice(4 * rank, 4 * rank + 4)
cases = [(data.train_batch(split, seed=3, epoch=1, step=1, batch_size=8),
          data.epoch_permutation(3, 1, n)[8:16], None)]
for host, start in zip(data.eval_batches(split, 8), (0, 8, 16)):
  index = np.arange(start, start + 8)
  cases.append((host, np.where(index < n, index, 0), index < n))
assert len(cases) == 4
for host, labels, mask in cases:
  assert np.array_equal(host['label'], labels[half]), (host, labels)
  placed = sharding.shard_batch(mesh, host)
  assert placed['label'].shape == (8,)
  shards = sorted(placed['label'].addressable_shards, key=lambda s: s.index[0].start)
  assert np.array_equal(np.concatenate([s.data for s in shards]), labels[half])
  assert np.array_equal(
      multihost_utils.process_allgather(placed['label'], tiled=True), labels)
  if mask is not None:
    assert np.array_equal(host['mask'], mask[half])
    assert np.array_equal(
        multihost_utils.process_allgather(placed['mask'], tiled=True), mask)
print('batches ok', rank)
"""


def test_each_process_feeds_only_its_rows_of_every_global_batch(tmp_path):
  """Training and evaluation batches (the last one padded and masked): each process
  takes its contiguous half of the global batch, its devices hold exactly those rows,
  and the global array equals the batch one process would have built. The processes
  find the coordinator in $JAX_COORDINATOR_ADDRESS."""
  with launched(
    ['-c', BATCH_SCRIPT], tmp_path / 'batches', port=free_port(), env_coordinator=True
  ) as job:
    finish(job, tmp_path / 'batches', timeout=120)
  assert 'batches ok 0' in log(tmp_path / 'batches', 0)
  assert 'batches ok 1' in log(tmp_path / 'batches', 1)


def test_process_flags_without_a_job_stop_with_a_clear_message(tmp_path):
  """--distributed=auto outside any cluster, and --num_processes without a
  coordinator, stop at once, saying what to give; a coordinator no peer joins is
  given up after --initialization_timeout_seconds with a message."""
  cluster = ('SLURM_', 'OMPI_', 'TPU_', 'KUBERNETES_', 'JAX_COORDINATOR')
  env = {k: v for k, v in os.environ.items() if not k.startswith(cluster)}
  base = [
    sys.executable,
    str(ROOT / 'train.py'),
    '--config',
    f'{ROOT}/configs/cifar.py:tiny',
    '--workdir',
    str(tmp_path / 'unused'),
  ]
  cases = {
    '--distributed=auto': 'JAX finds the job by itself on Cloud TPU, SLURM',
    '--num_processes=2': '--num_processes and --process_id need --coordinator_address',
    # No peer: says that it waits, then gives up with a message, not a C++ abort.
    f'--coordinator_address=localhost:{free_port()} --num_processes=2 '
    '--process_id=0 --initialization_timeout_seconds=3': (
      'waiting up to 3 s for every process to join the coordinator at localhost:'
    ),
  }
  processes = [
    subprocess.Popen(
      [*base, *flag.split()],
      cwd=tmp_path,
      env=env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for flag in cases
  ]
  try:
    for p, message in zip(processes, cases.values()):
      output, _ = p.communicate(timeout=120)
      assert p.returncode != 0 and message in output, output[-3000:]
    assert 'Gave up after 3 s: not every process joined the coordinator' in output
    assert 'Check failure stack trace' not in output, output[-3000:]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.wait()
  assert not (tmp_path / 'unused').exists()


def test_two_processes_train_like_one_process_with_four_devices(runs):
  """Two processes of two devices give the parameters of one process of four; only
  process 0 writes config, metrics, TensorBoard, plot and progress bar, and both
  write the checkpoint."""
  two, one = runs.folder / 'two', runs.folder / 'one'
  # The sums across processes round differently from those within one process, and
  # PGD's sign steps flip where a gradient is near zero: measured, 3e-6 apart after
  # step 1 already, 1.1e-3 in a BN bias and 2.4e-3 in a BN running variance after
  # step 4 -- the tolerance of 1 vs 8 devices in test_train. Both processes feeding
  # the same rows (a bug tried on purpose) put weights 3e-2 apart by step 2.
  for step in (2, 4):
    a, b = restore(two, step), restore(one, step)
    chex.assert_trees_all_close(
      {name: a[name] for name in ('params', 'perturb', 'batch_stats')},
      {name: b[name] for name in ('params', 'perturb', 'batch_stats')},
      rtol=5e-3,
      atol=2e-3,
      custom_message=f'at step {step}',
    )
  assert int(restore(two, 4)['step']) == 4
  records, reference = read_metrics(two / 'metrics.jsonl'), read_metrics(one / 'metrics.jsonl')
  assert [r['epoch'] for r in records] == [0]  # One record: written once.
  assert records[0]['train_loss'] == pytest.approx(reference[0]['train_loss'], rel=1e-3)
  for key in ('eval_clean_accuracy', 'eval_pgd_accuracy'):
    assert abs(records[0][key] - reference[0][key]) <= 2 / 128  # 2 of 128 may flip.
  assert json.loads((two / 'config.json').read_text())['num_epochs'] == 1
  assert len(list((two / 'tensorboard').glob('events.out.tfevents.*'))) == 1
  assert (two / 'noise_evolution.png').stat().st_size > 10_000
  assert sorted(p.name for p in (two / 'checkpoints' / '4' / 'state').glob('ocdbt.process_*')) == [
    'ocdbt.process_0',
    'ocdbt.process_1',
  ]
  first, second = log(two, 0), log(two, 1)
  assert 'epoch 0 | lr 0.1' in first and 'epoch 0 |' not in second
  assert 'epoch 0 [1/1]' in first and 'epoch 0 [1/1]' not in second  # The progress bar.


def test_killed_process_stops_the_other_and_restart_resumes(runs: Runs):
  """Process 1 SIGKILLed once checkpoint 2 exists: process 0 stops by itself (within
  its 10 s heartbeat timeout and some slack); the same two commands again resume from
  checkpoint 2 and end bit-identical to the uninterrupted two-process run."""
  assert not runs.kill_problem, runs.kill_problem
  assert runs.survivor_returncode != 0
  workdir, reference = runs.folder / 'killed', runs.folder / 'two'
  saved = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert saved and saved[-1] < 4, saved  # Killed before the end.
  with launched(runs.killed_argv, workdir, port=runs.killed_port) as job:
    finish(job, workdir, timeout=400)
  assert 'Resuming from' in log(workdir, 0)
  chex.assert_trees_all_equal(restore(workdir, 4), restore(reference, 4))
  assert without_time(read_metrics(workdir / 'metrics.jsonl')) == without_time(
    read_metrics(reference / 'metrics.jsonl')
  )
