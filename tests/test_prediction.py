"""Prediction rules for randomized models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2p_jax.evaluation import prediction

KEY = jax.random.key(0)
RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.normal(size=(16, 3)), jnp.float32)


def model(x, key):
  """A deterministic linear 3-class model on 4x4x1 inputs."""
  del key
  return x.reshape(x.shape[0], -1) @ W


def noisy_model(x, key):
  """The same model with Gaussian noise on its input: a randomized classifier."""
  return model(x + 0.3 * jax.random.normal(key, (x.shape[0], 16)).reshape(x.shape), key)


X = jnp.asarray(RNG.uniform(size=(16, 4, 4, 1)), jnp.float32)
Y = jnp.argmax(model(X, None), -1)

# Two draws say class 0 with little confidence, one says class 1 with a lot:
# the vote is 0; the mean softmax is p0 = (2 * 0.525 + 0.00005) / 3 = 0.35 < 0.65, so 1.
DRAWS = jnp.array([[[0.1, 0.0]], [[0.1, 0.0]], [[0.0, 10.0]]])


def test_vote_and_mean_softmax_differ_on_a_constructed_case():
  assert int(prediction.combine_draws(DRAWS, 'vote')[0]) == 0
  assert int(prediction.combine_draws(DRAWS, 'mean_softmax')[0]) == 1
  assert int(prediction.combine_draws(DRAWS[::-1], 'single')[0]) == 1  # first draw only


def test_vote_breaks_ties_toward_the_lower_class():
  logits = jnp.array([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])  # one vote each for 1 and 2
  assert int(prediction.combine_draws(logits, 'vote')[0]) == 1


@pytest.mark.parametrize('rule', prediction.RULES)
def test_predict_combines_the_documented_noise_draws(rule):
  logits = jnp.stack([noisy_model(X, jax.random.fold_in(KEY, j)) for j in range(5)])
  expected = prediction.combine_draws(logits, rule)
  np.testing.assert_array_equal(
    prediction.predict(noisy_model, KEY, X, draws=5, rule=rule), expected
  )


def test_unknown_rule_is_an_error_naming_the_accepted_ones():
  with pytest.raises(ValueError, match=r"'majority'.*'single', 'vote', 'mean_softmax'"):
    prediction.predict(model, KEY, X, draws=3, rule='majority')
