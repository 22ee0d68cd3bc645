"""An attack added by one `register_attack` call, defined in this file alone, runs through
the whole evaluation of a tiny trained checkpoint: planned from config.attacks, its
bounds checked, its column in results.md at the place it registered, its per-image
verdicts in the worst case; registrations that clash or leave something out are refused
at once, and planning refuses a name no entry has."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_runs

from configs import eval as eval_configs
from l2p_jax import attacks, evaluation
from l2p_jax.evaluation import results_files, verdicts


def logit_step(logits_fn, key, x, y, *, eps, repeats):
  """Moves every pixel against the sign of the true class's logit gradient, eps/repeats
  at a time, `repeats` times, inside the eps-ball."""

  def step(x_adv, _):
    grad = jax.grad(lambda z: jnp.take_along_axis(logits_fn(z, key), y[:, None], 1).sum())(x_adv)
    x_adv = jnp.clip(x_adv - eps / repeats * jnp.sign(grad), x - eps, x + eps)
    return jnp.clip(x_adv, 0, 1), None

  x_adv, _ = jax.lax.scan(step, x, None, length=repeats)
  success = jnp.argmax(logits_fn(x_adv, key), -1) != y
  return attacks.AttackResult(x_adv, success, attacks.core.l2_norm(x_adv - x))


LOGIT_STEP = evaluation.Attack(
  'logit_step',
  logit_step,
  evaluation.LINF,
  lambda p: f'Logit step x{p["repeats"]}',
  column=2.5,  # After PGD, before C&W.
  presets={
    'logit_step': evaluation.Preset(
      lambda c, n: [
        evaluation.AttackSpec('logit_step', (('repeats', n or c.logit_step.repeats),), c.eps)
      ],
      counted=True,
    )
  },
  bounds=(('logit_step.repeats', 1),),
  worst_case=True,
  budget='repeats',
)


def config_with_defaults(**fields):
  """configs/eval.py:tiny with the attack's config section (its defaults) added, and
  `fields` set."""
  config = eval_configs.get_config('tiny')
  with config.unlocked():
    config.logit_step = ml_collections.ConfigDict({'repeats': 1})
  config.update(fields)
  return config


@pytest.fixture
def registered():
  """LOGIT_STEP registered for one test, unregistered after it, whatever the outcome."""
  with evaluation.registered(LOGIT_STEP) as entry:
    yield entry
  assert 'logit_step' not in [e.name for e in evaluation.registered_attacks()]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A network trained cleanly for three tiny epochs: accurate enough to be attacked."""
  return tiny_runs.train_runs(tmp_path_factory, {'none': 3})


def test_a_registered_attack_is_evaluated_joins_the_worst_case_and_is_tabled_in_place(
  registered, runs, tmp_path
):
  config = config_with_defaults(attacks='logit_step,cw,clean,logit_step3', output_dir=str(tmp_path))
  results = evaluation.evaluate_workdirs(config, str(runs['none']))
  mine = [r for r in results['records'] if r['attack'] == 'logit_step']
  assert [r['name'] for r in mine] == [
    'logit_step(repeats=1, eps=8/255)',
    'logit_step(repeats=3, eps=8/255)',
  ]
  clean = next(r for r in results['records'] if r['attack'] == 'clean')
  assert all(r['n'] == 12 and r['accuracy'] < clean['accuracy'] for r in mine)
  # The worst case takes its per-image verdicts (C&W, another threat model, stays out):
  # without them it would be the clean accuracy.
  [worst] = results['worst_case']
  assert worst['attacks'] == ['logit_step(repeats=1, eps=8/255)', 'clean()', mine[1]['name']]
  stored = verdicts.read(str(tmp_path))
  others = [r for r in results['records'] if r['attack'] != 'logit_step']
  [without] = verdicts.worst_cases(others, stored, config.eps)
  assert worst['accuracy'] < without['accuracy'] == clean['accuracy']
  rights = [stored[f'{r["verdicts"]}.right'] for r in results['records'] if r['attack'] != 'cw']
  assert worst['accuracy'] == pytest.approx(np.min(rights, axis=0).mean())
  # A rerun with FGSM and PGD into the same folder: the columns stand in registered
  # order whatever config.attacks' order, after PGD and before C&W, fewer repeats first.
  config.attacks = 'pgd,fgsm'
  evaluation.evaluate_workdirs(config, str(runs['none']))
  assert (
    '| checkpoint | Clean | FGSM | PGD-2 | Logit step x1 | Logit step x3 | C&W acc / L2 '
    '| Worst case |'
  ) in (tmp_path / 'results.md').read_text()


def test_its_bounds_are_checked_and_its_name_and_records_need_the_registration(
  registered, runs, tmp_path
):
  config = config_with_defaults(attacks='logit_step')
  config.logit_step.repeats = 0
  with pytest.raises(
    evaluation.EvaluationError, match=r'config.logit_step.repeats=0 must be at least 1'
  ):
    evaluation.validate_config(config)
  (tmp_path / 'results.json').write_text(
    '{"checkpoints": [], "records": [{"attack": "logit_step"}]}'
  )
  assert results_files.read_stored(str(tmp_path)).results['records'] == [{'attack': 'logit_step'}]
  evaluation.unregister_attack('logit_step')
  try:
    with pytest.raises(evaluation.EvaluationError, match=r"Unknown attack 'logit_step' in config"):
      evaluation.plan_attacks(config_with_defaults(), 'clean,logit_step')
    # Earlier records of an attack no longer registered are refused before any attack runs.
    with pytest.raises(results_files.ResultsFileError, match=r"Unknown attack 'logit_step'"):
      results_files.read_stored(str(tmp_path))
  finally:
    evaluation.register_attack(LOGIT_STEP)


def test_clashing_or_incomplete_registrations_are_refused(registered):
  preset = LOGIT_STEP.presets['logit_step']
  other = dataclasses.replace(LOGIT_STEP, name='other', column=9, presets={'other': preset})
  for changes, message in (
    ({'name': 'logit_step'}, "the attack 'logit_step' is registered"),
    ({'column': 3}, "column 3 is taken by 'cw'"),
    ({'presets': {'pgd': preset}}, "config.attacks name 'pgd' is taken"),
    ({'presets': {'other2': preset}}, "config.attacks name 'other2' is taken or ends in a digit"),
    ({'threat_model': 'linf2'}, 'threat_model must be one of'),
    ({'presets': {}}, 'at least one preset'),
    ({'column': '9'}, 'column must be a number'),
  ):
    with pytest.raises(ValueError, match=message):
      evaluation.register_attack(dataclasses.replace(other, **changes))
  assert 'other' not in [e.name for e in evaluation.registered_attacks()]
