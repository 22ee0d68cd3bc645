"""Evaluation end to end on two tiny trained checkpoints, a randomized one (L2P) and a
deterministic one (clean training): every attack of configs/eval.py:tiny, the records'
schema, the markdown tables and plots, bit-identical reruns, transfer to itself equal
to white-box, and one clear message per user error. The attacks themselves are
checked against hand-computed answers in test_attacks*.py."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_runs

import l2p_jax.attacks
from configs import cifar as cifar_configs
from configs import eval as eval_configs
from l2p_jax import checkpointing, data, evaluation, experiment, methods
from l2p_jax.evaluation import records as records_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


train_config, eval_config_file = cifar_configs.get_config, eval_configs.get_config


def eval_config(**fields):
  """configs/eval.py:tiny with `section__field=value` overrides."""
  config = eval_config_file('tiny')
  config.update_from_flattened_dict({k.replace('__', '.'): v for k, v in fields.items()})
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two tiny CIFAR-10 runs: L2P (noise on from epoch 0) for one epoch, and a clean
  network for three (the same compiled step every epoch, so cheap) that is accurate
  enough for attacks to have something to take away."""
  return tiny_runs.train_runs(tmp_path_factory, {'l2p': 1, 'none': 3})


@pytest.fixture(scope='module')
def evaluated(runs):
  """configs/eval.py:tiny on both runs, outputs in the first run's eval/."""
  results = evaluation.evaluate_workdirs(eval_config(), [str(runs['l2p']), str(runs['none'])])
  return results, runs['l2p'] / 'eval'


def white_box(results, label, attack, eps=8 / 255):
  """The white-box record of `attack` at `eps`; for PGD the headline one, not the eps
  sweep's (whose step is a fraction of eps)."""
  [record] = [
    r
    for r in results['records']
    if r['label'] == label
    and r['source'] is None
    and r['attack'] == attack
    and r['params']['eps'] == eps
    and 'step_fraction' not in r['params']
    and r['params']['attack_noise']
  ]
  return record


def without_times(results):
  """The records without their wall-clock seconds."""
  return [without(r) for r in results['records']]


# --- the config ---------------------------------------------------------------------


def test_full_config_runs_the_papers_attacks_with_their_settings():
  config = eval_config_file()
  specs, transfer = evaluation.plan_attacks(config)
  params = lambda spec: dict(spec.params)  # noqa: E731
  pgd_steps = sorted(
    params(s)['steps']
    for s in specs
    if s.attack == 'pgd'
    and params(s)['eot_draws'] == 1
    and params(s).get('step_size') == 0.01
    and s.attack_noise
  )
  assert pgd_steps == [7, 20, 100]
  [eot] = [s for s in specs if s.attack == 'pgd' and params(s)['eot_draws'] > 1]
  assert params(eot)['eot_draws'] == 30 and params(eot)['step_size'] == 0.01
  cw_settings = lambda spec: tuple(  # noqa: E731
    params(spec)[k] for k in ('c_init', 'learning_rate', 'kappa', 'binary_steps', 'steps')
  )
  [cw] = [s for s in specs if s.attack == 'cw']
  assert cw_settings(cw) == (0.01, 0.01, 0.0, 9, 1000)  # Carlini & Wagner's
  config.cw.steps = 3  # cw_pni keeps PNI's settings whatever config.cw says.
  [pni] = evaluation.plan_attacks(config, 'cw_pni')[0]
  assert cw_settings(pni) == (0.01, 5e-4, 0.0, 9, 10)
  [apgd] = [s for s in specs if s.attack == 'apgd_rand' and s.attack_noise]
  assert params(apgd)['eot_draws'] == 20
  few = [s for s in specs if s.attack == 'few_pixel']
  assert [
    (params(s)['n_pixels'], params(s)['population'], params(s)['iterations']) for s in few
  ] == [(1, 400, 75), (2, 400, 75), (3, 400, 75)]
  radii = [1, 2, 4, 8, 16, 32, 64]
  assert sorted(round(s.eps * 255) for s in specs if s.attack == 'fgsm') == radii
  # The sweep's FGSM at 8/255 is the headline FGSM; its PGD, 10 steps of eps/4, is not
  # the headline PGD-7 of step 0.01.
  sweep = [s for s in specs if s.attack == 'pgd' and 'step_fraction' in params(s)]
  assert [round(s.eps * 255) for s in sweep] == radii
  assert {(params(s)['steps'], params(s)['step_fraction']) for s in sweep} == {(10, 0.25)}
  noise_off = [(s.attack, params(s)) for s in specs if not s.attack_noise]
  assert [(a, p['steps'], p['eot_draws']) for a, p in noise_off] == [
    ('pgd', 20, 1),
    ('apgd_rand', 100, 1),
  ]
  assert config.judge.draws == 30
  assert len(specs) == len(set(specs)) == len({s.key_id for s in specs}) and not transfer
  with pytest.raises(AttributeError):
    config.pgd.step = 3  # Locked: a typo of pgd.steps is an error.


KEYS = [440203067, 1693245369, 2077025426, 583080202]  # key_id of the specs below.


def test_attack_keys_are_fixed_and_speed_settings_change_none():
  """A spec's key_id is a CRC-32 of its text, which names the records of earlier runs in
  results.json: the text and the number of these specs must never change (they did once,
  when speed settings left the text). Unrolling and few-pixel chunks change neither."""
  specs, _ = evaluation.plan_attacks(eval_config_file(), 'clean,pgd,few_pixel1,noise_off_pgd')
  assert [(repr(s), s.key_id) for s in specs] == [
    ("AttackSpec(attack='clean', params=(), eps=None, examples=0, attack_noise=True)", KEYS[0]),
    (
      "AttackSpec(attack='pgd', params=(('steps', 7), ('step_size', 0.01), ('random_start', "
      "True), ('restarts', 1), ('eot_draws', 1)), eps=0.03137254901960784, examples=0, "
      'attack_noise=True)',
      KEYS[1],
    ),
    (
      "AttackSpec(attack='few_pixel', params=(('n_pixels', 1), ('population', 400), "
      "('iterations', 75)), eps=None, examples=1000, attack_noise=True)",
      KEYS[2],
    ),
    (
      "AttackSpec(attack='pgd', params=(('steps', 7), ('step_size', 0.01), ('random_start', "
      "True), ('restarts', 1), ('eot_draws', 1)), eps=0.03137254901960784, examples=0, "
      'attack_noise=False)',
      KEYS[3],
    ),
  ]
  assert [s.function for s in specs] == [
    evaluation.attack_entry('clean').function,
    l2p_jax.attacks.pgd,
    l2p_jax.attacks.few_pixel,
    l2p_jax.attacks.pgd,
  ]
  fast = eval_config_file()
  fast.unroll, fast.few_pixel.chunk_size = True, 7
  fast_specs, _ = evaluation.plan_attacks(fast, 'clean,pgd,few_pixel1,noise_off_pgd')
  assert fast_specs == specs and [s.key_id for s in fast_specs] == KEYS
  assert [s.name for s in fast_specs] == [s.name for s in specs]
  assert (
    dict(fast_specs[1].arguments)['unroll'] is True
    and dict(fast_specs[2].arguments)['chunk_size'] == 7
  )


# --- end to end ---------------------------------------------------------------------


def test_results_json_holds_one_complete_record_per_checkpoint_and_attack(evaluated, runs):
  results, output = evaluated
  assert json.loads((output / 'results.json').read_text()) == json.loads(json.dumps(results))
  records = results['records']
  for r in records:
    assert records_lib.Record.from_json(r).to_json() == r  # Every field, no other.
    k = 3 if r['method'] == 'l2p' else 1  # configs/eval.py:tiny's judge.draws.
    assert r['judged_draws'] == k
    assert 0 <= r['accuracy'] <= 1 and r['correct'] == round(r['accuracy'] * r['n'] * k)
    assert r['n'] == (4 if r['attack'] == 'few_pixel' else 12)
    low, high = r['accuracy_ci95']
    assert low <= r['accuracy'] <= high and 0 <= r['accuracy_all_draws'] <= r['accuracy']
    assert (r['rule'], r['draws'], r['noise'], r['batch_size']) == ('single', 1, True, 8)
    assert r['randomized'] == (r['method'] == 'l2p')
    assert 0 < r['judge_seconds'] < r['seconds']
    assert r['key'] == {'seed': 0, 'fold_in': [r['key']['fold_in'][0]]}
    assert pathlib.Path(r['checkpoint']).parent.parent == runs[r['label']]
    assert (r['dataset'], r['split'], r['step']) == (
      'cifar10',
      'test',
      8 if r['label'] == 'l2p' else 24,
    )
    assert r['seconds'] > 0
    # FGSM, PGD and APGD-rand keep the accuracy they saw after each step (APGD-rand's two
    # stages one after the other), on the model they ran on.
    on_itself = r['source'] is None or r['source']['label'] == r['label']
    kept = r['attack'] in ('fgsm', 'pgd', 'apgd_rand') and on_itself
    assert ('curve' in r) == kept, r['name']
    if 'curve' in r:
      stages = 2 if r['attack'] == 'apgd_rand' else 1
      assert len(r['curve']) == stages * r['params'].get('steps', 1) + 1
      if r['label'] == 'none':  # Deterministic: its last point is the judged accuracy, of
        # the 12 images only (the last batch of 8 pads 4 rows).
        assert r['curve'][-1] == r['accuracy']
  white = sorted(
    (r['label'], r['attack'], r['params']['eps'] and round(r['params']['eps'] * 255))
    for r in records
    if r['source'] is None
  )
  assert white == sorted(
    [
      (label, attack, eps)
      for label in ('l2p', 'none')
      for attack, eps in (
        ('apgd_rand', 8),
        ('clean', None),
        ('cw', None),
        ('few_pixel', None),
        ('fgsm', 4),
        ('fgsm', 8),
        ('pgd', 4),  # the sweep's
        ('pgd', 8),  # the sweep's
        ('pgd', 8),  # the headline PGD
      )
    ]
    + [('l2p', 'pgd', 8)]  # The noise-off PGD, on the randomized model only.
  )
  transfer = sorted(
    (r['source']['label'], r['label'], r['attack']) for r in records if r['source'] is not None
  )
  assert transfer == sorted(
    (s, t, a) for s in ('l2p', 'none') for t in ('l2p', 'none') for a in ('fgsm', 'pgd')
  )
  cw = white_box(results, 'none', 'cw', None)
  assert cw['fooled'] > 0 and cw['mean_l2'] > 0  # C&W reports accuracy and mean L2.


def test_markdown_tables_and_plots_are_written(evaluated):
  _, output = evaluated
  table = (output / 'results.md').read_text()
  header = (
    '| checkpoint | Clean | FGSM | PGD-2 | PGD-2 noise-off | C&W acc / L2 | APGD-rand | 1 px '
    '| Worst case |'
  )
  assert header in table
  assert '## Worst case per image over the attacks' in table and '## Sanity checks (' in table
  assert '| l2p (l2p resnet8 x0.5, step 8) |' in table
  assert '| none (none resnet8 x0.5, step 24) |' in table
  assert '| checkpoint | attack | 4/255 | 8/255 |' in table
  assert '| none | PGD-2 (step eps/4) |' in table
  assert '| source \\ target | l2p FGSM | l2p PGD-2 | none FGSM | none PGD-2 |' in table
  assert '## Convergence\n\n[convergence.png](convergence.png)' in table
  for name in ('accuracy_vs_eps.png', 'convergence.png', 'noise_evolution_l2p.png'):
    assert (output / name).stat().st_size > 10_000, name
  assert not (output / 'noise_evolution_none.png').exists()  # No noise to plot.


def test_transfer_of_a_model_to_itself_is_its_white_box_accuracy(evaluated):
  """Every diagonal cell of the transfer matrix (both models, FGSM and PGD) has the
  key and the correct count of that model's white-box record."""
  results, _ = evaluated
  diagonal = [
    r for r in results['records'] if r['source'] is not None and r['source']['label'] == r['label']
  ]
  cells = sorted((r['label'], r['attack']) for r in diagonal)
  assert cells == [('l2p', 'fgsm'), ('l2p', 'pgd'), ('none', 'fgsm'), ('none', 'pgd')]
  for r in diagonal:
    own = white_box(results, r['label'], r['attack'])
    assert (r['correct'], r['key']) == (own['correct'], own['key']), (r['label'], r['attack'])


def test_attacks_do_not_raise_the_accuracy_of_a_deterministic_model(evaluated):
  results, _ = evaluated
  clean = white_box(results, 'none', 'clean', None)['accuracy']
  assert clean >= 0.5  # There is something to attack.
  for attack in ('fgsm', 'pgd', 'cw', 'apgd_rand'):
    assert (
      white_box(results, 'none', attack, None if attack == 'cw' else 8 / 255)['accuracy']
      <= clean + 1e-9
    ), attack
  pgd = white_box(results, 'none', 'pgd')['accuracy']
  assert pgd < clean  # PGD finds some adversarial examples even in two steps.


def test_a_rerun_with_the_same_key_is_bit_identical(evaluated, runs):
  results, output = evaluated
  first = json.loads(json.dumps(results))
  evaluation.evaluate_workdirs(eval_config(), [str(runs['l2p']), str(runs['none'])])
  again = json.loads((output / 'results.json').read_text())
  assert without_times(again) == without_times(first)
  assert {k: v for k, v in again.items() if k != 'records'} == {
    k: v for k, v in first.items() if k != 'records'
  }


def test_the_recorded_key_reproduces_a_randomized_result(evaluated, runs):
  """The L2P clean accuracy recomputed by hand from the record's seed and the documented
  layout of the judged draws, the same for every attack (the judging stream 2**31, batch
  b, judged draw k, prediction draw 0), and its per-image and per-draw verdicts in
  verdicts.npz."""
  results, output = evaluated
  record = white_box(results, 'l2p', 'clean', None)
  checkpoint = checkpointing.load_checkpoint(str(runs['l2p']))
  split = evaluation.load_examples(evaluation.data_settings(eval_config(), checkpoint))
  key = jax.random.fold_in(jax.random.key(record['key']['seed']), 2**31)
  logits = jax.jit(
    lambda x, k: checkpoint.model.apply(
      checkpoint.variables, x, train=False, noise=True, rngs={'noise': k}
    )
  )
  bits = []
  for b, batch in enumerate(data.eval_batches(split, record['batch_size'])):
    judge_key = jax.random.fold_in(key, b)
    draws = [
      np.argmax(
        logits(
          data.to_float(batch['image']), jax.random.fold_in(jax.random.fold_in(judge_key, k), 0)
        ),
        -1,
      )
      == batch['label']
      for k in range(record['judged_draws'])
    ]
    bits.append(np.stack(draws, axis=1)[batch['mask']])
  bits = np.concatenate(bits)
  right = bits.sum(1)
  assert int(right.sum()) == record['correct']
  with np.load(output / 'verdicts.npz') as stored:
    np.testing.assert_array_equal(stored[f'{record["verdicts"]}.right'], right)
    np.testing.assert_array_equal(evaluation.verdicts.draw_bits(stored, record), bits)
    assert int(stored[f'{record["verdicts"]}.draw_right'].sum()) == record['correct']


def test_the_worst_case_is_the_union_of_the_stored_verdicts(evaluated):
  """Per checkpoint, the images right under every draw of every L-inf attack at the
  headline eps (clean, FGSM, PGD, APGD, noise-off and transfer), per image and per draw,
  from verdicts.npz."""
  results, output = evaluated
  assert [w['label'] for w in results['worst_case']] == ['l2p', 'none']
  with np.load(output / 'verdicts.npz') as stored:
    for worst in results['worst_case']:
      members = [
        r
        for r in results['records']
        if r['label'] == worst['label']
        and r['attack'] in ('clean', 'fgsm', 'pgd', 'apgd_rand')
        and r['params']['eps'] in (None, 8 / 255)
      ]
      # Clean, FGSM, PGD, the eps sweep's PGD at 8/255, APGD, transfer FGSM and PGD from
      # both; L2P's noise-off PGD.
      assert len(worst['attacks']) == len(members) == (10 if worst['label'] == 'l2p' else 9)
      shares = np.min([stored[f'{r["verdicts"]}.right'] / r['judged_draws'] for r in members], 0)
      assert worst['accuracy'] == pytest.approx(shares.mean())
      assert worst['accuracy'] <= min(r['accuracy'] for r in members)
      assert worst['accuracy_all_draws'] <= worst['accuracy']
      # Per draw: right under draw k for every attack (their judged draws are shared).
      bits = np.all([evaluation.verdicts.draw_bits(stored, r) for r in members], 0)
      assert worst['accuracy_per_draw'] == pytest.approx(bits.mean())
      assert worst['accuracy_all_draws'] <= worst['accuracy_per_draw'] <= worst['accuracy']


def test_sanity_checks_are_recorded_for_every_checkpoint(evaluated):
  results, output = evaluated
  checks = {(c['label'], c['name']): c for c in results['sanity']}
  assert checks['l2p', 'judged_over_draws']['passed']  # Its logits vary; judged 3 times.
  assert 'do not change' in checks['none', 'judged_over_draws']['detail']
  assert {name for label, name in checks if label == 'none'} >= {
    'largest_eps',
    'single_step',
    'white_box_vs_transfer',
    'unbounded',
  }
  assert {c['checkpoint'] for c in results['sanity']} == {
    c['checkpoint'] for c in results['checkpoints']
  }


def test_speed_settings_change_no_record(runs, tmp_path):
  """A rerun with unrolled attack loops meets the same random numbers: the same keys and
  the same verdicts (issue 23's unroll rerun replaced records with other keys' numbers)."""
  records = {}
  for unroll in (False, True):
    config = eval_config(attacks='pgd,apgd', unroll=unroll, output_dir=str(tmp_path / str(unroll)))
    records[unroll] = evaluation.evaluate_workdirs(config, str(runs['l2p']))['records']
  assert [without(r) for r in records[False]] == [without(r) for r in records[True]]


def without(record):
  """A record without its wall-clock times."""
  return {k: v for k, v in record.items() if k not in ('seconds', 'judge_seconds')}


def test_noise_can_be_switched_off_and_is_recorded(evaluated, runs, tmp_path):
  results, _ = evaluated
  [record] = evaluation.evaluate_workdirs(
    eval_config(attacks='clean', noise=False, output_dir=str(tmp_path)), str(runs['l2p'])
  )['records']
  assert (record['noise'], record['randomized']) == (False, False)
  assert white_box(results, 'l2p', 'clean', None)['randomized']


def test_checkpoint_flag_picks_an_earlier_step(runs, tmp_path):
  step4 = runs['l2p'] / 'checkpoints' / '4'
  [record] = evaluation.evaluate_workdirs(
    eval_config(attacks='clean', output_dir=str(tmp_path)), str(runs['l2p']), str(step4)
  )['records']
  assert (record['checkpoint'], record['step']) == (str(step4), 4)
  assert json.loads((tmp_path / 'results.json').read_text())['records'][0]['step'] == 4


def test_apgd_t_autoattack_and_square_run_by_name_in_each_models_version(runs, tmp_path):
  """The suites a user names on the command line run on both kinds of model: the
  standard AutoAttack on the deterministic one, the rand version on the randomized one,
  Square with its randomized queries and draws there, each a column and in the worst case."""
  results = evaluation.evaluate_workdirs(
    eval_config(attacks='apgd_t,autoattack,square', output_dir=str(tmp_path)),
    [str(runs['l2p']), str(runs['none'])],
  )
  got = {(r['label'], r['attack']): r['params'] for r in results['records']}
  assert sorted(got) == [
    (label, attack) for label in ('l2p', 'none') for attack in ('apgd_t', 'autoattack', 'square')
  ]
  assert (got['none', 'autoattack']['version'], got['l2p', 'autoattack']['version']) == (
    'standard',
    'rand',
  )
  assert (got['none', 'square']['queries'], 'eot_draws' in got['none', 'square']) == (4, False)
  assert (got['l2p', 'square']['queries'], got['l2p', 'square']['eot_draws']) == (2, 2)
  assert got['l2p', 'apgd_t']['eot_draws'] == 2 and 'eot_draws' not in got['none', 'apgd_t']
  for worst in results['worst_case']:
    assert len(worst['attacks']) == 3, worst
  table = (tmp_path / 'results.md').read_text()
  for title in ('APGD-T', 'AutoAttack', 'AutoAttack-rand', 'Square', 'Square (EOT, 2 draws)'):
    assert f' {title} |' in table, title


def test_a_rerun_with_other_attacks_keeps_the_earlier_records(runs, tmp_path):
  """results.json gathers the attacks of successive runs into one folder; a rerun of
  an attack on a checkpoint replaces its record."""
  for attacks in ('clean', 'fgsm', 'clean'):
    evaluation.evaluate_workdirs(
      eval_config(attacks=attacks, output_dir=str(tmp_path)), str(runs['none'])
    )
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert [r['attack'] for r in saved['records']] == ['fgsm', 'clean']
  assert [c['label'] for c in saved['checkpoints']] == ['none']
  assert '| none (none resnet8 x0.5, step 24) |' in (tmp_path / 'results.md').read_text()


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  'fields,message',
  [
    (
      dict(attacks='clean,pgdx'),
      r"Unknown attack 'pgdx' in config.attacks; accepted: clean, fgsm, pgd, pgd<N>, ",
    ),
    (
      dict(predict__rule='majority'),
      r"Unknown prediction rule 'majority'.*'single', 'vote', 'mean_softmax'",
    ),
    (
      dict(model__arch='resnet20'),
      r'holds a l2p resnet8 of width 0.5, but --config.model.arch=resnet20 was asked for',
    ),
    (
      dict(data__examples=500),
      r'data.examples=500 must be between 1 and the 128 examples of cifar10/test',
    ),
  ],
)
def test_bad_requests_are_one_clear_error(runs, fields, message):
  with pytest.raises(evaluation.EvaluationError, match=message):
    evaluation.evaluate_workdirs(eval_config(**fields), str(runs['l2p']))


def test_missing_checkpoint_names_the_path_and_how_to_make_one(tmp_path):
  (tmp_path / 'empty').mkdir()
  for path in (tmp_path / 'never_trained', tmp_path / 'empty'):
    with pytest.raises(
      evaluation.EvaluationError,
      match=rf'No checkpoint found in {path}\. Train one with `python '
      rf'train.py --config .* --workdir {path}`',
    ):
      evaluation.evaluate_workdirs(eval_config(), str(path))


def test_variables_that_do_not_fit_the_described_model_are_named(runs):
  checkpoint = checkpointing.load_checkpoint(str(runs['l2p'] / 'checkpoints'))
  wider = experiment.build_model(
    train_config('l2p,resnet8,cifar10'), methods.L2P, 10, (0.5,) * 3, (0.25,) * 3
  )
  with pytest.raises(
    checkpointing.CheckpointMismatchError,
    match=r'(?s)in here do not fit the model its metadata describes.*'
    r'params/classifier/kernel: checkpoint \(32, 10\), model '
    r'\(64, 10\).*and \d+ more',
  ):
    checkpointing.check_variables_fit(wider, checkpoint.variables, (32, 32, 3), 'here')


@pytest.mark.parametrize(
  'args,message',
  [
    (['--workdir', 'RUN/nowhere'], 'eval.py: No checkpoint found in RUN/nowhere'),
    (
      [
        '--workdir',
        'RUN/l2p,RUN/none',
        '--config',
        f'{ROOT}/configs/eval.py:tiny',
        '--config.attacks=clean,bogus',
      ],
      "eval.py: Unknown attack 'bogus' in config.attacks",
    ),
    (
      ['--workdir', 'RUN/l2p', '--config.pgd.stepz=3'],
      "eval.py: --config.pgd.stepz: the config has no field 'stepz'; did you mean 'steps'?",
    ),
  ],
)
def test_command_line_errors_are_one_message_without_traceback(runs, args, message):
  args = [a.replace('RUN', str(runs['l2p'].parent)) for a in args]
  message = message.replace('RUN', str(runs['l2p'].parent))
  result = subprocess.run(
    [sys.executable, str(ROOT / 'eval.py'), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr
