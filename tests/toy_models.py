"""Toy classifiers on 32 random 4x4x1 inputs for the judging and sanity-check tests: a
linear 3-class model, the same with input noise (randomized), and behind a gradient
mask."""

import jax
import jax.numpy as jnp
import numpy as np

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
