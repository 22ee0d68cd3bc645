"""Gradient attacks (FGSM, PGD, EOT, restarts, APGD, C&W) against hand-computed answers.

The models are tiny: a 2-class linear model on 4x4x1 inputs, whose optimal attacks are
known in closed form, and a 3-class tanh MLP on 4x4x3 inputs (with a noisy variant).
Jitted attacks are module-level so that tests share their compilations; model weights
are passed as arguments so one compilation serves several models.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2p_jax import attacks
from l2p_jax.attacks import core

KEY = jax.random.key(0)
# Test data come from NumPy: drawing them with jax.random would compile a program each.
RNG = np.random.default_rng(0)

# --- 2-class linear model on 4x4x1: logits = x.flatten() @ W + b. ---
LIN_W = jnp.asarray(RNG.normal(size=(16, 2)), jnp.float32)
LIN_B = jnp.array([0.3, -0.3])
LIN_EPS = 0.1


def linear(params, x, key):
  del key
  w, b = params
  return x.reshape(x.shape[0], -1) @ w + b


def linear_direction(w, y):
  """w_y - w_other per example, shaped like the inputs."""
  return (w[:, y] - w[:, 1 - y]).T.reshape(-1, 4, 4, 1)


@functools.partial(jax.jit, static_argnames='unroll')
def pgd_linear(params, key, x, y, unroll=1):
  return attacks.pgd(
    functools.partial(linear, params),
    key,
    x,
    y,
    eps=LIN_EPS,
    steps=10,
    step_size=LIN_EPS / 4,
    unroll=unroll,
  )


@jax.jit
def fgsm_linear(params, key, x, y):
  return attacks.fgsm(functools.partial(linear, params), key, x, y, eps=LIN_EPS)


@jax.jit
def cw_linear(params, key, x, y):
  return attacks.cw_l2(
    functools.partial(linear, params), key, x, y, c_init=0.1, learning_rate=0.01, steps=100
  )


# --- 3-class MLP on 4x4x3, deterministic and noisy. ---
MLP_W1 = jnp.asarray(RNG.normal(size=(48, 32)) * 2, jnp.float32)
MLP_B1 = -0.5 * MLP_W1.sum(0)
MLP_W2 = jnp.asarray(RNG.normal(size=(32, 3)), jnp.float32)
SIGMA = 0.2
EPS = 0.04  # FGSM, PGD and APGD differ at this budget (10 steps)


def mlp(x, key=None):
  del key
  return jnp.tanh(x.reshape(x.shape[0], -1) @ MLP_W1 + MLP_B1) @ MLP_W2


def noisy_mlp(x, key):
  """The MLP on x + SIGMA * N(0, 1): a randomized classifier."""
  noise = jax.random.normal(key, (x.shape[0], x[0].size)).reshape(x.shape)
  return mlp(x + SIGMA * noise)


X = jnp.asarray(RNG.uniform(size=(32, 4, 4, 3)), jnp.float32)
Y = jnp.argmax(mlp(X), -1)
# Inputs at and near the box edges, for the constraint tests.
X_EDGES = jnp.asarray(RNG.choice([0.0, 0.01, 0.5, 0.99, 1.0], X.shape), jnp.float32)

fgsm_mlp = jax.jit(functools.partial(attacks.fgsm, mlp, eps=EPS))
pgd_mlp = jax.jit(functools.partial(attacks.pgd, mlp, eps=EPS, steps=10, step_size=EPS / 4))
apgd_mlp = jax.jit(functools.partial(attacks.apgd, mlp, eps=EPS, steps=10))
pgd_noisy = jax.jit(
  functools.partial(attacks.pgd, noisy_mlp, eps=EPS, steps=3, step_size=EPS / 2),
  static_argnames='eot_draws',
)
apgd_noisy = jax.jit(functools.partial(attacks.apgd, noisy_mlp, eps=EPS, steps=10, eot_draws=2))


def mean_ce(x_adv):
  return float(attacks.cross_entropy(mlp(x_adv), Y).mean())


def assert_in_ball(x_adv, x, eps):
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


# ---------------------------------------------------------------- losses

LOGITS = jnp.array([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
LABELS = jnp.array([1, 0])


def test_losses_on_hand_computed_logits():
  # y=1 is the top class (margin 2-3 = -1); y=0 is beaten by 3 (margin 3-1 = 2);
  # the top-1 minus top-3 logit gap is 3-1 = 2.
  np.testing.assert_allclose(attacks.cw_margin(LOGITS, LABELS), [-1.0, 2.0])
  np.testing.assert_allclose(attacks.dlr(LOGITS, LABELS), [-0.5, 1.0], rtol=1e-6)
  log_z = np.log(np.exp([1.0, 3.0, 2.0, 0.0]).sum())
  np.testing.assert_allclose(
    attacks.cross_entropy(LOGITS, LABELS), [log_z - 3.0, log_z - 1.0], rtol=1e-6
  )
  # DLR is invariant to shifting and positive scaling of the logits.
  np.testing.assert_allclose(attacks.dlr(5.0 * LOGITS - 7.0, LABELS), [-0.5, 1.0], rtol=1e-5)


def test_unknown_loss_and_two_class_dlr_are_errors():
  with pytest.raises(ValueError, match=r"'hinge'.*\['ce', 'cw', 'dlr'\]"):
    attacks.get_loss('hinge')
  with pytest.raises(ValueError, match="'hinge'"):
    attacks.pgd(mlp, KEY, X, Y, eps=EPS, steps=1, step_size=EPS, loss='hinge')
  with pytest.raises(ValueError, match='at least 3 classes'):
    attacks.dlr(jnp.zeros((2, 2)), jnp.array([0, 1]))


# ---------------------------------------------------------------- FGSM / PGD


@pytest.mark.parametrize('unroll', [1, True])
def test_pgd_and_fgsm_reach_the_closed_form_optimum_of_a_linear_model(unroll):
  # For 2 classes, CE and margin both grow fastest along -(w_y - w_other), so the
  # optimal L-inf attack is x - eps * sign(w_y - w_other), clipped to [0, 1].
  x = jnp.asarray(RNG.uniform(size=(8, 4, 4, 1)), jnp.float32)
  y = jnp.argmax(linear((LIN_W, LIN_B), x, None), -1)
  expected = jnp.clip(x - LIN_EPS * jnp.sign(linear_direction(LIN_W, y)), 0.0, 1.0)
  # 10 steps of eps/4 cross the 2 eps-wide ball from any random start.
  result = pgd_linear((LIN_W, LIN_B), KEY, x, y, unroll=unroll)
  np.testing.assert_array_equal(result.x_adv, expected)
  np.testing.assert_array_equal(fgsm_linear((LIN_W, LIN_B), KEY, x, y).x_adv, expected)
  np.testing.assert_allclose(
    result.l2, jnp.sqrt(jnp.sum((expected - x) ** 2, (1, 2, 3))), rtol=1e-6
  )
  fooled = jnp.argmax(linear((LIN_W, LIN_B), expected, None), -1) != y
  np.testing.assert_array_equal(result.success, fooled)


def test_perturbations_stay_in_the_eps_ball_and_the_box():
  x = X_EDGES
  assert_in_ball(core.linf_random_start(KEY, x, EPS), x, EPS)
  for attack in (fgsm_mlp, pgd_mlp, apgd_mlp):
    assert_in_ball(attack(KEY, x, Y).x_adv, x, EPS)
  assert_in_ball(pgd_noisy(KEY, x, Y, eot_draws=1).x_adv, x, EPS)


def test_pgd_is_stronger_than_fgsm_on_a_nonlinear_model():
  fgsm, pgd = fgsm_mlp(KEY, X, Y), pgd_mlp(KEY, X, Y)
  assert mean_ce(pgd.x_adv) > mean_ce(fgsm.x_adv) + 1.0
  assert int(pgd.success.sum()) > int(fgsm.success.sum())
  np.testing.assert_array_equal(pgd.success, jnp.argmax(mlp(pgd.x_adv), -1) != Y)


def test_pgd_restarts_keep_every_success_of_the_first_restart():
  one = pgd_mlp(KEY, X, Y)
  three = jax.jit(
    functools.partial(attacks.pgd, mlp, eps=EPS, steps=10, step_size=EPS / 4, restarts=3)
  )(KEY, X, Y)
  # Restart 0 uses the same key in both runs, so more restarts only add successes,
  # and where none succeeds they keep the highest-loss restart.
  assert bool(jnp.all(three.success >= one.success))
  np.testing.assert_array_equal(three.success, jnp.argmax(mlp(three.x_adv), -1) != Y)
  robust = ~three.success
  gain = (attacks.cross_entropy(mlp(three.x_adv), Y) - attacks.cross_entropy(mlp(one.x_adv), Y))[
    robust
  ]
  assert bool(jnp.all(gain >= 0)) and bool(jnp.any(gain > 0))


def test_best_of_restarts_keeps_the_first_fooling_else_the_highest_loss_restart():
  def run(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return (
      jax.random.uniform(k1, (6, 2)),
      jax.random.uniform(k2, (6,)),
      jax.random.uniform(k3, (6,)) < 0.3,
      jax.random.randint(k1, (3,), 0, 6),
    )

  x_adv, loss, fooled, curve = core.best_of_restarts(run, KEY, 4)
  runs = [jax.tree.map(np.asarray, run(jax.random.fold_in(KEY, r))) for r in range(4)]
  np.testing.assert_array_equal(curve, runs[0][3])  # the first restart's curve
  for i in range(6):
    firsts = [r for r in range(4) if runs[r][2][i]]
    pick = firsts[0] if firsts else int(np.argmax([runs[r][1][i] for r in range(4)]))
    np.testing.assert_array_equal(x_adv[i], runs[pick][0][i])
    assert loss[i] == runs[pick][1][i] and fooled[i] == bool(firsts)
  assert 0 < int(fooled.sum()) < 6  # both branches are exercised


@jax.jit
def pgd_mlp_step_fraction(eps, key, x, y):
  """PGD with its step a quarter of eps, eps traced: one compilation for every radius."""
  return attacks.pgd(mlp, key, x, y, eps=eps, steps=10, step_fraction=0.25)


def test_pgd_step_fraction_is_that_fraction_of_eps_at_every_radius():
  for eps in (EPS, 2 * EPS):
    fixed = jax.jit(functools.partial(attacks.pgd, mlp, eps=eps, steps=10, step_size=eps / 4))
    # eps / 4 is exact in binary, so the two steps are the same float.
    np.testing.assert_array_equal(
      pgd_mlp_step_fraction(eps, KEY, X, Y).x_adv, fixed(KEY, X, Y).x_adv
    )
  for both_or_neither in ({'step_size': 0.01, 'step_fraction': 0.25}, {}):
    with pytest.raises(ValueError, match='exactly one of step_size and step_fraction'):
      attacks.pgd(mlp, KEY, X, Y, eps=EPS, steps=1, **both_or_neither)


# ---------------------------------------------------------------- EOT and keys


def test_pgd_with_one_eot_draw_is_bit_identical_to_plain_pgd():
  @jax.jit
  def plain_pgd(key, x, y):
    """PGD written out with the key layout documented in attacks/pgd.py."""
    start_key, steps_key, _ = jax.random.split(jax.random.fold_in(key, 0), 3)
    x_adv = jnp.clip(x + jax.random.uniform(start_key, x.shape, minval=-EPS, maxval=EPS), 0.0, 1.0)
    for i in range(3):
      noise_key = jax.random.fold_in(jax.random.fold_in(steps_key, i), 0)
      grad = jax.grad(lambda z, k=noise_key: attacks.cross_entropy(noisy_mlp(z, k), y).sum())(x_adv)
      x_adv = attacks.linf_project(x_adv + EPS / 2 * jnp.sign(grad), x, EPS)
    return x_adv

  np.testing.assert_array_equal(pgd_noisy(KEY, X, Y, eot_draws=1).x_adv, plain_pgd(KEY, X, Y))


def test_pgd_noise_keys_are_the_keys_of_pgds_gradients():
  """A model that is NaN under every key but the listed ones leaves PGD's iterates finite
  when the list is pgd_noise_keys's (every restart, step and EOT draw), and not when it
  misses a step: the keys a training step draws ahead are the ones PGD asks for."""

  def pgd_known_keys_only(known, key):
    def logits_fn(x, noise_key):
      hit = jnp.all(jax.random.key_data(known) == jax.random.key_data(noise_key), axis=-1)
      return noisy_mlp(x, noise_key) * jnp.where(jnp.any(hit), 1.0, jnp.nan)

    return attacks.pgd(
      logits_fn, key, X, Y, eps=EPS, steps=3, step_size=EPS / 2, restarts=2, eot_draws=2
    ).x_adv

  run = jax.jit(pgd_known_keys_only)
  x_adv = run(attacks.pgd_noise_keys(KEY, 3, restarts=2, eot_draws=2), KEY)
  assert np.isfinite(x_adv).all() and not np.array_equal(x_adv, X)
  missing_a_step = attacks.pgd_noise_keys(KEY, 2, restarts=2, eot_draws=2)
  assert np.isnan(run(missing_a_step, KEY)).any()


def test_eot_averages_gradients_over_draws():
  # The gradient of PGD's first step (no random start) with the documented keys.
  x, y = X[:8], Y[:8]
  _, steps_key, _ = jax.random.split(jax.random.fold_in(KEY, 0), 3)
  step_key = jax.random.fold_in(steps_key, 0)
  draw_grad = jax.jit(jax.grad(lambda z, k: attacks.cross_entropy(noisy_mlp(z, k), y).sum()))
  draw_grads = [draw_grad(x, jax.random.fold_in(step_key, j)) for j in range(3)]
  mean_grad = sum(draw_grads) / 3

  @jax.jit
  def eot_grad_and_one_step():
    _, _, grad = core.eot_value_and_grad(noisy_mlp, attacks.cross_entropy, step_key, x, y, 3)
    return grad, attacks.pgd(
      noisy_mlp, KEY, x, y, eps=EPS, steps=1, step_size=EPS, random_start=False, eot_draws=3
    ).x_adv

  grad, one_step = eot_grad_and_one_step()
  np.testing.assert_allclose(grad, mean_grad, rtol=1e-5, atol=1e-5)
  # One step moves along the sign of the mean gradient, which here differs from the
  # sign of a single draw's gradient.
  assert bool(jnp.any(jnp.sign(mean_grad) != jnp.sign(draw_grads[0])))
  np.testing.assert_array_equal(one_step, jnp.clip(x + EPS * jnp.sign(mean_grad), 0.0, 1.0))


def test_same_key_same_result_other_key_other_result():
  for attack in (functools.partial(pgd_noisy, eot_draws=1), apgd_noisy):
    first, again = attack(KEY, X, Y), attack(KEY, X, Y)
    other = attack(jax.random.key(1), X, Y)
    np.testing.assert_array_equal(first.x_adv, again.x_adv)
    np.testing.assert_array_equal(first.success, again.success)
    assert not bool(jnp.all(first.x_adv == other.x_adv))


def test_attacks_do_not_pass_gradients_to_the_model():
  # A training loss on x_adv must not differentiate through the attack's iterations
  # (C&W's Adam iterates depend smoothly on the model, unlike sign steps).
  def adversarial_sum(scale):
    return jnp.sum(
      attacks.cw_l2(lambda x, k: scale * mlp(x), KEY, X[:4], Y[:4], binary_steps=1, steps=2).x_adv
    )

  assert float(jax.grad(adversarial_sum)(1.0)) == 0.0


# ---------------------------------------------------------------- APGD


def test_apgd_checkpoints_follow_the_paper():
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
  assert attacks.checkpoint_steps(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert attacks.checkpoint_steps(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def apgd_reference(logits_fn, key, x, y, eps, steps, rho=0.75, momentum=0.75):
  """Algorithm 1 of Croce & Hein (2020) written as a plain loop over NumPy arrays, with
  condition 1 counted on the loss history of each window (single restart)."""
  start_key, steps_key = jax.random.split(jax.random.fold_in(key, 0))

  def loss_logits_grad(z, t):
    noise_key = jax.random.fold_in(jax.random.fold_in(steps_key, t), 0)

    def summed_loss(v):
      logits = logits_fn(v, noise_key)
      return attacks.cross_entropy(logits, y).sum(), logits

    (_, logits), grad = jax.value_and_grad(summed_loss, has_aux=True)(jnp.asarray(z))
    return (np.asarray(attacks.cross_entropy(logits, y)), np.asarray(logits), np.asarray(grad))

  x = np.asarray(x)
  project = lambda z: np.clip(np.clip(z, x - eps, x + eps), 0.0, 1.0)  # noqa: E731
  col = lambda v: v[:, None, None, None]  # noqa: E731
  y = np.asarray(y)
  x_cur = x_prev = np.asarray(core.linf_random_start(start_key, jnp.asarray(x), eps))
  f, logits, g = loss_logits_grad(x_cur, 0)
  history = [f]
  x_best, g_best, f_best = x_cur, g, f
  fooled = logits.argmax(-1) != y
  x_fooled = x_cur
  eta = np.full(len(x), 2 * eps, np.float32)
  last_check, f_best_at_check, halved = 0, f, np.ones(len(x), bool)
  n_halved = 0
  for i in range(steps):
    a = 1.0 if i == 0 else momentum
    z = project(x_cur + col(eta) * np.sign(g))
    x_new = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev))
    f, logits, g = loss_logits_grad(x_new, i + 1)
    history.append(f)
    now = logits.argmax(-1) != y
    x_fooled, fooled = np.where(col(now), x_new, x_fooled), fooled | now
    better = f > f_best
    x_best, g_best = np.where(col(better), x_new, x_best), np.where(col(better), g, g_best)
    f_best = np.where(better, f, f_best)
    x_prev, x_cur = x_cur, x_new
    if i + 1 in attacks.checkpoint_steps(steps):
      window = i + 1 - last_check
      increases = sum(history[t + 1] > history[t] for t in range(last_check, i + 1))
      halve = (increases <= rho * window) | (~halved & (f_best_at_check >= f_best))
      eta = np.where(halve, eta / 2, eta)
      x_cur, g = np.where(col(halve), x_best, x_cur), np.where(col(halve), g_best, g)
      halved, f_best_at_check, last_check = halve, f_best, i + 1
      n_halved += int(halve.sum())
  return np.where(col(fooled), x_fooled, x_best), fooled, n_halved


def test_apgd_matches_a_plain_loop_reference_of_the_algorithm():
  x_ref, fooled_ref, n_halved = apgd_reference(mlp, KEY, X, Y, EPS, 10)
  assert n_halved > 0  # the step-size schedule is exercised
  result = apgd_mlp(KEY, X, Y)
  np.testing.assert_array_equal(result.success, fooled_ref)
  np.testing.assert_allclose(result.x_adv, x_ref, atol=1e-6)


def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_budget():
  pgd, apgd = pgd_mlp(KEY, X, Y), apgd_mlp(KEY, X, Y)
  assert bool(jnp.all(apgd.success >= pgd.success))  # holds here example by example
  assert int(apgd.success.sum()) > int(pgd.success.sum())
  np.testing.assert_array_equal(apgd.success, jnp.argmax(mlp(apgd.x_adv), -1) != Y)


def test_first_success_takes_each_examples_first_successful_attack():
  x = jnp.zeros((3, 1))
  results = [
    core.make_result(x, x + v, jnp.array(s))
    for v, s in [(1.0, [False, True, False]), (2.0, [True, True, False])]
  ]
  combined = core.first_success(results)
  np.testing.assert_array_equal(combined.x_adv[:, 0], [2.0, 1.0, 1.0])
  np.testing.assert_array_equal(combined.success, [True, True, False])
  np.testing.assert_array_equal(combined.l2, [2.0, 1.0, 1.0])


# ---------------------------------------------------------------- C&W


def test_cw_finds_close_to_the_minimal_l2_perturbation_of_a_linear_model():
  x = jnp.asarray(0.5 + 0.05 * RNG.normal(size=(8, 4, 4, 1)), jnp.float32)
  y = jnp.argmax(linear((LIN_W, LIN_B), x, None), -1)
  w = linear_direction(LIN_W, y).reshape(8, -1)
  margin = jnp.sum(x.reshape(8, -1) * w, 1) + LIN_B[y] - LIN_B[1 - y]
  # Closed form: the distance to the boundary, |w.x + b| / ||w||_2 (the box [0, 1] is
  # far away), and the L2 norm of the smallest L-inf attack that flips the label.
  distance = margin / jnp.linalg.norm(w, axis=1)
  linf_attack_l2 = margin / jnp.abs(w).sum(1) * jnp.sqrt(16.0)
  result = cw_linear((LIN_W, LIN_B), KEY, x, y)
  assert bool(result.success.all())
  np.testing.assert_array_equal(
    jnp.argmax(linear((LIN_W, LIN_B), result.x_adv, None), -1) != y, True
  )
  assert bool(jnp.all(result.l2 >= distance * (1 - 1e-4)))
  assert bool(jnp.all(result.l2 <= distance * 1.05))
  assert bool(jnp.all(result.l2 <= linf_attack_l2))
  assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0


def test_cw_reports_failure_with_the_clean_input():
  # A bias no input in [0, 1]^16 can overcome: nothing is found, x is returned.
  x = jnp.asarray(RNG.uniform(size=(4, 4, 4, 1)), jnp.float32)
  result = cw_linear((LIN_W * 0.01, jnp.array([100.0, 0.0])), KEY, x, jnp.zeros(4, int))
  assert not bool(result.success.any())
  np.testing.assert_array_equal(result.x_adv, x)
  np.testing.assert_array_equal(result.l2, 0.0)
