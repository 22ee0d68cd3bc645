"""Few-pixel differential evolution: finds a planted one-pixel weakness, and only that."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2p_jax import attacks

# The package exports the function `few_pixel`, which hides the module of that name.
few_pixel_module = importlib.import_module('l2p_jax.attacks.few_pixel')

KEY = jax.random.key(0)
X = jnp.asarray(0.6 * np.random.default_rng(0).uniform(size=(4, 4, 4, 1)), jnp.float32)
Y = jnp.zeros(4, jnp.int32)
WEAK_ROW, WEAK_COL, WEAK_VALUE = 2, 1, 0.9


def planted(strength, x, key):
  """Class 0, unless pixel (2, 1) is set to within about 0.06 of 0.9 and strength is 1.

  With strength 0 nothing any pixel does changes the prediction.
  """
  del key
  bump = jnp.exp(-jnp.square((x[:, WEAK_ROW, WEAK_COL, 0] - WEAK_VALUE) / 0.05))
  other = 0.01 * x.mean(axis=(1, 2, 3))
  return jnp.stack([jnp.ones_like(bump), 4.0 * strength * bump + other], axis=-1)


@functools.partial(jax.jit, static_argnames='n_pixels')
def attack(strength, key, x, y, iterations, *, n_pixels):
  # 40 is not a multiple of the chunk size: the last chunk is a partial one.
  return attacks.few_pixel(
    functools.partial(planted, strength),
    key,
    x,
    y,
    n_pixels=n_pixels,
    population=40,
    iterations=iterations,
    chunk_size=16,
  )


def changed_pixels(x_adv, x):
  return jnp.sum(jnp.any(x_adv != x, axis=-1), axis=(1, 2))


def test_finds_a_planted_one_pixel_weakness():
  assert not bool(jnp.any(jnp.argmax(planted(1.0, X, None), -1) != Y))
  result = attack(1.0, KEY, X, Y, 30, n_pixels=1)
  assert bool(result.success.all())
  np.testing.assert_array_equal(jnp.argmax(planted(1.0, result.x_adv, None), -1), 1)
  np.testing.assert_array_equal(changed_pixels(result.x_adv, X), 1)
  weak = result.x_adv[:, WEAK_ROW, WEAK_COL, 0]
  assert bool(jnp.all(jnp.abs(weak - WEAK_VALUE) < 0.06))


def test_results_freeze_once_an_example_succeeds():
  early, late = attack(1.0, KEY, X, Y, 2, n_pixels=1), attack(1.0, KEY, X, Y, 30, n_pixels=1)
  assert 0 < int(early.success.sum()) < 4
  done = early.success
  np.testing.assert_array_equal(early.x_adv[done], late.x_adv[done])


@pytest.mark.parametrize('n_pixels', [1, 3])
def test_does_not_succeed_without_a_weakness(n_pixels):
  result = attack(0.0, KEY, X, Y, 10, n_pixels=n_pixels)
  assert not bool(result.success.any())
  assert bool(jnp.all(changed_pixels(result.x_adv, X) <= n_pixels))
  assert bool(jnp.all(changed_pixels(result.x_adv, X) >= 1))
  assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0


def test_same_key_same_result():
  first, again = attack(1.0, KEY, X, Y, 2, n_pixels=1), attack(1.0, KEY, X, Y, 2, n_pixels=1)
  other = attack(1.0, jax.random.key(1), X, Y, 2, n_pixels=1)
  np.testing.assert_array_equal(first.x_adv, again.x_adv)
  assert not bool(jnp.all(first.x_adv == other.x_adv))


def test_mutation_indices_are_distinct_and_differ_from_the_parent():
  population, dims = 6, 3
  r1, r2, r3, forced = few_pixel_module._mutation_draws(KEY, 2000, population, dims)
  parent = jnp.arange(population)
  for a, b in [(r1, parent), (r2, parent), (r3, parent), (r1, r2), (r1, r3), (r2, r3)]:
    assert not bool(jnp.any(a == b))
  # Every other member is drawn about equally often: 12000 draws, 2400 per offset.
  for r in (r1, r3):
    counts = np.bincount(np.asarray((r - parent) % population).ravel(), minlength=population)
    assert counts[0] == 0 and counts[1:].min() > 2200 and counts[1:].max() < 2600
  np.testing.assert_array_equal(np.unique(forced), np.arange(dims))


def test_population_too_small_is_an_error():
  with pytest.raises(ValueError, match='at least 4'):
    attacks.few_pixel(functools.partial(planted, 1.0), KEY, X, Y, population=3)
