"""Square (square.py) on toy models: its schedule, budget, keys and EOT, and the
`gradient_free` sanity check it feeds, which fires on a model behind a non-differentiable
input quantization (PGD stalls, Square does not) and passes the same model without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hand_records import record
from toy_models import KEY, X, Y, linear, noisy

from l2p_jax import attacks
from l2p_jax.attacks.square import square_sides
from l2p_jax.evaluation import intervals, sanity

EPS = 0.15


def quantized(x, key):
  """The linear toy model behind a rounding of its input to 5 levels: its input gradient
  is zero, its decisions are not."""
  return linear(jnp.round(x * 4) / 4, key)


def accuracy(logits_fn, x_adv, y, key=None):
  return float(jnp.mean(jnp.argmax(logits_fn(x_adv, key), -1) == y))


def test_square_sides_follow_autoattacks_schedule():
  """p_init 0.8 of a 32x32 image is a side of 29 for the first ten thousandths of the
  queries, then p halves along the schedule down to p_init / 512: a side of 1."""
  sides = square_sides(5000, 0.8, 32, 32)
  assert sides[0] == sides[5] == 29 and sides[6] == round(np.sqrt(0.4 * 1024)) == 20
  assert sides[-1] == 1 and np.all(np.diff(sides) <= 0)
  assert square_sides(10, 0.8, 4, 4).max() == 4  # at most the image's side


def test_square_stays_in_the_ball_and_its_verdict_is_the_models():
  run = jax.jit(lambda key: attacks.square(linear, key, X, Y, eps=EPS, queries=100))
  result = run(KEY)
  assert float(jnp.abs(result.x_adv - X).max()) <= EPS + 1e-6
  assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
  fooled = np.asarray(jnp.argmax(linear(result.x_adv, None), -1) != Y)
  np.testing.assert_array_equal(np.asarray(result.success), fooled)
  assert 0.5 < fooled.mean() < 1
  again = run(KEY)
  assert all(np.array_equal(a, b) for a, b in zip(result, again))
  other = run(jax.random.key(1))
  assert not np.array_equal(other.x_adv, result.x_adv)


def test_square_attacks_no_image_marked_done():
  """An image AutoAttack's cascade has fooled already keeps Square's striped start: the
  start of a run where every image is done, in which no query is made."""
  done = jnp.arange(len(Y)) < 16
  result = attacks.square(linear, KEY, X, Y, eps=EPS, queries=100, done=done)
  start = attacks.square(linear, KEY, X, Y, eps=EPS, queries=100, done=jnp.ones_like(done))
  np.testing.assert_array_equal(result.x_adv[:16], start.x_adv[:16])
  assert not np.array_equal(result.x_adv[16:], start.x_adv[16:])


def test_square_in_expectation_fools_fresh_draws_more():
  """On the noisy toy model, keeping a square only when the margin averaged over 20
  draws falls leaves fewer images right under fresh draws than one draw per query.
  Measured: 59% of 50 fresh draws right after one draw, 41% after 20."""

  def fresh_accuracy(draws):
    run = jax.jit(
      lambda key: attacks.square(noisy, key, X, Y, eps=0.2, queries=100, eot_draws=draws)
    )
    x_adv = run(KEY).x_adv
    return np.mean([accuracy(noisy, x_adv, Y, jax.random.key(50 + i)) for i in range(50)])

  assert fresh_accuracy(20) < fresh_accuracy(1) - 0.1


def _record(attack, logits_fn, x_adv, y, **params):
  """A record of x_adv judged once on the toy model, with its interval."""
  right = np.asarray(jnp.argmax(logits_fn(x_adv, None), -1) == y).astype(float)
  low, high = intervals.accuracy_interval(right, 1)
  return record(attack, right.mean(), attack, EPS, low, high, params=params)


def _gradient_free_check(logits_fn):
  y = jnp.argmax(logits_fn(X, None), -1)
  pgd = attacks.pgd(logits_fn, KEY, X, y, eps=EPS, steps=10, step_size=EPS / 4).x_adv
  square = attacks.square(logits_fn, KEY, X, y, eps=EPS, queries=100).x_adv
  records = [
    _record('pgd', logits_fn, pgd, y, steps=10, eot_draws=1, step_size=EPS / 4),
    _record('square', logits_fn, square, y, queries=100, p_init=0.8),
  ]
  results = {
    'config': {'eps': EPS},
    'checkpoints': [{'label': 'm', 'checkpoint': records[0]['checkpoint'], 'logits_vary': None}],
    'records': records,
  }
  [check] = [c for c in sanity.sanity_checks(results) if c['name'] == 'gradient_free']
  return check, records


def test_gradient_free_fires_where_quantization_masks_the_gradient():
  """Behind the quantization PGD moves by its random start alone (measured: 88% right)
  while Square, needing no gradient, leaves 25%: far below PGD's interval. Without it
  (the honest twin) PGD and Square both leave 22%."""
  check, (pgd, square) = _gradient_free_check(quantized)
  assert check['passed'] is False and pgd['accuracy'] > 0.8 and square['accuracy'] < 0.4
  assert 'square at 38.25/255' in check['detail']
  honest, (pgd, square) = _gradient_free_check(linear)
  assert honest['passed'] is True and pgd['accuracy'] < 0.4
  assert square['accuracy'] == pytest.approx(pgd['accuracy'], abs=0.1)


X256 = jnp.asarray(np.random.default_rng(2).uniform(size=(256, 4, 4, 1)), jnp.float32)
Y256 = jnp.argmax(linear(X256, None), -1)


def _converged_check(steps, fraction):
  """PGD of `steps` steps of eps / fraction (no random start) on the linear model and
  256 images, its record holding the curve of its own verdicts as accuracies."""
  result = attacks.pgd(
    linear, KEY, X256, Y256, eps=EPS, steps=steps, step_size=EPS / fraction, random_start=False
  )
  curve = list(np.asarray(result.curve).sum(1) / len(Y256))
  pgd = _record('pgd', linear, result.x_adv, Y256, steps=steps, eot_draws=1)
  results = {
    'config': {'eps': EPS},
    'checkpoints': [{'label': 'm', 'checkpoint': pgd['checkpoint'], 'logits_vary': None}],
    'records': [{**pgd, 'curve': curve}],
  }
  [check] = [c for c in sanity.sanity_checks(results) if c['name'] == 'converged']
  return check, curve


def test_converged_fires_on_an_attack_still_descending_and_passes_a_finished_one():
  """8 steps of eps / 8 reach the ball's edge at the last step, still fooling images at
  every step: the last quarter takes more off than the interval is wide. 40 steps of
  eps / 4 reach it after a quarter of them and then stop gaining."""
  short, curve = _converged_check(8, 8)
  assert short['passed'] is False and curve[6] - curve[8] > 0.1
  assert 'pgd (8 steps, 1 eot_draws) at 38.25/255: the last quarter' in short['detail']
  long, curve = _converged_check(40, 4)
  assert long['passed'] is True and len(curve) == 41 and curve[30] - curve[40] < 0.05


def test_square_and_apgd_keep_a_curve_that_ends_at_their_verdict():
  square = attacks.square(linear, KEY, X, Y, eps=EPS, queries=50)
  apgd = attacks.apgd(linear, KEY, X, Y, eps=EPS, steps=10)
  for result, length in ((square, 51), (apgd, 11)):
    curve = np.asarray(result.curve)  # Per example: not fooled yet.
    assert curve.shape == (length, len(Y)) and np.all(curve[1:] <= curve[:-1])  # fooled stays
    np.testing.assert_array_equal(curve[-1], ~np.asarray(result.success))
    assert curve[0].sum() > curve[-1].sum()
