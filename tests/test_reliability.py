"""Nothing lost on a full disk, damaged checkpoints skipped in one line, every user
error of every entry point one line, and a killed reproduce.py taking its children
with it (issue 25)."""

import contextlib
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import fake_datasets
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar as cifar_configs
from l2p_jax import checkpointing
from l2p_jax.evaluation import results_files, results_report
from l2p_jax.runtime import cli, files

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(program, *args, timeout=300):
  """Runs an entry point from the repository's root; (returncode, stdout, stderr)."""
  result = subprocess.run(
    [sys.executable, program, *map(str, args)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return result.returncode, result.stdout, result.stderr


def one_line(stderr):
  """The single line an entry point stopped with; fails on tracebacks or more lines."""
  lines = [line for line in stderr.strip().splitlines() if not line.startswith('  warnings.')]
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


@contextlib.contextmanager
def mounted_tmpfs(path, options):
  """A tmpfs mounted at `path` (root only); skips the test where mounting is refused."""
  path.mkdir(parents=True, exist_ok=True)
  mount = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True, check=False
  )
  if mount.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mount.stderr.decode().strip()}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def fill(folder, leave):
  """Fills the file system of `folder` up to `leave` free bytes."""
  free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
  with open(folder / 'filler', 'wb') as f:
    f.write(bytes(max(0, free - leave)))


@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
  return fake_datasets.write_cifar10(tmp_path_factory.mktemp('cifar'), train=64, test=32)


# --- 1. a full disk loses nothing and says so in one line ----------------------------


def no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, 'No space left on device')


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / 'results.json'
  files.write_json(str(path), {'records': [1]})
  monkeypatch.setattr(os, 'replace', no_space)
  with pytest.raises(files.DiskFullError) as raised:
    files.write_json(str(path), {'records': [1, 2]})
  assert str(raised.value) == (
    f'no space left on device writing {path}; the previous results.json is intact'
  )
  assert json.loads(path.read_text()) == {'records': [1]}
  assert os.listdir(tmp_path) == ['results.json']


def test_a_failed_append_leaves_no_half_line(tmp_path, monkeypatch):
  path = tmp_path / 'metrics.jsonl'
  files.append_line(str(path), '{"epoch": 0}')
  write = os.write
  monkeypatch.setattr(os, 'write', lambda fd, data: write(fd, data[:5]) if len(data) > 5 else 1 / 0)
  with pytest.raises(ZeroDivisionError):
    files.append_line(str(path), '{"epoch": 1}')
  assert path.read_text() == '{"epoch": 0}\n'
  monkeypatch.setattr(os, 'write', no_space)
  with pytest.raises(files.DiskFullError, match='its earlier lines are intact'):
    files.append_line(str(path), '{"epoch": 1}')
  assert path.read_text() == '{"epoch": 0}\n'


def results(n):
  return {'config': {'eps': 8 / 255}, 'checkpoints': [], 'records': [], 'padding': 'x' * n}


def write_report(results, output_dir):
  """Every file of an evaluation's output: verdicts.npz and results.json, then results.md."""
  results_files.write_results(results, {}, output_dir)
  results_report.write_report(results, output_dir)


def test_eval_report_on_a_full_disk_keeps_the_earlier_results(tmp_path, monkeypatch):
  write_report(results(10), str(tmp_path))
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  monkeypatch.setattr(os, 'replace', no_space)  # verdicts.npz is written first.
  with pytest.raises(files.DiskFullError, match='the previous verdicts.npz is intact'):
    write_report(results(20), str(tmp_path))
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_eval_report_on_a_real_full_tmpfs_keeps_the_earlier_results(tmp_path):
  with mounted_tmpfs(tmp_path / 'disk', 'size=256k') as disk:
    write_report(results(1000), str(disk))
    before = (disk / 'results.json').read_text()
    fill(disk, leave=8192)
    with pytest.raises(files.DiskFullError, match='the previous results.json is intact'):
      write_report(results(100_000), str(disk))
    assert (disk / 'results.json').read_text() == before
    assert sorted(os.listdir(disk)) == ['filler', 'results.json', 'results.md', 'verdicts.npz']


def test_an_unreadable_results_json_is_one_line_naming_it(tmp_path):
  (tmp_path / 'eval').mkdir()
  (tmp_path / 'eval' / 'results.json').write_text('{"records": [')
  with pytest.raises(results_files.ResultsFileError, match='move it aside'):
    results_files.read_stored(str(tmp_path / 'eval'))
  code, _, stderr = run('eval.py', '--workdir', tmp_path)
  assert code == 1
  assert one_line(stderr).startswith(f'eval.py: {tmp_path}/eval/results.json does not read (')
  assert '--config.output_dir=DIR' in stderr


def save_checkpoints(directory, steps, method='l2p'):
  """Checkpoints of a tiny tree with a real config in their metadata."""
  manager = checkpointing.Checkpoints(str(directory), keep=10)
  config = cifar_configs.get_config(f'{method},tiny').to_dict()
  for step in steps:
    manager.save(step, {'w': jnp.full((4, 4), float(step))}, {'config': config})
  manager.wait()
  manager.close()


def test_training_on_a_full_disk_names_the_last_good_checkpoint(tmp_path):
  """What train.py prints when orbax's save fails on a full disk (its error is a
  ValueError from TensorStore): one line naming the newest checkpoint that reads."""
  save_checkpoints(tmp_path / 'checkpoints', (8, 12))
  (tmp_path / 'checkpoints' / '12' / 'state' / 'manifest.ocdbt').unlink()
  newest = checkpointing.newest_readable(str(tmp_path / 'checkpoints'))
  kept = f'the last good checkpoint is {newest}'
  with pytest.raises(SystemExit) as raised, cli.one_line_errors('train.py', lambda: kept):
    raise ValueError(
      f'RESOURCE_EXHAUSTED: Error writing local file "{tmp_path}/checkpoints/16.orbax-'
      "checkpoint-tmp/state/_sharding\": No space left on device [os_error_code='28']"
    )
  assert str(raised.value) == (
    f'train.py: no space left on device writing {tmp_path}/checkpoints/16.orbax-checkpoint-'
    f'tmp/state/_sharding; the last good checkpoint is {tmp_path}/checkpoints/8. Free some '
    'space and rerun the same command.'
  )


def test_train_py_on_a_real_full_tmpfs_is_one_line_naming_the_last_good_checkpoint(
  cifar_dir, tmp_path
):
  """Room for the first checkpoints of the tiny run, not for the rest."""
  with mounted_tmpfs(tmp_path / 'disk', 'size=1000k') as disk:
    code, _, stderr = run(
      'train.py',
      '--config',
      'configs/cifar.py:tiny',
      '--workdir',
      disk / 'run',
      '--config.data.source=local',
      f'--config.data.local_dir={cifar_dir}',
      '--config.data.train_examples=64',
      '--config.data.eval_examples=32',
      '--config.batch_size=8',
      '--config.progress_bar=False',
      timeout=600,
    )
    assert code == 1
    line = one_line(stderr)
    # 'writing PATH' when the failed write names its file; orbax's save does not always.
    assert line.startswith('train.py: no space left on device')
    kept = line.split('the last good checkpoint is ')[1].split('. Free some space')[0]
    assert checkpointing.newest_readable(str(disk / 'run' / 'checkpoints')) == kept


# A write of orbax's that TensorStore completes after the failed save awaiting it has
# closed its event loop: TensorStore calls the closed loop, which raises, and reports
# that as an unraisable error (a traceback on stderr, outside logging).
LATE_WRITE = """
import asyncio, functools, threading
import tensorstore as ts

def late_write():
  promise, write = ts.Promise.new()
  loop = asyncio.new_event_loop()
  loop.close()
  write.add_done_callback(functools.partial(loop.call_soon_threadsafe, print))
  return functools.partial(promise.set_result, None)
"""

# train.py whose second checkpoint save finds the disk full, with a late TensorStore
# write reported before the error reaches the main thread and another at exit.
FULL_DISK_AT_SECOND_SAVE = (
  LATE_WRITE
  + """
import atexit, runpy, sys
from l2p_jax import checkpointing

save, saves = checkpointing.Checkpoints.save, []

def save_on_a_full_disk(self, step, state, meta):
  saves.append(step)
  if len(saves) == 1:
    return save(self, step, state, meta)
  before = threading.Thread(target=late_write())
  before.start()
  before.join()
  atexit.register(late_write())
  raise ValueError(
    f'RESOURCE_EXHAUSTED: Error writing local file "{self.path(step)}.orbax-checkpoint-tmp/'
    'state/_sharding": No space left on device [os_error_code=28]'
  )

checkpointing.Checkpoints.save = save_on_a_full_disk
sys.argv[0] = 'train.py'
runpy.run_path('train.py', run_name='__main__')
"""
)


def test_train_py_on_a_full_disk_is_one_line_despite_late_tensorstore_tracebacks(
  cifar_dir, tmp_path
):
  """TensorStore reports writes that outlive a failed save as tracebacks, before the
  error reaches train.py and until it exits; none of them shows."""
  code, _, stderr = run(
    '-c',
    FULL_DISK_AT_SECOND_SAVE,
    '--config',
    'configs/cifar.py:tiny',
    '--workdir',
    tmp_path / 'run',
    '--config.data.source=local',
    f'--config.data.local_dir={cifar_dir}',
    '--config.data.train_examples=64',
    '--config.data.eval_examples=32',
    '--config.num_epochs=2',
    '--config.progress_bar=False',
  )
  assert code == 1
  assert one_line(stderr) == (
    f'train.py: no space left on device writing {tmp_path}/run/checkpoints/2.orbax-checkpoint-'
    f'tmp/state/_sharding; the last good checkpoint is {tmp_path}/run/checkpoints/1. Free some '
    'space and rerun the same command.'
  )


# After quiet_orbax, a late TensorStore write; then unraisable errors it must not hide:
# one raised elsewhere with the same message, and another error.
LATE_WRITE_AND_OTHERS = (
  LATE_WRITE
  + """
from l2p_jax.runtime import orbax_logging

class Closing:
  def __del__(self):
    raise RuntimeError('Event loop is closed')

class Dividing:
  def __del__(self):
    1 / 0

orbax_logging.quiet_orbax()
late_write()()
Closing()
Dividing()
"""
)


def test_only_tensorstore_calls_into_a_closed_loop_are_dropped():
  code, _, stderr = run('-c', LATE_WRITE_AND_OTHERS)
  assert code == 0
  assert 'call_soon_threadsafe' not in stderr
  reported = [line for line in stderr.splitlines() if line.startswith('Exception ignored in')]
  assert len(reported) == 2 and 'Closing.__del__' in reported[0], stderr
  assert 'Dividing.__del__' in reported[1] and 'ZeroDivisionError' in stderr


# --- 2. a damaged checkpoint is skipped in one warning line ------------------------------


def test_eval_py_says_it_skipped_a_damaged_checkpoint(tmp_path):
  """The newest checkpoint's metadata is gone: eval.py warns, naming it, and goes on to
  the older one (which the arch flag then refuses, before any attack is compiled)."""
  save_checkpoints(tmp_path / 'checkpoints', (4, 8))
  (tmp_path / 'checkpoints' / '8' / 'meta' / 'metadata').unlink()
  code, _, stderr = run('eval.py', '--workdir', tmp_path, '--config.model.arch=resnet20')
  assert code == 1
  lines = stderr.strip().splitlines()
  assert 'Traceback' not in stderr and len(lines) == 2, stderr[-3000:]
  assert f'Checkpoint {tmp_path}/checkpoints/8 is unreadable' in lines[0]
  assert 'trying an older one' in lines[0]
  assert lines[1].startswith(f'eval.py: The checkpoint {tmp_path}/checkpoints/4 holds')


# --- 3. every user error is one line -----------------------------------------------------


def train(cifar_dir, workdir, *overrides):
  return run(
    'train.py',
    '--config',
    'configs/cifar.py:tiny',
    '--workdir',
    workdir,
    '--config.data.source=local',
    f'--config.data.local_dir={cifar_dir}',
    '--config.data.train_examples=64',
    *overrides,
  )


@pytest.mark.parametrize(
  'overrides,message',
  [
    (
      ['--config.data.dataset=fashion_mnst'],
      "train.py: data.dataset='fashion_mnst' has no local reader; data.source=local reads "
      "cifar10, cifar100, fashion_mnist, mnist (did you mean 'fashion_mnist'?).",
    ),
    (
      ['--config.batch_size=128'],
      'train.py: batch_size=128 exceeds the 64 training examples of cifar10/train; lower '
      'batch_size or raise data.train_examples.',
    ),
    (
      ['--config.model.pni_mode=bogus'],
      "train.py: Unknown model.pni_mode 'bogus'; expected one of ('layer', 'channel', 'element').",
    ),
  ],
  ids=['unknown_local_dataset', 'batch_above_examples', 'pni_mode'],
)
def test_train_py_config_mistakes_are_one_line(cifar_dir, tmp_path, overrides, message):
  code, _, stderr = train(cifar_dir, tmp_path / 'run', *overrides)
  assert code == 1
  assert one_line(stderr) == message


def test_a_failed_start_leaves_no_workdir_and_no_config_json(cifar_dir, tmp_path):
  """A start refused at its data leaves nothing behind; the start that then trains
  writes config.json with its own values (it used to keep the failed start's)."""
  code, _, _ = train(cifar_dir, tmp_path / 'run', '--config.batch_size=128')
  assert code == 1 and not (tmp_path / 'run').exists()
  code, _, stderr = train(cifar_dir, tmp_path / 'run', '--config.data.dataset=fashion_mnst')
  assert code == 1 and not (tmp_path / 'run').exists(), stderr
  code, stdout, stderr = train(
    cifar_dir, tmp_path / 'run', '--config.num_epochs=1', '--config.data.eval_examples=32'
  )
  assert code == 0, stderr[-3000:]
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['batch_size'] == 64
  assert 'epoch 0 [1/1]' in stderr and 'epoch 0 | lr' in stdout  # From 0, as metrics.jsonl.
  assert (
    'method=l2p trains no adversarial step: adv.start_epoch=1 is not below num_epochs=1.'
  ) in stderr


def test_divergence_before_any_checkpoint_says_a_rerun_starts_over(cifar_dir, tmp_path):
  code, _, stderr = train(
    cifar_dir,
    tmp_path / 'run',
    '--config.optim.learning_rate=3e38',  # Infinite weights after the first step.
    '--config.data.eval_examples=32',
  )
  assert code == 1 and 'Traceback' not in stderr
  line = stderr.strip().splitlines()[-1]  # The progress bar closed before the message.
  assert line.startswith('train.py: Non-finite loss or train state')
  assert 'Last good checkpoint: none (no checkpoint was written yet).' in line
  assert line.endswith('rerunning the same command starts over.')
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_a_missing_config_file_is_one_line(tmp_path):
  for program, *rest in (
    ('train.py', '--workdir', tmp_path),
    ('eval.py', '--workdir', tmp_path),
    ('compare_torch.py',),
  ):
    code, _, stderr = run(program, '--config', 'configs/nope.py:tiny', *rest)
    assert code == 1
    assert one_line(stderr) == (
      f'{program}: --config=configs/nope.py:tiny did not load ([Errno 2] No such file or '
      "directory: 'configs/nope.py'); name a config file of configs/, as FILE.py[:ARG]."
    )


@pytest.mark.parametrize(
  'program,args,message',
  [
    (
      'compare_torch.py',
      ['--config', 'configs/cifar.py:pni,resnet9'],
      "compare_torch.py: Unknown architecture 'resnet9'; expected 'resnet<6n+2>' (ResNet-V1: "
      "resnet20, resnet32, resnet44, resnet56, ...) or 'resnet18' (ResNet-V2(18)).",
    ),
    (
      'train.py',
      ['--config', 'configs/cifar.py:bogus,resnet8', '--workdir', 'unused'],
      "train.py: Unknown method 'bogus' in config argument 'bogus,resnet8'; expected one of "
      "('none', 'vanilla', 'pni', 'adv_bnn', 'l2p').",
    ),
    (
      'compare_torch.py',
      ['--config', 'configs/cifar.py:pni,resnet8', '--stepz=3'],
      "compare_torch.py: Unknown command line flag 'stepz'. Did you mean: steps ? Pass "
      '--helpshort or --helpfull to see help on flags.',
    ),
  ],
  ids=['config_refuses_arch', 'config_refuses_method', 'unknown_flag'],
)
def test_a_refused_config_argument_or_flag_is_one_line(program, args, message):
  """What the config file raises, without its exception's type; absl's flag errors with
  their hint on the same line."""
  code, _, stderr = run(program, *args)
  assert (code, one_line(stderr)) == (1, message)


def test_a_workdir_that_is_a_file_is_one_line(cifar_dir, tmp_path):
  (tmp_path / 'taken').write_text('')
  code, _, stderr = train(cifar_dir, tmp_path / 'taken')
  assert (code, one_line(stderr)) == (
    1,
    f'train.py: --workdir {tmp_path}/taken is a file, not a folder; name a folder you can write.',
  )
  code, _, stderr = run('reproduce.py', '--workdir', tmp_path / 'taken' / 'grid', '--scale=tiny')
  assert (code, one_line(stderr)) == (
    1,
    f'reproduce.py: --workdir {tmp_path}/taken/grid cannot be created: {tmp_path}/taken is a '
    'file, not a folder; name a folder you can write.',
  )


def test_a_read_only_workdir_is_one_line(cifar_dir, tmp_path):
  with mounted_tmpfs(tmp_path / 'ro', 'ro,size=64k') as folder:
    code, _, stderr = train(cifar_dir, folder / 'run')
  assert code == 1
  assert one_line(stderr) == (
    f'train.py: --workdir {folder}/run cannot be created: {folder} is read-only here; name a '
    'folder you can write.'
  )


@pytest.mark.parametrize(
  'override',
  [
    '--config.eot.draws=0',
    '--config.pgd.restarts=-1',
    '--config.pgd.steps=0',
    '--config.predict.draws=0',
  ],
)
def test_eval_py_refuses_counts_below_one_in_one_line(tmp_path, override):
  save_checkpoints(tmp_path / 'checkpoints', (4,))
  code, _, stderr = run('eval.py', '--workdir', tmp_path, override)
  field = override.split('--config.')[1].split('=')[0]
  assert code == 1
  assert one_line(stderr).startswith(f'eval.py: config.{field}=')


def test_compare_torch_py_mistyped_key_and_data_are_one_line(cifar_dir):
  code, _, stderr = run(
    'compare_torch.py', '--config', 'configs/cifar.py:pni,resnet8,cifar10,tiny', '--config.lr=3'
  )
  assert code == 1
  assert one_line(stderr) == (
    "compare_torch.py: --config.lr: the config has no field 'lr'; check the spelling against "
    'the config file.'
  )
  code, _, stderr = run(
    'compare_torch.py',
    '--config',
    'configs/cifar.py:pni,resnet8,cifar10,tiny',
    '--config.data.source=local',
    f'--config.data.local_dir={cifar_dir}',
    '--config.data.train_examples=0',
    '--config.batch_size=128',
  )
  assert code == 1
  assert one_line(stderr).startswith('compare_torch.py: batch_size=128 exceeds the 64')


def test_convert_torch_py_with_a_pickled_list_is_one_line(tmp_path):
  torch = pytest.importorskip('torch')
  torch.save([1, 2, 3], tmp_path / 'list.pth')
  code, _, stderr = run(
    'convert_torch.py',
    '--torch_checkpoint',
    tmp_path / 'list.pth',
    '--config',
    'configs/cifar.py:pni,resnet8,cifar10',
    '--workdir',
    tmp_path / 'run',
  )
  assert code == 1
  assert one_line(stderr) == (
    'convert_torch.py: The checkpoint holds a list, not a state dict (a mapping from parameter '
    'names to tensors); save one with torch.save(model.state_dict(), path).'
  )


# --- 5. a killed reproduce.py takes its children with it ----------------------------------

PARENT = """
import sys
from l2p_jax.reproduction import grid_runner
child = 'import os, time; open(sys.argv[1], "w").write(str(os.getpid())); time.sleep(120)'
grid_runner.launch_subprocess(
  ['python', '-c', 'import sys; ' + child, sys.argv[1]], sys.argv[2], root='.'
)
"""


def gone(pid):
  """Whether process `pid` has ended (a zombie nobody reaped has ended too)."""
  try:
    with open(f'/proc/{pid}/status') as f:
      return 'State:\tZ' in f.read()
  except FileNotFoundError:
    return True


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux')
@pytest.mark.parametrize('signum', [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_grid_runner_takes_its_child_with_it(tmp_path, signum):
  pid_file = tmp_path / 'child.pid'
  parent = subprocess.Popen(
    [sys.executable, '-c', textwrap.dedent(PARENT), str(pid_file), str(tmp_path / 'log')], cwd=ROOT
  )
  deadline = time.time() + 60
  while not (pid_file.exists() and pid_file.read_text()):
    assert parent.poll() is None and time.time() < deadline, 'the child did not start'
    time.sleep(0.05)
  child = int(pid_file.read_text())
  parent.send_signal(signum)
  assert parent.wait(timeout=30) == -signum
  deadline = time.time() + 10
  while not gone(child) and time.time() < deadline:
    time.sleep(0.05)
  if not gone(child):
    os.kill(child, signal.SIGKILL)
    pytest.fail('the child outlived its parent')


# --- 6. converted models keep their input shape -------------------------------------------


def test_a_converted_fashion_mnist_model_keeps_its_28x28x1_input(tmp_path):
  torch = pytest.importorskip('torch')
  from l2p_jax.interop.parity import torch_reference as ref

  net = ref.ResNetV1(8, noise='pni', pni_mode='channel', width=0.5, image_size=28, in_channels=1)
  model = torch.nn.Sequential(ref.NormalizeLayer((0.286,), (0.353,)), net)
  torch.save(model.state_dict(), tmp_path / 'pni.pth')
  code, _, stderr = run(
    'convert_torch.py',
    '--torch_checkpoint',
    tmp_path / 'pni.pth',
    '--config',
    'configs/cifar.py:pni,resnet8,fashion_mnist',
    '--config.model.width=0.5',
    '--workdir',
    tmp_path / 'run',
  )
  assert code == 0, stderr[-3000:]
  assert not [line for line in stderr.splitlines() if line[:1] in 'IW' and '] ' in line], stderr
  meta = checkpointing.Checkpoints(str(tmp_path / 'run' / 'checkpoints'), read_only=True).meta(0)
  assert (meta['image_shape'], meta['num_classes']) == ([28, 28, 1], 10)
  np.testing.assert_allclose(meta['std'], [0.353], rtol=1e-6)


# --- 7. reproduce.py names its own flag for missing data ---------------------------------


@pytest.mark.parametrize('flag', ['local_dir', 'data_dir'])
def test_reproduce_py_missing_data_names_local_dir(tmp_path, flag):
  """--data_dir, the old name of --local_dir, still works and says it is old."""
  code, _, stderr = run(
    'reproduce.py', '--workdir', tmp_path / 'grid', '--scale=small', f'--{flag}={tmp_path}'
  )
  assert code == 1
  old_name = [line for line in stderr.splitlines() if '--data_dir is now --local_dir' in line]
  assert len(old_name) == (flag == 'data_dir')
  line = one_line(stderr.replace(''.join(f'{w}\n' for w in old_name), ''))
  assert line.startswith(
    f'reproduce.py: --local_dir={tmp_path} does not hold fashion_mnist ({tmp_path}/train-images'
  )
  assert 'pass --local_dir=DIR' in line and '--config.data.local_dir' not in line
