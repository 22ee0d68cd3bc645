"""APGD-T and the AutoAttack suites (autoattack.py), C&W in expectation and its early
abort (cw.py), and the specs a deterministic and a randomized model plan for them
(builtin_attacks.py, AttackSpec.for_model), on toy models."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import KEY, X, Y, linear, noisy

from configs import eval as eval_config
from l2p_jax import attacks
from l2p_jax.attacks import cw
from l2p_jax.evaluation import plan_attacks, runner
from l2p_jax.evaluation.attack_registry import attack_title

RNG = np.random.default_rng(1)
W10 = jnp.asarray(RNG.normal(size=(48, 10)), jnp.float32)
X10 = jnp.asarray(RNG.uniform(size=(24, 4, 4, 3)), jnp.float32)
EPS = 0.05


def linear10(x, key):
  """A deterministic linear 10-class model on 4x4x3 inputs."""
  del key
  return x.reshape(x.shape[0], -1) @ W10


Y10 = jnp.argmax(linear10(X10, None), -1)


def test_targeted_dlr_is_the_papers_ratio():
  logits = jnp.array([[4.0, 3.0, 2.0, 1.0, 0.0]])
  # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) with y = 0, t = 3: -(4 - 1) / (4 - 1.5).
  value = attacks.dlr_targeted(logits, jnp.array([0]), jnp.array([3]))
  np.testing.assert_allclose(value, [-3 / 2.5], rtol=1e-6)
  with pytest.raises(ValueError, match='at least 4 classes'):
    attacks.dlr_targeted(logits[:, :3], jnp.array([0]), jnp.array([1]))


def linear_robust(eps):
  """Per image, whether some class t beats y at a point of the eps-ball around it for the
  linear model: z_t - z_y + eps ||w_t - w_y||_1 > 0 (the [0, 1] box aside, an upper
  bound on what any attack fools)."""
  z, w, y = np.asarray(linear10(X10, None)), np.asarray(W10), np.asarray(Y10)
  reach = (
    z - z[np.arange(len(y)), y][:, None] + eps * np.abs(w[:, :, None] - w[:, None, y]).sum(0).T
  )
  reach[np.arange(len(y)), y] = -np.inf
  return reach.max(1) > 0


def test_apgd_t_fools_what_the_linear_model_allows_and_stays_in_the_ball():
  """On the linear model APGD-T fools exactly the images some class can win in the ball
  (measured at eps 0.02 to 0.08: 8 to 19 of 24, as the bound); more targets never fool
  fewer; every verdict is the model's."""
  run = lambda targets: jax.jit(
    functools.partial(attacks.apgd_targeted, linear10, eps=EPS, steps=10, target_classes=targets)
  )(KEY, X10, Y10)
  one, nine = run(1), run(9)
  np.testing.assert_array_equal(nine.success, linear_robust(EPS))
  assert 0 < nine.success.sum() < len(Y10)
  assert np.all(np.asarray(nine.success) >= np.asarray(one.success))
  fooled = jnp.argmax(linear10(nine.x_adv, None), -1) != Y10
  np.testing.assert_array_equal(nine.success, fooled)
  assert float(jnp.abs(nine.x_adv - X10).max()) <= EPS + 1e-6


def test_autoattack_standard_adds_to_apgd_ce_and_rand_is_autoattack_rand():
  standard = attacks.autoattack(linear10, KEY, X10, Y10, eps=EPS, steps=10, queries=50)
  ce = attacks.apgd(linear10, jax.random.fold_in(KEY, 0), X10, Y10, eps=EPS, steps=10)
  assert np.all(np.asarray(standard.success) >= np.asarray(ce.success))
  np.testing.assert_array_equal(standard.success, linear_robust(EPS))
  rand = attacks.autoattack(noisy, KEY, X, Y, eps=EPS, version='rand', steps=5, eot_draws=2)
  reference = attacks.autoattack_rand(noisy, KEY, X, Y, eps=EPS, steps=5, eot_draws=2)
  assert all(np.array_equal(a, b) for a, b in zip(rand, reference))
  with pytest.raises(ValueError, match="'standard' or 'rand'"):
    attacks.autoattack(linear10, KEY, X10, Y10, eps=EPS, version='plus')


CW = dict(c_init=1.0, learning_rate=0.05, kappa=0.0, binary_steps=3, steps=40)


def noisy10(x, key):
  """The 10-class linear model with Gaussian noise of std 0.2 on its input."""
  return linear10(x + 0.2 * jax.random.normal(key, x.shape), key)


def test_cw_in_expectation_fools_fresh_draws_more():
  """One draw keeps the smallest point that fooled one draw, which fresh draws send back;
  in expectation a kept point fools the mean softmax of 10 fresh draws. Measured under
  100 fresh draws: 68% right after one draw, 51% in expectation (a minimum-norm point
  lies on the expected decision boundary, so about half the draws stay right)."""

  def fresh_accuracy(draws):
    run = jax.jit(lambda key: attacks.cw_l2(noisy10, key, X10, Y10, eot_draws=draws, **CW))
    x_adv = run(KEY).x_adv
    rights = [jnp.argmax(noisy10(x_adv, jax.random.key(50 + i)), -1) == Y10 for i in range(100)]
    return float(jnp.mean(jnp.stack(rights)))

  assert fresh_accuracy(10) < fresh_accuracy(1) - 0.1


def logit_noise(scale):
  """The 10-class linear model with Gaussian noise of std `scale` on its logits."""
  return lambda x, key: linear10(x, key) + scale * jax.random.normal(key, (x.shape[0], 10))


def test_expected_margin_bound_is_the_estimate_less_z_standard_errors():
  """Against NumPy on the draws fold_in(key, j): the margin of the log mean softmax,
  less z times the sample standard deviation of the draws' margins over sqrt(draws)."""
  model, x = logit_noise(1.0), X10[:6]
  logits = np.stack(
    [np.asarray(model(x, jax.random.fold_in(KEY, j)), np.float64) for j in range(7)]
  )
  softmax = np.exp(logits - logits.max(-1, keepdims=True))
  softmax /= softmax.sum(-1, keepdims=True)

  def margin(z):
    z = z.copy()
    true = z[np.arange(len(x)), np.asarray(Y10[:6])]
    z[np.arange(len(x)), np.asarray(Y10[:6])] = -np.inf
    return z.max(-1) - true

  estimate = margin(np.log(softmax.mean(0)))
  spread = np.std([margin(d) for d in logits], axis=0, ddof=1)
  for z in (0.0, 2.0):
    bound = cw.expected_margin_bound(model, x, Y10[:6], KEY, 7, z)
    np.testing.assert_allclose(bound, estimate - z * spread / np.sqrt(7), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'at least 2 draws, got draws=1 \(z=2.0\)'):
    cw.expected_margin_bound(model, x, Y10[:6], KEY, 1, 2.0)


def test_cw_in_expectation_with_a_confidence_bound_keeps_no_lucky_points():
  """The smallest point that passed any one of 300 noisy 10-draw checks passed by luck:
  with logit noise of std 2, eot_z 0 keeps points that 50-draw ensembles of fresh draws
  judge right 18.5% of the time (measured), eot_z 2 0.6%. With little noise (std 0.5)
  the bound costs little L2 (measured: 8%)."""

  def run(scale, z):
    model = logit_noise(scale)
    params = {**CW, 'kappa': 1.0, 'steps': 100, 'eot_draws': 10, 'eot_z': z}
    result = jax.jit(lambda key: attacks.cw_l2(model, key, X10, Y10, **params))(KEY)
    ensemble = lambda k: jnp.mean(
      jax.nn.softmax(
        jax.vmap(lambda j: model(result.x_adv, jax.random.fold_in(k, j)))(jnp.arange(50))
      ),
      axis=0,
    )
    right = [jnp.argmax(ensemble(jax.random.key(100 + i)), -1) == Y10 for i in range(20)]
    return float(jnp.mean(jnp.stack(right))), float(result.l2[result.success].mean())

  assert run(2.0, 0.0)[0] > 0.1 and run(2.0, 2.0)[0] < 0.03
  (_, plain), (_, bounded) = run(0.5, 0.0), run(0.5, 2.0)
  assert plain < bounded < 1.15 * plain


def test_cw_early_abort_stops_a_plateaued_binary_step():
  """Counting forward passes: on the linear model the loss stops falling long before
  1000 iterations, so early abort runs far fewer and finds the same images with an L2
  within 5%; without it every iteration runs."""
  calls = []
  counted = lambda x, key: (jax.debug.callback(lambda: calls.append(1)), linear(x, key))[1]
  run = lambda abort: attacks.cw_l2(
    counted, KEY, X, Y, **{**CW, 'steps': 1000, 'binary_steps': 2}, abort_early=abort
  )
  full = run(False)
  forwards_full = len(calls)
  calls.clear()
  aborted = run(True)
  assert forwards_full == 2000 and len(calls) < 1000
  np.testing.assert_array_equal(aborted.success, full.success)
  ok = np.asarray(full.success)
  assert float(aborted.l2[ok].mean()) == pytest.approx(float(full.l2[ok].mean()), rel=0.05)


def _abort_reference(losses, period, on_mean):
  """The iteration at which Carlini & Wagner's early abort stops (None: never), a plain
  loop: every `period` iterations compare the loss (on_mean: the period's mean loss) with
  the last one compared."""
  last = np.inf
  for t, loss in enumerate(losses):
    if (t + 1 if on_mean else t) % period:
      continue
    value = np.mean(losses[t + 1 - period : t + 1]) if on_mean else loss
    if value > 0.9999 * last:
      return t
    last = value
  return None


def test_early_abort_on_one_iteration_or_on_the_periods_mean_as_a_plain_loop():
  """On a falling loss with noise of std 0 to 2, `_early_abort` stops where the loop does;
  noise alone stops the one-iteration rule (std 0.5: at 300 of 400), the mean rule only
  at std 2, and later (369 against 160)."""
  t, rng = np.arange(400), np.random.default_rng(0)
  stops = {}
  for noise in (0.0, 0.5, 1.0, 2.0):
    losses = (10 + 100 * np.exp(-t / 150) + noise * rng.normal(size=t.size)).astype(np.float32)
    for on_mean in (False, True):
      abort, stop_at = (jnp.inf, jnp.zeros(()), False), None
      for i, loss in enumerate(losses):
        abort = cw._early_abort(i, jnp.float32(loss), abort, 10, on_mean)
        if abort[-1]:
          stop_at = i
          break
      assert stop_at == _abort_reference(losses, 10, on_mean), (noise, on_mean)
      stops[noise, on_mean] = stop_at
  assert stops[0.0, False] is None and stops[0.5, False] is not None
  assert stops[1.0, True] is None and stops[2.0, True] > stops[2.0, False]


def test_cw_in_expectation_aborts_on_the_mean_loss_not_on_one_noisy_iteration():
  """Logit noise of std 2, 10 draws, 3 x 300 iterations: the one-iteration abort stops
  binary steps on noise and keeps points 11.6% farther than without abort (measured),
  the mean rule 4.6%, after more iterations; both fool every image."""

  def run(**abort):
    calls = []
    model = logit_noise(2.0)
    counted = lambda x, key: (jax.debug.callback(lambda: calls.append(1)), model(x, key))[1]
    params = {**CW, 'kappa': 1.0, 'steps': 300, 'eot_draws': 10, 'eot_z': 2.0, **abort}
    result = attacks.cw_l2(counted, KEY, X10, Y10, **params)
    assert bool(result.success.all())
    return float(result.l2.mean()), len(calls)

  (full, _), (point, point_calls), (mean, mean_calls) = (
    run(),
    run(abort_early=True),
    run(abort_early=True, abort_on_mean=True),
  )
  assert point > 1.08 * full and mean - full < 0.6 * (point - full)
  assert point_calls < mean_calls < 3 * 300 * 10 * 2


def _specs(names, randomized, **cw):
  config = eval_config.get_config()
  with config.unlocked():
    config.cw.update(cw)
  return [repr(s.for_model(config, randomized)) for s in plan_attacks(config, names)[0]]


def test_a_deterministic_cw_keeps_its_spec_text_a_randomized_one_adds_its_draws():
  """Without early abort a deterministic model's C&W spec is the earlier text (its key
  and record unchanged); with it the params add abort_early=True; a randomized model's
  adds eot_draws and takes cw.eot_kappa as its margin; PNI's preset stays the authors' on
  every model."""
  earlier = (
    "AttackSpec(attack='cw', params=(('c_init', 0.01), ('learning_rate', 0.01), "
    "('kappa', 0.0), ('binary_steps', 9), ('steps', 1000)), eps=None, examples=0, "
    'attack_noise=True)'
  )
  assert _specs('cw', False, abort_early=False) == [earlier]
  assert _specs('cw', True, abort_early=False, eot_draws=1) == [earlier]
  [randomized] = _specs('cw', True)
  assert "('kappa', 1.0)" in randomized and "('kappa', 0.0)" not in randomized
  assert "('abort_early', True), ('eot_draws', 10), ('eot_z', 2.0), ('abort_on_mean', True))" in (
    randomized
  )
  [one_iteration_abort] = _specs('cw', True, eot_abort_on_mean=False)
  assert one_iteration_abort == randomized.replace(", ('abort_on_mean', True)", '')
  [before_eot_z] = _specs('cw', True, eot_z=0.0, eot_abort_on_mean=False)
  assert before_eot_z == one_iteration_abort.replace(", ('eot_z', 2.0)", '')
  assert 'abort_on_mean' not in _specs('cw', True, abort_early=False)[0]
  params = dict(plan_attacks(eval_config.get_config(), 'cw')[0][0].params)
  title = lambda **p: attack_title({'attack': 'cw', 'params': {**params, **p}})
  assert title(eot_draws=10, eot_z=2.0) == 'EOT-C&W (10 draws, z 2) acc / L2'
  assert title(eot_draws=10, eot_z=2.0, abort_on_mean=True) == (
    'EOT-C&W (10 draws, z 2, mean abort) acc / L2'
  )
  [chosen] = _specs('cw', True, eot_kappa=0.25, kappa=3.0)
  assert "('kappa', 0.25)" in chosen
  assert "('kappa', 3.0)" in _specs('cw', False, eot_kappa=0.25, kappa=3.0)[0]
  assert _specs('cw_pni', True) == _specs('cw_pni', False)


def test_square_apgd_t_and_autoattack_plan_their_randomized_variants():
  deterministic = _specs('square,apgd_t,autoattack', False)
  randomized = _specs('square,apgd_t,autoattack', True)
  assert "(('queries', 5000), ('p_init', 0.8))" in deterministic[0]
  assert "(('queries', 500), ('p_init', 0.8), ('eot_draws', 20))" in randomized[0]
  assert 'eot_draws' not in deterministic[1] and "('eot_draws', 20)" in randomized[1]
  assert "('version', 'standard')" in deterministic[2]
  assert "(('version', 'rand'), ('steps', 100), ('eot_draws', 20))" in randomized[2]


def _curve_ends_at_the_verdict(result, length):
  """The curve (not fooled yet, per image) has `length` rows, never unfools an image and
  ends at the attack's own verdict; returns it."""
  curve = np.asarray(result.curve)
  assert curve.shape == (length, len(result.success)) and np.all(curve[1:] <= curve[:-1])
  np.testing.assert_array_equal(curve[-1], ~np.asarray(result.success))
  return curve


def test_apgd_suites_keep_the_curve_of_all_their_stages_one_after_the_other():
  """APGD-rand (CE then DLR), APGD-T (9 targets), AutoAttack standard (APGD-CE, APGD-T,
  Square) and rand: one row per iteration of the whole attack, the first stage's curve
  its own, and a stage skipped where everything is fooled counted as all fooled."""
  ce = attacks.apgd(linear10, jax.random.fold_in(KEY, 0), X10, Y10, eps=EPS, steps=10)
  rand = attacks.autoattack_rand(linear10, KEY, X10, Y10, eps=EPS, steps=10, eot_draws=1)
  np.testing.assert_array_equal(_curve_ends_at_the_verdict(rand, 21)[:11], ce.curve)
  targeted = attacks.apgd_targeted(linear10, KEY, X10, Y10, eps=EPS, steps=10)
  first = attacks.apgd_targeted(linear10, KEY, X10, Y10, eps=EPS, steps=10, target_classes=1)
  curve = _curve_ends_at_the_verdict(targeted, 91)
  np.testing.assert_array_equal(curve[:11], _curve_ends_at_the_verdict(first, 11))
  assert curve[0].sum() > curve[-1].sum()
  standard = attacks.autoattack(linear10, KEY, X10, Y10, eps=EPS, steps=10, queries=50)
  curve = _curve_ends_at_the_verdict(standard, 1 + 10 + 90 + 50)
  np.testing.assert_array_equal(curve[:11], ce.curve)
  apgd_t = attacks.apgd_targeted(linear10, jax.random.fold_in(KEY, 1), X10, Y10, eps=EPS, steps=10)
  np.testing.assert_array_equal(curve[11:101], apgd_t.curve[1:] & ~ce.success)
  version = dict(version='rand', steps=5, eot_draws=2)
  _curve_ends_at_the_verdict(attacks.autoattack(noisy, KEY, X, Y, eps=EPS, **version), 11)
  wide = attacks.autoattack(linear10, KEY, X10, Y10, eps=0.5, steps=10, queries=50)
  assert not _curve_ends_at_the_verdict(wide, 151)[10:].any()  # APGD-T, Square skipped.


def test_a_deterministic_model_runs_one_eot_draw():
  """Every draw of a deterministic model gives the same logits: its APGD-rand and
  EOT-PGD specs record one draw (EOT-PGD then being its PGD, run once), a randomized
  model's keep config.apgd's and config.eot's draws."""
  assert "('steps', 100), ('eot_draws', 1))" in _specs('apgd', False)[0]
  assert "('steps', 100), ('eot_draws', 20))" in _specs('apgd', True)[0]
  assert _specs('eot_pgd', False) == _specs('pgd', False)
  assert "('eot_draws', 30))" in _specs('eot_pgd', True)[0]
  config = eval_config.get_config()
  specs = plan_attacks(config, 'pgd,eot_pgd,apgd')[0]
  model = types.SimpleNamespace(randomized=False)
  assert [s.name for s in runner.model_specs(config, model, specs)] == [
    'pgd(steps=7, step_size=0.01, random_start=True, restarts=1, eot_draws=1, eps=8/255)',
    'apgd_rand(steps=100, eot_draws=1, eps=8/255)',
  ]
