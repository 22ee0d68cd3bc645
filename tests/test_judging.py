"""Judging over noise draws, its intervals, the per-image worst case and the sanity
checks, on toy linear models and hand-built tables (the end-to-end run is in
test_eval.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from l2p_jax import attacks
from l2p_jax.evaluation import intervals, judging, sanity, verdicts

KEY = jax.random.key(0)
RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.normal(size=(16, 3)), jnp.float32)
X = jnp.asarray(RNG.uniform(size=(32, 4, 4, 1)), jnp.float32)


def linear(x, key):
  """A deterministic linear 3-class model on 4x4x1 inputs."""
  del key
  return x.reshape(x.shape[0], -1) @ W


def noisy(x, key):
  """The same model with Gaussian noise on its input: a randomized classifier."""
  return linear(x + 0.5 * jax.random.normal(key, x.shape), key)


def masked(x, key):
  """The linear model behind a gradient mask: its logits have zero input gradient."""
  return linear(jax.lax.stop_gradient(x), key)


Y = jnp.argmax(linear(X, None), -1)


# --- intervals ----------------------------------------------------------------------


def test_one_draw_gives_wilsons_interval_of_the_textbooks():
  """3 right of 4 images: Wilson's 95% interval, by hand with z = 1.96: centre
  (0.75 + 3.8415/8) / (1 + 3.8415/4) = 0.6275, half 1.96 / 1.9604 * sqrt(0.1875/4 +
  3.8415/64) = 0.3269, so [30.06%, 95.44%]."""
  low, high = intervals.accuracy_interval(np.array([1.0, 1.0, 1.0, 0.0]), draws=1)
  assert (low, high) == pytest.approx((0.30064, 0.95441), abs=1e-5)


def test_several_draws_use_the_effective_number_of_verdicts():
  """Four images judged under two draws, right 2, 1, 0, 2 times; the draws got 3 and 2
  images right. p = 0.625; image variance mean((m - p)^2) = 0.171875, / n = 0.04296875;
  draw variance var(0.75, 0.5) = 0.015625, / K = 0.0078125; V = 0.05078125;
  n_eff = p (1 - p) / V = 0.234375 / 0.05078125 = 4.6154; Wilson at (0.625, 4.6154)."""
  rates, per_draw = np.array([1.0, 0.5, 0.0, 1.0]), np.array([0.75, 0.5])
  assert intervals.effective_trials(rates, 2, per_draw) == pytest.approx(60 / 13)
  z2, n = intervals.Z95**2, 60 / 13
  centre = (0.625 + z2 / (2 * n)) / (1 + z2 / n)
  half = intervals.Z95 / (1 + z2 / n) * math.sqrt(0.625 * 0.375 / n + z2 / (4 * n * n))
  assert intervals.accuracy_interval(rates, 2, per_draw) == pytest.approx(
    (centre - half, centre + half)
  )
  assert intervals.accuracy_interval(rates, 2, per_draw) == pytest.approx((0.23703, 0.89941), 1e-4)


def test_intervals_stay_open_at_the_ends_and_bounded_by_all_verdicts():
  """All right (or all wrong) is Wilson over the images, not a point; images all right
  in the same share of draws count as n K verdicts."""
  assert intervals.accuracy_interval(np.ones(4), 3) == pytest.approx((0.51011, 1.0), abs=1e-5)
  assert intervals.accuracy_interval(np.zeros(4), 3) == pytest.approx((0.0, 0.48989), abs=1e-5)
  assert intervals.effective_trials(np.full(2, 0.5), 2) == 4
  assert intervals.accuracy_interval(np.full(2, 0.5), 2) == intervals.wilson_interval(0.5, 4)
  with pytest.raises(ValueError, match='at least one image'):
    intervals.accuracy_interval(np.array([]), 1)


def test_the_interval_over_seeds_is_students_by_hand():
  """Seeds 52, 54, 56: mean 54, s = 2, t(0.975, 2 df) = 4.302653 from the tables."""
  half = 4.302652729911275 * 2 / math.sqrt(3)
  assert intervals.seed_interval([52, 54, 56]) == pytest.approx((54 - half, 54 + half))
  assert intervals.seed_interval([3.0, 3.0]) == (3.0, 3.0)  # No spread, no width.
  with pytest.raises(ValueError, match='at least 2 values, got 1'):
    intervals.seed_interval([50.0])


def test_a_difference_over_seeds_is_welchs_by_hand():
  """52, 54, 56 against 49, 50, 51: difference 4, squared standard error 4/3 + 1/3,
  Welch-Satterthwaite df (5/3)^2 / ((4/3)^2/2 + (1/3)^2/2) = 50/17; its interval
  includes 0 (-0.155): the seeds do not support the difference. Without spread the
  difference is exact."""
  half = stats.t.ppf(0.975, 50 / 17) * math.sqrt(5 / 3)
  diff, low, high = intervals.difference_interval([52, 54, 56], [49, 50, 51])
  assert (diff, low, high) == pytest.approx((4, 4 - half, 4 + half))
  assert low == pytest.approx(-0.1554, abs=1e-4)
  assert intervals.difference_interval([52, 52], [50, 50]) == (2.0, 2.0, 2.0)
  with pytest.raises(ValueError, match='2 values a side, got 3 and 1'):
    intervals.difference_interval([1, 2, 3], [1])


# --- judging over draws -------------------------------------------------------------


def _verdicts(logits_fn, judged_draws, first_draw=0, rule='single', draws=1):
  x_adv = jnp.clip(X + 0.1, 0, 1)
  return jax.jit(
    lambda k: judging.judged_verdicts(
      logits_fn,
      k,
      X,
      x_adv,
      Y,
      judged_draws=judged_draws,
      rule=rule,
      draws=draws,
      first_draw=first_draw,
    )
  )(KEY)


@pytest.mark.parametrize('rule, draws', [('single', 1), ('vote', 3)])
def test_k_draws_are_k_single_draw_judgements_bit_for_bit(rule, draws):
  right, fooled = _verdicts(noisy, 4, rule=rule, draws=draws)
  singles = [_verdicts(noisy, 1, first_draw=k, rule=rule, draws=draws) for k in range(4)]
  np.testing.assert_array_equal(right, np.concatenate([r for r, _ in singles]))
  np.testing.assert_array_equal(fooled, np.concatenate([f for _, f in singles]))
  assert len({np.asarray(r).tobytes() for r in right}) > 1  # The draws differ.


def test_draw_k_predicts_with_the_documented_key():
  right, _ = _verdicts(noisy, 3)
  x_adv = jnp.clip(X + 0.1, 0, 1)
  for k in range(3):
    key = jax.random.fold_in(jax.random.fold_in(KEY, k), 0)  # Draw k, prediction draw 0.
    np.testing.assert_array_equal(right[k], jnp.argmax(noisy(x_adv, key), -1) == Y)


def _judgement(logits_fn, judged_draws):
  """A Judgement of the shifted inputs over `judged_draws` draws, as judging builds it."""
  right, fooled = _verdicts(logits_fn, judged_draws)
  l2 = np.full(X.shape[0], 0.4)
  return judging.Judgement(
    np.asarray(right.sum(0)), np.asarray(fooled.sum(0)), l2, np.asarray(right.sum(1))
  )


def test_a_deterministic_model_has_no_spread_over_draws():
  counts = _judgement(linear, 5).counts()
  once = _judgement(linear, 1).counts()
  assert counts['accuracy'] == counts['accuracy_all_draws'] == once['accuracy']
  assert counts['correct'] == 5 * once['correct'] and counts['judged_draws'] == 5
  assert counts['accuracy_ci95'] == pytest.approx(
    intervals.wilson_interval(once['accuracy'], X.shape[0])
  )


def test_a_randomized_model_is_right_under_every_draw_less_often_than_on_average():
  counts = _judgement(noisy, 8).counts()
  assert counts['accuracy_all_draws'] < counts['accuracy']
  low, high = counts['accuracy_ci95']
  assert low < counts['accuracy'] < high
  assert counts['n'] == 32 and counts['correct'] <= 8 * 32


# --- the worst case over attacks ----------------------------------------------------


def _record(attack, accuracy, name=None, eps=8 / 255, low=None, high=None, **fields):
  """A results.json record with what the worst case and sanity checks read."""
  params = {'eps': eps, 'examples': 0, 'attack_noise': True, **fields.pop('params', {})}
  record = {
    'label': 'm',
    'checkpoint': '/runs/m/checkpoints/10',
    'dataset': 'cifar10',
    'split': 'test',
    'n': 4,
    'rule': 'single',
    'draws': 1,
    'noise': True,
    'attack': attack,
    'name': name or attack,
    'params': params,
    'source': None,
    'accuracy': accuracy,
    'accuracy_ci95': [accuracy if low is None else low, accuracy if high is None else high],
    'judged_draws': 2,
    'verdicts': name or attack,
  }
  return {**record, **fields}


def test_the_worst_case_takes_each_images_worst_attack_of_the_threat_model():
  """Two draws; image 3 survives PGD but not APGD, image 2 the reverse; C&W (another
  budget) and a radius of the sweep do not count."""
  records = [
    _record('clean', 1.0, eps=None),
    _record('pgd', 0.5),
    _record('apgd_rand', 0.5),
    _record('cw', 0.0, eps=None),
    _record('pgd', 0.0, name='pgd at 16', eps=16 / 255),
  ]
  right = {'clean': [2, 2, 2, 2], 'pgd': [2, 0, 0, 2], 'apgd_rand': [2, 1, 1, 0]}
  right |= {'cw': [0, 0, 0, 0], 'pgd at 16': [0, 0, 0, 0]}
  stored = {f'{name}.right': np.array(v) for name, v in right.items()}
  [worst] = verdicts.worst_cases(records, stored, 8 / 255)
  assert worst['attacks'] == ['clean', 'pgd', 'apgd_rand']
  assert worst['accuracy'] == (1 + 0 + 0 + 0) / 4  # min(1, 1, 1), min(1, 0, .5), ...
  assert worst['accuracy_all_draws'] == 0.25
  assert worst['accuracy_ci95'] == pytest.approx(
    intervals.accuracy_interval(np.array([1.0, 0, 0, 0]), 2)
  )


def test_verdicts_of_replaced_records_are_dropped():
  stored = verdicts.arrays('a', [1, 2], [3]) | verdicts.arrays('b', [0, 0], [0])
  assert set(verdicts.kept(stored, [{'verdicts': 'b'}])) == {'b.right', 'b.draw_right'}


# --- sanity checks ------------------------------------------------------------------


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
  return _record('pgd', accuracy, name, eps, low, high, params=params, **fields)


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


def test_more_steps_and_more_eot_draws_must_not_raise_accuracy_beyond_the_interval():
  fine = _checks([_pgd(0.50, 7, high=0.55), _pgd(0.54, 20), _pgd(0.50, 7, 30)])
  assert fine['more_steps']['passed'] and fine['more_eot_draws']['passed']
  bad = _checks([_pgd(0.50, 7, high=0.55), _pgd(0.60, 20), _pgd(0.58, 7, 30)])
  assert not bad['more_steps']['passed'] and not bad['more_eot_draws']['passed']
  assert 'pgd (20 steps, 1 eot_draws) at 8/255 60.00%' in bad['more_steps']['detail']


def test_single_step_must_not_beat_iterative_beyond_the_interval():
  assert _checks([_record('fgsm', 0.45), _pgd(0.50, low=0.46)])['single_step']['passed'] is False
  assert _checks([_record('fgsm', 0.47), _pgd(0.50, low=0.46)])['single_step']['passed'] is True


def test_white_box_must_not_be_weaker_than_a_transfer_or_noise_off_cell():
  source = {'label': 's', 'checkpoint': '/runs/s/checkpoints/10', 'step': 10}
  transfer = _pgd(0.30, name='from s', source=source)
  noise_off = _record(
    'pgd', 0.30, 'off', params={'steps': 7, 'eot_draws': 1, 'attack_noise': False}
  )
  for other in (transfer, noise_off):
    assert not _checks([_pgd(0.50, low=0.40), other])['white_box_vs_transfer']['passed']
    assert _checks([_pgd(0.35, low=0.25), other])['white_box_vs_transfer']['passed']


def test_an_unbounded_attack_must_reach_near_zero():
  assert not _checks([_record('cw', 0.40, eps=None)])['unbounded']['passed']
  assert _checks([_record('cw', 0.01, eps=None)])['unbounded']['passed']


def test_a_model_whose_logits_vary_must_be_judged_over_draws():
  once = _record('clean', 0.9, eps=None, judged_draws=1)
  assert not _checks([once], logits_vary=True)['judged_over_draws']['passed']
  assert _checks([once], logits_vary=False)['judged_over_draws']['passed']
  assert _checks([_record('clean', 0.9, eps=None)], logits_vary=True)['judged_over_draws']['passed']
