"""The sanity checks of an evaluation (sanity.py) on hand-built records and on PGD run
against toy models: each fires on the weak-attack pattern it names and passes an honest
one; which records a check compares is their attacks' registry entries' say."""

import jax.numpy as jnp
import numpy as np
from hand_records import record
from toy_models import KEY, X, Y, linear, masked

from l2p_jax import attacks, evaluation
from l2p_jax.evaluation import intervals, sanity


def _checks(records, logits_vary=None):
  results = {
    'config': {'eps': 8 / 255},
    'checkpoints': [
      {'label': 'm', 'checkpoint': records[0]['checkpoint'], 'logits_vary': logits_vary}
    ],
    'records': records,
  }
  return {c['name']: c for c in sanity.sanity_checks(results)}


def _pgd(accuracy, steps=7, eot_draws=1, eps=8 / 255, low=None, high=None, name=None, **fields):
  params = {'steps': steps, 'eot_draws': eot_draws, 'step_size': 0.01}
  name = name or f'pgd {steps} {eot_draws} {eps}'
  return record('pgd', accuracy, name, eps, low, high, params=params, **fields)


def _pgd_on(logits_fn, eps):
  """PGD-10 with step eps/4 on the 32 examples, judged once: a record with its interval."""
  x_adv = attacks.pgd(
    logits_fn, KEY, X, Y, eps=eps, steps=10, step_size=eps / 4, random_start=True
  ).x_adv
  right = np.asarray(jnp.argmax(logits_fn(x_adv, KEY), -1) == Y)
  low, high = intervals.accuracy_interval(right.astype(float), 1)
  return _pgd(right.mean(), steps=10, eps=eps, low=low, high=high)


def test_largest_eps_fires_on_a_model_with_zero_input_gradient():
  """PGD moves nothing but its random start when the gradient is masked: accuracy stays
  near 80% at 128/255, where the linear model itself falls to 0."""
  assert (
    _checks([_pgd_on(masked, 1 / 255), _pgd_on(masked, 128 / 255)])['largest_eps']['passed']
    is False
  )
  honest = _checks([_pgd_on(linear, 1 / 255), _pgd_on(linear, 128 / 255)])['largest_eps']
  assert honest['passed'] is True and 'leaves 0.00%' in honest['detail']


def test_largest_eps_is_not_applicable_below_32_255():
  """A sweep that stops at 8/255 (configs/eval.py:tiny) cannot ask PGD for 0%: the check
  says so (passed None) and why, instead of failing."""
  short = _checks([_pgd(0.60, eps=4 / 255), _pgd(0.55, eps=8 / 255)])['largest_eps']
  assert short['passed'] is None and sanity.verdict(short) == 'not applicable'
  assert short['detail'].startswith('pgd (7 steps, 1 eot_draws) at 8/255 leaves 55.00%, but')
  assert 'stops at 8/255' in short['detail'] and 'from 32/255' in short['detail']
  long = _checks([_pgd(0.60, eps=4 / 255), _pgd(0.55, eps=32 / 255)])['largest_eps']
  assert long['passed'] is False and sanity.verdict(long) == 'FAILED'


def test_more_steps_and_more_eot_draws_must_not_raise_accuracy_beyond_the_interval():
  fine = _checks([_pgd(0.50, 7, high=0.55), _pgd(0.54, 20), _pgd(0.50, 7, 30)])
  assert fine['more_steps']['passed'] and fine['more_eot_draws']['passed']
  bad = _checks([_pgd(0.50, 7, high=0.55), _pgd(0.60, 20), _pgd(0.58, 7, 30)])
  assert not bad['more_steps']['passed'] and not bad['more_eot_draws']['passed']
  assert 'pgd (20 steps, 1 eot_draws) at 8/255 60.00%' in bad['more_steps']['detail']


def test_single_step_must_not_beat_iterative_beyond_the_interval():
  assert _checks([record('fgsm', 0.45), _pgd(0.50, low=0.46)])['single_step']['passed'] is False
  assert _checks([record('fgsm', 0.47), _pgd(0.50, low=0.46)])['single_step']['passed'] is True


def test_white_box_must_not_be_weaker_than_a_transfer_or_noise_off_cell():
  source = {'label': 's', 'checkpoint': '/runs/s/checkpoints/10', 'step': 10}
  transfer = _pgd(0.30, name='from s', source=source)
  noise_off = record('pgd', 0.30, 'off', params={'steps': 7, 'eot_draws': 1, 'attack_noise': False})
  for other in (transfer, noise_off):
    assert not _checks([_pgd(0.50, low=0.40), other])['white_box_vs_transfer']['passed']
    assert _checks([_pgd(0.35, low=0.25), other])['white_box_vs_transfer']['passed']


def test_an_unbounded_attack_must_reach_near_zero():
  assert not _checks([record('cw', 0.40, eps=None)])['unbounded']['passed']
  assert _checks([record('cw', 0.01, eps=None)])['unbounded']['passed']


def test_a_model_whose_logits_vary_must_be_judged_over_draws():
  once = record('clean', 0.9, eps=None, judged_draws=1)
  assert not _checks([once], logits_vary=True)['judged_over_draws']['passed']
  assert _checks([once], logits_vary=False)['judged_over_draws']['passed']
  assert _checks([record('clean', 0.9, eps=None)], logits_vary=True)['judged_over_draws']['passed']


def test_checks_follow_the_registry_entries_not_the_names():
  """A registered single-step L-inf attack is held to PGD like FGSM; a registered L2
  minimum-norm attack must reach near zero like C&W; a few-pixel record (L0) is neither."""
  single = evaluation.Attack(
    'one_step',
    attacks.fgsm,
    evaluation.LINF,
    lambda p: 'One step',
    column=10,
    presets={'one_step': evaluation.Preset(lambda c, n: [])},
    role=evaluation.SINGLE_STEP,
  )
  min_norm = evaluation.Attack(
    'min_norm',
    attacks.cw_l2,
    evaluation.L2,
    lambda p: 'Min norm',
    column=11,
    presets={'min_norm': evaluation.Preset(lambda c, n: [])},
  )
  with evaluation.registered(single), evaluation.registered(min_norm):
    checks = _checks(
      [
        record('one_step', 0.45),
        _pgd(0.50, low=0.46),
        record('min_norm', 0.40, eps=None),
        record('few_pixel', 0.90, eps=None),
      ]
    )
  assert (
    not checks['single_step']['passed']
    and 'one_step at 8/255 45.00%' in checks['single_step']['detail']
  )
  assert (
    not checks['unbounded']['passed']
    and checks['unbounded']['detail'] == 'min_norm leaves 40.00% > 5%'
  )


X256 = jnp.asarray(np.random.default_rng(2).uniform(size=(256, 4, 4, 1)), jnp.float32)
Y256 = np.asarray(jnp.argmax(linear(X256, None), -1))


def _evaluated_pgd(steps, fraction, batch_size=96):
  """evaluation.evaluate of the linear model on 256 images under PGD of `steps` steps of
  eps / fraction from the clean input, eps 0.15; batches of 96 pad the last one."""
  config = evaluation.default_config('tiny')
  config.progress_bar = False
  config.update_from_flattened_dict(
    {
      'eps': 0.15,
      'pgd.steps': steps,
      'pgd.step_size': 0.15 / fraction,
      'pgd.random_start': False,
      'batch_size': batch_size,
    }
  )
  results = evaluation.evaluate(linear, X256, Y256, randomized=False, attacks='pgd', config=config)
  [pgd] = results['records']
  [check] = [c for c in results['sanity'] if c['name'] == 'converged']
  return pgd, check


def test_an_evaluation_records_the_curve_and_checks_that_pgd_converged():
  """40 steps of eps / 4 reach the ball's edge after a quarter of them and stop gaining:
  converged passes. Its twin, 8 steps of eps / 8, still fools images at its last steps:
  converged fails. The curve counts the 256 real images only (the last batch's 32 padded
  rows left out): it ends at the record's accuracy, as one batch of 256 gives it."""
  long, passed = _evaluated_pgd(40, 4)
  assert passed['passed'] is True and len(long['curve']) == 41
  assert long['curve'][0] == 1.0 and long['curve'][-1] == long['accuracy']
  assert long['curve'] == _evaluated_pgd(40, 4, batch_size=256)[0]['curve']
  short, failed = _evaluated_pgd(8, 8)
  assert failed['passed'] is False and short['curve'][6] - short['curve'][8] > 0.1
  assert failed['detail'].startswith('pgd (8 steps, 1 eot_draws) at 38.25/255: the last quarter')
  assert short['curve'][-1] == short['accuracy'] and all(
    a >= b for a, b in zip(short['curve'], short['curve'][1:])
  )
