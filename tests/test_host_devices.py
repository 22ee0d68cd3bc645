"""Two XLA:CPU devices per available core by default: who decides the count, the rule for
a batch the cores do not divide, and what a device count does to a run's bits (the same
count gives the same bits; a resume on another count warns; evaluation does not depend
on it). Runs that need a count other than this process's one device are subprocesses."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import chex
import fake_datasets
import jax
import pytest

from configs import cifar as cifar_configs
from configs import eval as eval_configs
from l2p_jax import checkpointing, evaluation
from l2p_jax.errors import UserError
from l2p_jax.runtime import host_devices
from l2p_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))
XLA_8 = '--xla_force_host_platform_device_count=8'
BATCHES = {'batch_size': 128, 'eval_batch_size': 256}


def choose(requested=0, batches=BATCHES, cores=4, xla_flags='', jax_count=-1):
  return host_devices.choose(
    requested, batches, cores=cores, xla_flags=xla_flags, jax_count=jax_count
  )


def test_the_default_is_two_devices_per_available_core():
  assert choose() == host_devices.Choice(8, '2 per available core (8 for 4 cores)')
  assert choose(cores=1).count == 2


def test_an_explicit_count_wins_flag_first():
  assert choose(xla_flags=f'--foo {XLA_8}').count is None  # JAX reads XLA_FLAGS itself.
  assert 'XLA_FLAGS' in choose(xla_flags=XLA_8).source
  assert choose(jax_count=3, xla_flags=XLA_8).source == 'JAX_NUM_CPU_DEVICES=3'
  assert choose(3, jax_count=5, xla_flags=XLA_8).count == 3
  assert choose(3, batches={'batch_size': 100}).note is None  # As asked; the mesh refuses.
  with pytest.raises(UserError, match=r'--cpu_devices=-1: give a number of devices, or 0'):
    choose(-1)


def test_a_batch_the_cores_do_not_divide_runs_on_the_largest_count_that_does():
  assert choose(cores=6).count == 8  # 12 does not divide 128.
  assert choose(cores=8, batches={'batch_size': 128, 'eval_batch_size': 100}).count == 4
  choice = choose(cores=3, batches={'batch_size': 128, 'eval_batch_size': 100})
  assert choice.count == 4
  assert choice.note == (
    '4 CPU devices, not 2 per available core (6 for 3 cores): 4 is the largest count that '
    'divides batch_size 128 and eval_batch_size 100. A batch that is a multiple of 6 gets all '
    'of them.'
  )
  assert choose(cores=3, batches={'config.batch_size': 7}).count == 1


def run_python(code: str, **env) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh CPU-only process without any device count in its
  environment (plus `env`), from the repository's root."""
  clean = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    env={**clean, 'JAX_PLATFORMS': 'cpu', **env},
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


COUNT = """
  import jax
  from absl import logging
  from l2p_jax.runtime import host_devices
  logging.set_verbosity(logging.INFO)
  host_devices.log_choice(host_devices.configure({{'batch_size': {batch}}}))
  print(jax.device_count(), len(jax.devices('cpu')))
"""


def test_configure_sets_the_cpu_count_before_jax_starts():
  """The default follows the process's CPU affinity; XLA_FLAGS keeps its count."""
  default = run_python(COUNT.format(batch=CORES * 64))
  assert default.stdout.split() == [str(2 * CORES)] * 2
  assert f'{2 * CORES} CPU devices (2 per available core ({2 * CORES} for {CORES} cores))' in (
    default.stderr
  )
  forced = run_python(COUNT.format(batch=64), XLA_FLAGS='--xla_force_host_platform_device_count=3')
  assert forced.stdout.split() == ['3', '3'] and 'XLA_FLAGS' in forced.stderr


def test_the_lowered_count_is_said_once():
  prime = next(n for n in range(2 * CORES + 1, 10**6) if all(n % k for k in range(2, n)))
  odd = run_python(COUNT.format(batch=prime))
  assert odd.stdout.split() == ['1', '1']
  assert odd.stderr.count('1 CPU devices, not 2 per available core') == 1


@pytest.mark.parametrize('program', ['train.py', 'eval.py'])
def test_the_entry_points_take_the_flag(program, tmp_path):
  result = subprocess.run(
    [sys.executable, str(ROOT / program), '--workdir', str(tmp_path), '--cpu_devices=-1']
    + (['--config', f'{ROOT}/configs/cifar.py:tiny'] if program == 'train.py' else []),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  assert result.stderr.strip().endswith(
    f'{program}: --cpu_devices=-1: give a number of devices, or 0 for 2 per available core.'
  )


def test_the_note_is_for_cpu_runs_only(monkeypatch, caplog):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  host_devices.log_choice(choose(cores=3))
  assert 'CPU devices' not in caplog.text


# --- a device count and the bits of a run -----------------------------------------------


def tiny(cifar_dir, **fields):
  config = cifar_configs.get_config('l2p,resnet8,cifar10,tiny')
  config.data.source, config.data.local_dir = 'local', str(cifar_dir)
  config.progress_bar, config.num_epochs = False, 2  # Epoch 1 trains adversarially.
  config.update_from_flattened_dict(fields)
  return config


TRAIN_AND_EVALUATE = """
  import sys
  sys.path.insert(0, 'tests')
  from test_host_devices import tiny, evaluate
  from l2p_jax.runtime import host_devices
  from l2p_jax.training import loop
  host_devices.configure({'batch_size': 64}, requested=2)
  cifar_dir, base = sys.argv[1], sys.argv[2]
  for run in ('a', 'b'):
    loop.train_and_evaluate(tiny(cifar_dir), f'{base}/{run}')
  evaluate(f'{base}/a', f'{base}/a/eval_2_devices')
"""


def evaluate(workdir, output_dir):
  """Clean and PGD-7 accuracy of the run's last checkpoint on 64 test images."""
  config = eval_configs.get_config('tiny')
  config.update_from_flattened_dict(
    {'attacks': 'clean,pgd', 'pgd.steps': 7, 'batch_size': 32, 'data.examples': 64}
  )
  config.output_dir = output_dir
  return evaluation.evaluate_workdirs(config, [workdir])


@pytest.fixture(scope='module')
def two_device_runs(tmp_path_factory):
  """The tiny L2P config trained twice on 2 CPU devices (a process of its own, whose
  XLA_FLAGS of 8 devices the configured count overrides), and the first run evaluated
  there; returns (cifar folder, folder of runs a and b)."""
  cifar = fake_datasets.write_cifar10(tmp_path_factory.mktemp('cifar'), train=512, test=128)
  base = tmp_path_factory.mktemp('two_devices')
  code = TRAIN_AND_EVALUATE.replace('sys.argv[1], sys.argv[2]', f'{str(cifar)!r}, {str(base)!r}')
  env = dict(os.environ, XLA_FLAGS=XLA_8, JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return cifar, base


def restore(workdir, step=16):
  checkpoints = checkpointing.Checkpoints(str(workdir / 'checkpoints'), read_only=True)
  state, meta = checkpoints.restore(step)
  checkpoints.close()
  return state, meta


def test_the_same_config_on_the_same_device_count_gives_the_same_bits(two_device_runs):
  _, base = two_device_runs
  (a, meta), (b, _) = restore(base / 'a'), restore(base / 'b')
  assert meta['devices'] == 2
  chex.assert_trees_all_equal(a, b)
  assert (base / 'a' / 'metrics.jsonl').read_text().count('"epoch"') == 2


def test_evaluation_does_not_depend_on_the_device_count(two_device_runs, tmp_path):
  """The same records, bit for bit, from 1 device here as from 2 in the subprocess."""
  _, base = two_device_runs
  one = evaluate(str(base / 'a'), str(tmp_path))
  two = json.loads((base / 'a' / 'eval_2_devices' / 'results.json').read_text())
  times = ('seconds', 'judge_seconds')
  drop = lambda records: [{k: v for k, v in r.items() if k not in times} for r in records]  # noqa
  assert drop(json.loads(json.dumps(one))['records']) == drop(two['records'])
  assert {r['attack'] for r in two['records']} == {'clean', 'pgd'}


def test_a_resume_on_another_device_count_warns_and_goes_on(two_device_runs, tmp_path, caplog):
  cifar, base = two_device_runs
  workdir = pathlib.Path(shutil.copytree(base / 'a', tmp_path / 'a'))
  loop.train_and_evaluate(tiny(cifar, num_epochs=3), str(workdir))
  assert (
    f'Resuming {workdir}/checkpoints/16, written by a run on 2 devices, on 1: the run goes '
    'on, but not bit-identical' in caplog.text
  )
  assert '(--cpu_devices=2 on a CPU)' in caplog.text
  assert restore(workdir, 24)[1]['devices'] == 1
