"""A stopped evaluation keeps what it finished (issue 38): eval.py writes each attack's
record as it ends, Ctrl-C ends it at once with one line, and a rerun of the same command
records only the rest, ending equal to an uninterrupted run."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import tiny_runs

from configs import eval as eval_configs
from l2p_jax import evaluation
from l2p_jax.evaluation import progress

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATTACKS = 'clean,fgsm,pgd'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny L2P run (randomized, so records are judged over draws)."""
  return tiny_runs.train_runs(tmp_path_factory, {'l2p': 1})['l2p']


@pytest.fixture(scope='module')
def uninterrupted(run, tmp_path_factory):
  """results.json of the attacks run through without a stop."""
  config = eval_configs.get_config('tiny')
  config.attacks, config.progress_bar = ATTACKS, False
  config.output_dir = str(tmp_path_factory.mktemp('uninterrupted'))
  evaluation.evaluate_workdirs(config, str(run))
  return json.loads((pathlib.Path(config.output_dir) / 'results.json').read_text())


def eval_command(run, output_dir):
  return [
    sys.executable,
    str(ROOT / 'eval.py'),
    f'--workdir={run}',
    f'--config={ROOT}/configs/eval.py:tiny',
    f'--config.attacks={ATTACKS}',
    '--config.progress_bar=False',
    f'--config.output_dir={output_dir}',
  ]


def recorded(output_dir):
  """The records of output_dir/results.json, [] while there is none."""
  path = output_dir / 'results.json'
  return json.loads(path.read_text())['records'] if path.exists() else []


def comparable(results):
  """results without wall-clock times and the output folder."""
  times = ('seconds', 'judge_seconds')
  return {
    **results,
    'config': {k: v for k, v in results['config'].items() if k != 'output_dir'},
    'records': [{k: v for k, v in r.items() if k not in times} for r in results['records']],
  }


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGKILL])
def test_a_stopped_evaluation_keeps_its_records_and_a_rerun_finishes_it(
  run, uninterrupted, tmp_path, signum
):
  command = eval_command(run, tmp_path)
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while len(recorded(tmp_path)) < 2 and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signum)
  sent = time.time()
  _, stderr = process.communicate(timeout=60)
  stopped = time.time() - sent
  stderr = stderr.decode()
  first = [r['attack'] for r in recorded(tmp_path)]
  assert first[:2] == ['clean', 'fgsm'] and len(first) == 2, first
  if signum == signal.SIGINT:
    assert stopped < 10 and process.returncode == 1
    assert 'Traceback' not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
      'eval.py: interrupted; 2 of 3 attacks recorded; rerun the same command to go on.'
    )

  rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert rerun.stdout.count('recorded by an earlier run into this folder, not rerun') == 2
  final = json.loads((tmp_path / 'results.json').read_text())
  assert comparable(final) == comparable(uninterrupted)
  assert first == [r['attack'] for r in final['records']][:2]


def test_the_plan_and_attack_counts_are_said_before_and_during(run, tmp_path):
  result = subprocess.run(
    eval_command(run, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr
  assert 'plan: 3 attacks on 12 images, randomized models judged over 3 noise draws' in (
    result.stdout
  )
  lines = result.stdout.splitlines()
  [head] = [line for line in lines if line.startswith('estimate: ~')]
  assert 'ms/image) measured here; an upper bound where an attack stops early' in head
  priced = [line for line in lines if line.startswith('  attack ')]
  assert [line.split()[1] for line in priced] == ['1/3', '2/3', '3/3']
  assert ' pgd(steps=2, ' in priced[2] and '(12 images x 2 gradients and ' in priced[2]


def test_the_default_list_on_a_cpu_with_many_images_is_warned_about():
  config = eval_configs.get_config()
  [plan, warning] = progress.plan_lines(config, 14, 1000)
  assert plan.startswith('plan: 14 attacks on 1000 images, randomized models judged over 30 ')
  assert warning.startswith('warning: the default attack list is sized for a GPU; on this CPU')
  assert len(progress.plan_lines(config, 14, 16)) == 1
  config.attacks = 'clean,fgsm'
  assert len(progress.plan_lines(config, 2, 1000)) == 1


def test_a_rerun_on_other_images_reruns_the_attack(run, tmp_path):
  config = eval_configs.get_config('tiny')
  config.attacks, config.progress_bar, config.output_dir = 'clean', False, str(tmp_path)
  for examples in (12, 8):
    config.data.examples = examples
    [record] = evaluation.evaluate_workdirs(config, str(run))['records']
    assert record['n'] == examples
