"""A stopped evaluation keeps what it finished (issue 38): eval.py writes each attack's
record as it ends, Ctrl-C ends it at once with one line, and a rerun of the same command
records only the rest, ending equal to an uninterrupted run; records judged before the
judged draws were shared are rerun, and every attack shares one judgement of the clean
images."""

import gc
import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tiny_runs

from configs import eval as eval_configs
from l2p_jax import data, evaluation
from l2p_jax.evaluation import progress, recording, records, results_files, verdicts

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The last attack runs long enough (50 steps) that a stop sent once two records are on
# disk lands inside it, however loaded the machine.
ATTACKS = 'clean,fgsm,pgd50'


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
  # Its estimate prices only the attack it runs, and the clean images it judges for it.
  priced = [line for line in rerun.stdout.splitlines() if line.startswith('  attack ')]
  assert [
    line.endswith(': already recorded in the output folder, not priced') for line in priced
  ] == [True, True, False]
  assert ' pgd(steps=50, ' in priced[2]
  assert rerun.stdout.count('  judging the clean images of ') == 1
  final = json.loads((tmp_path / 'results.json').read_text())
  assert comparable(final) == comparable(uninterrupted)
  assert first == [r['attack'] for r in final['records']][:2]


def test_a_stop_in_a_garbage_collector_callback_ends_the_run_before_its_next_record(
  tmp_path, monkeypatch
):
  """Ctrl-C landing in a gc callback (JAX registers one) would raise there, where Python
  drops the exception with a traceback and the run goes on (an evaluation once recorded
  its third attack so); it is marked instead, and the next record is not written."""
  config = eval_configs.get_config('tiny')
  recorder = recording.Recorder(config, recording.open_results(str(tmp_path)), str(tmp_path), 3)
  dropped, handler = [], signal.getsignal(signal.SIGINT)  # SIG_IGN in an xdist worker.
  monkeypatch.setattr(sys, 'unraisablehook', dropped.append)

  def interrupt_once(phase, info):
    if phase == 'start' and not recorder.stopped:
      signal.raise_signal(signal.SIGINT)

  gc.callbacks.append(interrupt_once)  # The collector reads this very list.
  try:
    with pytest.raises(evaluation.EvaluationInterrupted, match=r'0 of 3 attacks recorded'):
      with recorder.stops():
        gc.collect()
        assert recorder.stopped and not dropped
        recorder.add([], {})
  finally:
    gc.callbacks.remove(interrupt_once)
  assert not (tmp_path / 'results.json').exists()
  assert signal.getsignal(signal.SIGINT) == handler  # Put back.


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
  assert ' pgd(steps=50, ' in priced[2] and '(12 images x 50 gradients and ' in priced[2]
  [clean] = [line for line in lines if line.startswith('  judging the clean images of ')]
  assert 'once for all its attacks: ~' in clean
  assert '(12 images x 3 forward passes)' in clean  # 3 judged draws of one prediction each.


def test_the_default_list_on_a_cpu_with_many_images_is_warned_about():
  config = eval_configs.get_config()
  [plan, warning] = progress.plan_lines(config, 14, 1000)
  assert plan.startswith('plan: 14 attacks on 1000 images, randomized models judged over 30 ')
  assert warning.startswith('warning: the default attack list is sized for a GPU; on this CPU')
  assert len(progress.plan_lines(config, 14, 16)) == 1
  config.attacks = 'clean,fgsm'
  assert len(progress.plan_lines(config, 2, 1000)) == 1


def test_a_rerun_on_other_images_reruns_the_attack_and_says_what_it_replaces(run, tmp_path, capsys):
  """The record on 8 images replaces the one on 12 (one per identity), with a line that
  names the change; rerun on the same 8, nothing is replaced and nothing said."""
  config = eval_configs.get_config('tiny')
  config.attacks, config.progress_bar, config.output_dir = 'clean', False, str(tmp_path)
  said = []
  for examples in (12, 8, 8):
    config.data.examples = examples
    [record] = evaluation.evaluate_workdirs(config, str(run))['records']
    assert record['n'] == examples
    said.append([line for line in capsys.readouterr().out.splitlines() if 'replaces' in line])
  assert said[0] == [] and said[2] == []
  assert said[1] == [
    f'{record["label"]} {record["name"]}: replaces the record of an earlier run in this folder, '
    'measured with other settings (n 12 -> 8)'
  ]


def test_records_judged_before_the_draws_were_shared_are_rerun(run, uninterrupted, tmp_path):
  """An output folder of records without `judging` (and verdicts without per-draw bits),
  as written before every attack shared the judged draws: a rerun of the same command
  reuses none of them, and its worst case is then taken per draw as well."""
  old = {**uninterrupted, 'records': []}
  for r in uninterrupted['records']:
    old['records'].append({k: v for k, v in r.items() if k != 'judging'})
  (tmp_path / 'results.json').write_text(json.dumps(old))
  stored = verdicts.read(uninterrupted['config']['output_dir'])
  verdicts.write(str(tmp_path), {k: v for k, v in stored.items() if not k.endswith('.bits')})
  result = subprocess.run(
    eval_command(run, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr
  assert 'not rerun' not in result.stdout
  final = json.loads((tmp_path / 'results.json').read_text())
  assert [r['judging'] for r in final['records']] == ['shared_draws'] * 3
  assert comparable(final) == comparable(uninterrupted)
  assert 'accuracy_per_draw' in final['worst_case'][0]


def test_every_attack_is_judged_against_the_same_clean_verdicts(run):
  """The clean images are judged once per batch (12 images in batches of 8: 2) and once
  more for the few-pixel attack's first 4 images, whose batch is not the same; the
  clean record's bits are what the cache holds, and FGSM's and PGD's `fooled` count the
  images the clean record has right under a draw and the attack has not."""
  config = eval_configs.get_config('tiny')
  config.attacks, config.progress_bar = 'clean,fgsm,pgd,few_pixel', False
  checkpoint = evaluation.runner._RestoredCheckpoints(config).load(str(run))
  model = evaluation.checkpoint_model(checkpoint)
  split = evaluation.load_examples(evaluation.data_settings(config, checkpoint))
  specs, _ = evaluation.plan_attacks(config)
  mesh, clean = evaluation.runner.eval_mesh(config), evaluation.CleanVerdicts()
  recorder = evaluation.Recorder(config, results_files.Stored(None, {}), None, len(specs))
  evaluation.evaluate_model(config, model, 'l2p', split, specs, mesh, recorder, clean)
  assert clean.made == 3
  bits = {r['attack']: verdicts.draw_bits(recorder.found, r) for r in recorder.records}
  batches = data.device_batches(mesh, data.eval_batches(split, config.batch_size))
  settings = (3, 'single', 1)
  held = [clean.right(model, split, b, batch, settings, config) for b, batch in enumerate(batches)]
  assert clean.made == 3  # Found, not made again.
  np.testing.assert_array_equal(bits['clean'], np.concatenate(held)[:12])
  for r in recorder.records[1:3]:
    assert r['fooled'] == np.sum(bits['clean'] & ~bits[r['attack']]) > 0, r['attack']


def test_a_replaced_record_is_named_with_every_setting_that_changed():
  """Judged draws and key changed: one line naming both; a record of another identity,
  or one measured the same way, replaces nothing that needs saying."""
  old = {
    'checkpoint': 'ck/320', 'source': None, 'name': 'cw(steps=100)', 'dataset': 'fashion_mnist',
    'split': 'test', 'rule': 'single', 'draws': 1, 'noise': True, 'label': 'pni-s0', 'n': 64,
    'judged_draws': 10, 'judging': 'shared_draws', 'key': {'seed': 0, 'fold_in': [7]},
  }  # fmt: skip
  new = {**old, 'judged_draws': 3, 'key': {'seed': 1, 'fold_in': [7]}}
  stored = {'records': [old]}
  assert records.replaced_lines([new], stored) == [
    'pni-s0 cw(steps=100): replaces the record of an earlier run in this folder, measured '
    'with other settings (judged_draws 10 -> 3, another key)'
  ]
  assert records.replaced_lines([{**new, 'name': 'cw(steps=200)'}], stored) == []
  assert records.replaced_lines([old], stored) == records.replaced_lines([new], None) == []
