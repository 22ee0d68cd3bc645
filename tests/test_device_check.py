"""benchmarks/device_check.py's dry run: the GPU check's code paths on a CPU with tiny
networks, so that the script cannot break unnoticed between GPU loans; and the
evaluation projection's counts on the default evaluation."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import eval_projection, render  # noqa: E402
from configs import eval as eval_config  # noqa: E402
from l2p_jax import evaluation  # noqa: E402

HAS_TORCH = importlib.util.find_spec('torch') is not None

SECTIONS = {
  'device',
  'phases',
  'tests',
  'determinism',
  'compile_cold',
  'train',
  'epoch',
  'attacks',
  'evaluation',
  'profile',
  'targets',
}


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('device') / 'device_check.json'
  subprocess.run(
    [sys.executable, str(ROOT / 'benchmarks' / 'device_check.py'), '--dry-run', '--out', str(out)],
    cwd=ROOT,
    check=True,
    timeout=900,
  )
  return out


def test_the_dry_run_fills_every_section(dry_run):
  result = json.loads(dry_run.read_text())
  assert SECTIONS <= set(result) and result['dry_run']
  assert not [k for k, r in result['phases'].items() if r['returncode'] or r['timed_out']]
  assert result['tests']['passed'] > 0 and result['tests']['failed'] == 0
  det = result['determinism']
  assert det['xla_flags'].endswith('--xla_gpu_deterministic_ops=true') and det['processes'] == 2
  for name in ('none', 'pgd'):
    assert all(det[name].values()), det[name]
  frameworks = {c['framework'] for c in result['train']['cases']}
  assert frameworks == ({'jax', 'torch'} if HAS_TORCH else {'jax'})
  assert {c['attack'] for c in result['attacks']['cases']} == {'pgd7', 'eot_pgd', 'apgd', 'judge'}
  assert {c['suite'] for c in result['compile_cold']} == {'train', 'attacks'}
  epoch = result['epoch']
  assert len(epoch['epoch_train_s']) == 2 and len(epoch['between_records_s']) == 1
  assert epoch['projected_run_h'] == pytest.approx(350 * epoch['epoch_s'] / 3600)
  assert result['evaluation']['total_s'] > 0 and result['profile']['median_s'] > 0
  assert [t['target'].split()[0] for t in result['targets']] == ['PGD-7'] * HAS_TORCH + ['350']
  assert dry_run.with_suffix('.log').stat().st_size > 0


def test_render_writes_the_gpu_block_naming_the_device(dry_run, tmp_path):
  result = json.loads(dry_run.read_text())
  markdown = tmp_path / 'BENCHMARKS.md'
  markdown.write_text(f'# Benchmarks\n\n{render.GPU_BEGIN}\nold\n{render.GPU_END}\n\nprose\n')
  for _ in range(2):  # Rendering again replaces the block, keeping the prose.
    render.main(['--results', '--device-results', str(dry_run), '--out', str(markdown)])
  text = markdown.read_text()
  assert text.count(render.GPU_BEGIN) == 1 and 'old' not in text and 'prose' in text
  assert result['device']['name'] in text and 'DRY RUN' in text
  assert 'same key, same bits' in text and 'projected 350' in text and 'why not' in text
  render.main(['--results', '--device-results', '--out', str(markdown)])
  assert render.NO_GPU in markdown.read_text()


def test_the_default_evaluation_costs_13676_gradients_and_square_and_few_pixel_forwards():
  specs, draws = eval_projection.default_plan()
  costs = [eval_projection.attack_cost(s) for s in specs]
  # FGSM 1 + PGD 7, 20, 100 + EOT-PGD 7 x 30 + C&W 9 x 1000 + APGD-rand 2 x 101 x 20
  # + noise-off PGD-20 and APGD 2 x 101 + the eps sweep's 6 other FGSM and 7 PGD-10.
  assert sum(c['gradients'] for c in costs) == 13676 and draws == 30
  # Square's 5,000 queries, then the few-pixel attack's 400 x 76 for 1, 2 and 3 pixels.
  assert [c['forwards'] for c in costs if c['forwards']] == [5000] + [400 * 76] * 3
  rates = {'pgd7': 1000.0, 'eot_pgd': 1000.0, 'apgd': 1000.0, 'forward': 10000.0}
  projected = eval_projection.project(rates, judge_s_per_image=0.0, images=100)
  # few_pixel attacks only its first 1,000 images, here all 100 of them.
  forwards = 100 * 5000 + 3 * 100 * 30400
  assert projected['total_s'] == pytest.approx(100 * 13676 / 1000 + forwards / 10000)


def test_the_autoattack_suites_cost_their_stages():
  config = eval_config.get_config()
  [standard], _ = evaluation.plan_attacks(config, ['autoattack'])
  assert eval_projection.attack_cost(standard) == {
    'gradients': 10 * 101,  # APGD-CE and APGD-T's 9 targets, 100 steps each, plus the start.
    'forwards': 5000,
    'iterations': 10 * 100 + 5000,  # What its bar counts: the stages' steps and queries.
    'rate': 'apgd',
  }
  rand = standard.for_model(config, randomized=True)
  assert eval_projection.attack_cost(rand)['gradients'] == 2 * 101 * config.apgd.eot_draws
