"""Judging over noise draws and its intervals, on toy linear models (the worst case and
the sanity checks: test_verdicts.py, test_sanity.py; the end-to-end run: test_eval.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from toy_models import KEY, X, Y, linear, noisy

from l2p_jax.evaluation import intervals, judging

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


def _right(logits_fn, judged_draws, first_draw=0, rule='single', draws=1, x=None):
  """(N, judged_draws) bits of the shifted inputs (or x) right under each judged draw."""
  x = jnp.clip(X + 0.1, 0, 1) if x is None else x
  return jax.jit(
    lambda k: judging.judged_right(
      logits_fn, k, x, Y, judged_draws=judged_draws, rule=rule, draws=draws, first_draw=first_draw
    )
  )(KEY)


@pytest.mark.parametrize('rule, draws', [('single', 1), ('vote', 3)])
def test_k_draws_are_k_single_draw_judgements_bit_for_bit(rule, draws):
  right = _right(noisy, 4, rule=rule, draws=draws)
  singles = [_right(noisy, 1, first_draw=k, rule=rule, draws=draws) for k in range(4)]
  np.testing.assert_array_equal(right, np.concatenate(singles, axis=1))
  assert len({np.asarray(r).tobytes() for r in right.T}) > 1  # The draws differ.


def test_draw_k_predicts_with_the_documented_key():
  right = _right(noisy, 3)
  x_adv = jnp.clip(X + 0.1, 0, 1)
  for k in range(3):
    key = jax.random.fold_in(jax.random.fold_in(KEY, k), 0)  # Draw k, prediction draw 0.
    np.testing.assert_array_equal(right[:, k], jnp.argmax(noisy(x_adv, key), -1) == Y)


def _judgement(logits_fn, judged_draws):
  """A Judgement of the shifted inputs over `judged_draws` draws, as judging builds it:
  fooled where the clean image is right under the same draw."""
  right, clean = _right(logits_fn, judged_draws), _right(logits_fn, judged_draws, x=X)
  l2 = np.full(X.shape[0], 0.4)
  return judging.Judgement(
    np.asarray(right.sum(1)), np.asarray((clean & ~right).sum(1)), l2, np.asarray(right.sum(0))
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
