"""evaluation.evaluate on models that are not ours: a small Flax CNN with dropout kept on
at test time (defined in this file alone) under every attack of eval.py's default list,
the same call twice, its deterministic twin judged once; one of our checkpoints through
the API equal to eval.py's records; a defense registered outside l2p_jax trained with
train.py and evaluated with eval.py through --config.modules; the README's example; and
one line per bad input."""

import json
import os
import pathlib
import re
import subprocess
import sys

import fake_datasets
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_runs
import toy_models

from l2p_jax import checkpointing, evaluation, models
from l2p_jax.errors import UserError
from l2p_jax.evaluation import api
from l2p_jax.runtime import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = 4
DEFAULT_ATTACKS = evaluation.default_config().attacks
# What a record says about the model rather than about its result.
DESCRIPTION = ('label', 'checkpoint', 'step', 'workdir', 'method', 'arch', 'width', 'verdicts')
TIMES = ('seconds', 'judge_seconds')


class SmallCNN(nn.Module):
  """A CNN of one convolution whose dropout, kept on at test time, is its randomness."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(nn.Conv(8, (3, 3))(4 * x - 2))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))


CNN = SmallCNN()
IMAGES = np.random.default_rng(0).uniform(size=(8, 8, 8, 3)).astype(np.float32)
VARIABLES = CNN.init(jax.random.key(0), IMAGES)


def dropout_on(x, key):
  return CNN.apply(VARIABLES, x, train=True, rngs={'dropout': key})


def dropout_off(x, key):
  del key  # Deterministic.
  return CNN.apply(VARIABLES, x)


LABELS = np.asarray(jnp.argmax(dropout_off(IMAGES, None), axis=-1))


def tiny(**fields):
  """configs/eval.py:tiny without progress bars, with `section__field=value` overrides."""
  config = evaluation.default_config('tiny')
  config.progress_bar = False
  config.update_from_flattened_dict({k.replace('__', '.'): v for k, v in fields.items()})
  return config


def without(record, fields=TIMES):
  return {k: v for k, v in record.items() if k not in fields}


@pytest.fixture(scope='module')
def cnn_results(tmp_path_factory):
  """The CNN under every default attack, twice, each into a folder of its own."""
  folders = [tmp_path_factory.mktemp(name) for name in ('first', 'second')]
  return [
    evaluation.evaluate(
      dropout_on,
      IMAGES,
      LABELS,
      randomized=True,
      attacks=DEFAULT_ATTACKS,
      config=tiny(),
      output_dir=str(folder),
      label='cnn',
      predict_noise_off=dropout_off,
    )
    for folder in folders
  ], folders


def test_a_flax_cnn_has_records_of_every_default_attack_a_worst_case_and_sanity_checks(cnn_results):
  [results, _], [folder, _] = cnn_results
  config = tiny(attacks=DEFAULT_ATTACKS)
  planned, transfer = evaluation.plan_attacks(config)
  assert not transfer and len(planned) > 10
  specs = [spec.for_model(config, randomized=True) for spec in planned]  # EOT C&W, Square.
  records = results['records']
  assert [r['name'] for r in records] == [s.name for s in specs]
  for record, spec in zip(records, specs):
    assert record['label'] == record['checkpoint'] == 'cnn' and record['randomized']
    assert record['judged_draws'] == 3 and record['rule'] == 'single'
    assert record['n'] == (spec.examples or len(IMAGES))
    assert record['key'] == {'seed': 0, 'fold_in': [spec.key_id]}
    assert record['correct'] == round(record['accuracy'] * record['n'] * 3)
  [clean] = [r for r in records if r['attack'] == 'clean']
  assert all(r['accuracy'] <= clean['accuracy'] for r in records if r['attack'] == 'pgd')
  [worst] = results['worst_case']
  assert worst['label'] == 'cnn' and worst['judged_draws'] == 3
  assert worst['accuracy'] <= min(r['accuracy'] for r in records if r['name'] in worst['attacks'])
  checks = {c['name']: c for c in results['sanity']}
  assert {'largest_eps', 'more_steps', 'single_step', 'unbounded'} <= set(checks)
  assert checks['judged_over_draws'] == {
    'label': 'cnn',
    'checkpoint': 'cnn',
    'name': 'judged_over_draws',
    'passed': True,
    'detail': 'its logits change between noise draws',
  }
  assert json.loads((folder / 'results.json').read_text()) == json.loads(json.dumps(results))
  assert '| cnn (cnn predict, step 0) |' in (folder / 'results.md').read_text()
  assert (folder / 'verdicts.npz').exists() and (folder / 'accuracy_vs_eps.png').exists()


def test_the_same_call_twice_gives_identical_records(cnn_results):
  [first, second], folders = cnn_results
  same = lambda r: without(r, TIMES + ('workdir',))  # noqa: E731
  assert [same(r) for r in first['records']] == [same(r) for r in second['records']]
  assert first['worst_case'] == second['worst_case']


def test_a_deterministic_twin_is_judged_once_and_joins_the_earlier_results(tmp_path):
  evaluate = lambda predict, label, **kw: evaluation.evaluate(  # noqa: E731
    predict, IMAGES, LABELS, config=tiny(), output_dir=str(tmp_path), label=label, **kw
  )
  evaluate(dropout_on, 'cnn', randomized=True, attacks='clean')
  results = evaluate(dropout_off, 'twin', randomized=False, attacks='clean,pgd,noise_off_pgd')
  twin = [r for r in results['records'] if r['label'] == 'twin']
  assert [r['attack'] for r in twin] == ['clean', 'pgd']  # Noise off is the model itself.
  assert all(r['judged_draws'] == 1 and not r['randomized'] for r in twin)
  assert twin[0]['accuracy'] == 1  # Its labels are its own predictions.
  assert [c['label'] for c in results['checkpoints']] == ['cnn', 'twin']
  assert [c['logits_vary'] for c in results['checkpoints']] == [True, False]
  assert [r['label'] for r in results['records']] == ['cnn', 'twin', 'twin']


def test_noise_off_attacks_without_the_noise_off_model_are_skipped_with_a_note(capsys):
  results = evaluation.evaluate(
    dropout_on, IMAGES, LABELS, randomized=True, attacks='clean,noise_off_pgd', config=tiny()
  )
  assert [r['attack'] for r in results['records']] == ['clean']
  said = capsys.readouterr().out
  assert 'skipped, it needs predict_noise_off' in said
  # The plan and the estimate, as eval.py says them, of the one attack that runs.
  assert f'plan: 1 attacks on {len(LABELS)} images, randomized models judged over ' in said
  lines = said.splitlines()
  [head] = [line for line in lines if line.startswith('estimate: ~')]
  assert [line.split(':')[0] for line in lines if line.startswith('  attack ')] == [
    '  attack 1/1 model clean()'
  ]
  assert any(line.startswith('  judging the clean images of model, ') for line in lines)


@pytest.fixture(scope='module')
def l2p_run(tmp_path_factory):
  return tiny_runs.train_runs(tmp_path_factory, {'l2p': 1})['l2p']


def test_our_checkpoint_through_the_api_has_eval_pys_records(l2p_run, tmp_path):
  config = tiny(attacks='clean,fgsm,pgd,noise_off_pgd,cw')
  config.output_dir = str(tmp_path / 'eval_py')
  by_eval_py = evaluation.evaluate_workdirs(config, str(l2p_run))
  checkpoint = checkpointing.load_checkpoint(str(l2p_run))
  split = evaluation.load_examples(evaluation.data_settings(config, checkpoint))
  by_api = evaluation.evaluate(
    models.inference_logits(checkpoint.model, checkpoint.variables, True),
    split.images,  # uint8, converted inside the jitted attacks as eval.py does.
    split.labels,
    randomized=True,
    attacks=config.attacks,
    config=config,
    output_dir=str(tmp_path / 'api'),
    label='l2p',
    predict_noise_off=models.inference_logits(checkpoint.model, checkpoint.variables, False),
  )
  outcome = DESCRIPTION + TIMES + ('dataset', 'split')
  assert len(by_api['records']) == 5
  assert [without(r, outcome) for r in by_api['records']] == [
    without(r, outcome) for r in by_eval_py['records']
  ]
  assert [without(w, ('checkpoint', 'dataset', 'split')) for w in by_api['worst_case']] == [
    without(w, ('checkpoint', 'dataset', 'split')) for w in by_eval_py['worst_case']
  ]


DEFENSE = '''
"""A defense outside l2p_jax: Gaussian noise on the input of the plain ResNet."""
import flax.linen as nn
import jax

from l2p_jax import methods, models


class InputNoise(nn.Module):
  network: nn.Module

  @nn.compact
  def __call__(self, x, train=False, noise=True):
    if noise:
      x = x + 0.1 * jax.random.normal(self.make_rng(models.NOISE_RNG), x.shape, x.dtype)
    return self.network(x, train=train, noise=noise)


methods.register(
  methods.Method(
    'input_noise', 'Input noise', randomized=True,
    network=lambda config, base: InputNoise(models.ResNet(**base)),
  )
)
'''


def run(program, *args, path):
  """`python program args` in the repository with `path` also on PYTHONPATH."""
  return subprocess.run(
    [sys.executable, str(ROOT / program), *args],
    cwd=ROOT,
    env={**os.environ, 'PYTHONPATH': f'{ROOT}:{path}'},
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_a_defense_registered_outside_the_package_trains_and_evaluates_by_command_line(tmp_path):
  (tmp_path / 'my_defense.py').write_text(DEFENSE)
  cifar = fake_datasets.write_cifar10(tmp_path / 'cifar', train=128, test=32)
  workdir = tmp_path / 'run'
  trained = run(
    'train.py',
    '--config',
    f'{ROOT}/configs/cifar.py:input_noise,resnet8,cifar10,tiny',
    '--config.modules=my_defense',
    f'--workdir={workdir}',
    '--config.data.source=local',
    f'--config.data.local_dir={cifar}',
    '--config.data.train_examples=128',
    '--config.data.eval_examples=32',
    '--config.num_epochs=1',
    '--config.progress_bar=False',
    path=tmp_path,
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  evaluate = ('eval.py', f'--workdir={workdir}', '--config', f'{ROOT}/configs/eval.py:tiny')
  attacks = ('--config.attacks=clean,pgd', '--config.progress_bar=False')
  refused = run(*evaluate, *attacks, path=tmp_path)
  assert refused.returncode == 1 and "Unknown method 'input_noise'" in refused.stderr
  assert 'Traceback' not in refused.stderr, refused.stderr
  evaluated = run(*evaluate, *attacks, '--config.modules', 'my_defense', path=tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  records = json.loads((workdir / 'eval' / 'results.json').read_text())['records']
  assert [r['attack'] for r in records] == ['clean', 'pgd']
  assert all(r['method'] == 'input_noise' and r['judged_draws'] == 3 for r in records)


def test_the_readme_example_runs(tmp_path, monkeypatch):
  section = (ROOT / 'README.md').read_text().split('## Evaluate your own model\n')[1]
  [code] = re.findall(r'```python\n(.*?)\n```', section.split('\n## ')[0], re.S)
  assert len(code.splitlines()) <= 15
  monkeypatch.setattr(api, 'default_config', lambda arg='': tiny(attacks='clean,pgd'))
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(code, namespace)  # noqa: S102  (the README's own code)
  assert [r['attack'] for r in namespace['results']['records']] == ['clean', 'pgd']
  assert namespace['results']['worst_case'] and namespace['results']['sanity']
  assert (tmp_path / 'eval_cnn' / 'results.json').exists()


X, Y = np.asarray(toy_models.X), np.asarray(toy_models.Y)


@pytest.mark.parametrize(
  'change,message',
  [
    (dict(predict=lambda x, k: toy_models.linear(x, k)[:, 0]), r'logits of shape \(8,\) for 8'),
    (dict(predict=lambda x, k: (x, k)), 'predict must return one array of logits'),
    (
      dict(predict=lambda x, k: toy_models.linear(x, k).astype(jnp.int32)),
      'predict returned int32 logits; they must be floating point',
    ),
    (
      dict(predict=lambda x, k: toy_models.linear(x, k) / jnp.where(x[:, :1, 0, 0] < 0.5, 0, 1)),
      r'non-finite logits \(NaN or inf\) for \d+ of 32 images',
    ),
    (dict(images=X * 2), r'images must lie in \[0, 1\]; found values from 0.\d+ to 1.9'),
    (dict(images=X - 1), r'images must lie in \[0, 1\]; found values from -'),
    (dict(images=X[..., 0]), r'images must be a non-empty NHWC batch .*got shape \(32, 4, 4\)'),
    (dict(images=np.zeros((2, 3, 8, 8), np.float32)), r'look NCHW; .*transpose\(0, 2, 3, 1\)'),
    (dict(images=(X * 255).astype(np.int32)), r'floats in \[0, 1\] \(or uint8\); got int32'),
    (dict(labels=Y + 1), r'labels must lie in \[0, 3\) \(predict gives 3 logits\); found \d to 3'),
    (dict(labels=Y[:-1]), '31 labels for 32 images; give one label per image'),
    (dict(labels=Y.astype(np.float32)), 'labels must be integer class indices'),
    (
      dict(predict=toy_models.noisy, randomized=False),
      'declared randomized=False but its logits change with the key',
    ),
  ],
)
def test_bad_input_is_one_line(change, message):
  kwargs = dict(predict=toy_models.linear, images=X, labels=Y, randomized=False) | change
  with pytest.raises(evaluation.InputError) as error:
    evaluation.evaluate(**kwargs, attacks='clean', config=tiny())
  assert isinstance(error.value, UserError) and '\n' not in str(error.value)
  assert re.search(message, str(error.value)), str(error.value)


def test_a_module_that_does_not_import_is_one_line(tmp_path, monkeypatch):
  (tmp_path / 'broken_defense.py').write_text('import no_such_package_anywhere\n')
  monkeypatch.syspath_prepend(tmp_path)
  with pytest.raises(UserError, match=r"module 'broken_defense' does not import \(Module"):
    cli.import_modules(['broken_defense'])
  result = run(
    'eval.py', '--workdir=nowhere', '--config.modules=json,broken_defense', path=tmp_path
  )
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    "eval.py: --config.modules: the module 'broken_defense' does not import "
    "(ModuleNotFoundError: No module named 'no_such_package_anywhere'); put its folder on "
    'PYTHONPATH and check its name.'
  )
