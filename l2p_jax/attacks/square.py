"""L-inf Square Attack (Andriushchenko et al., ECCV 2020), AutoAttack's gradient-free
attack: random square patches of +-2 eps per channel, kept when they lower the margin.

As the authors' `square.py`: the start is vertical stripes of +-eps, every query adds
one square of side round(sqrt(p * h * w)) at a random place, p halving from p_init
along their schedule (rescaled to the number of queries), and the margin
z_y - max_{j!=y} z_j is the loss. Choices of ours: each image draws its own square's
place (the reference draws one per batch); for a randomized model the margin is the
mean over `eot_draws` noise draws, and an image keeps being attacked after its mean
margin turned negative (one draw is not every draw), where a deterministic model's
image stops at its first fooling query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from l2p_jax.attacks import core, progress

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64))
_SCHEDULE += ((6000, 128), (8000, 256))


def square_sides(queries: int, p_init: float, height: int, width: int) -> np.ndarray:
  """The side of query i's square, i < queries: round(sqrt(p h w)) with p = p_init divided
  by 1, 2, 4, ... 512 as i * 10000 / queries passes 10, 50, 200, ... 8000 (AutoAttack's
  schedule), at least 1 and at most the image's smaller side."""
  sides = []
  for i in range(queries):
    it = int(i / queries * 10000)
    divisor = next((d for bound, d in _SCHEDULE if it <= bound), 512)
    side = max(int(round(np.sqrt(p_init / divisor * height * width))), 1)
    sides.append(min(side, height, width))
  return np.asarray(sides, np.int32)


def _margin(logits_fn: core.LogitsFn, key: jax.Array, x: jax.Array, y: jax.Array, draws: int):
  """z_y - max_{j!=y} z_j, the mean over `draws` noise draws fold_in(key, j)."""
  return core.mean_over_draws(lambda k: -core.cw_margin(logits_fn(x, k), y), key, draws)


def _patch(key: jax.Array, x_best: jax.Array, side: jax.Array, eps: float) -> jax.Array:
  """x_best with one square of `side` per image, at a uniform place, set to +-2 eps per
  channel (before projection)."""
  n, height, width, channels = x_best.shape
  place_key, sign_key = jax.random.split(key)
  corner = jax.random.randint(place_key, (2, n), 0, jnp.array([[height], [width]]) - side + 1)
  rows = jnp.arange(height)[None, :] - corner[0][:, None]
  cols = jnp.arange(width)[None, :] - corner[1][:, None]
  inside = ((rows >= 0) & (rows < side))[:, :, None] & ((cols >= 0) & (cols < side))[:, None, :]
  signs = jax.random.rademacher(sign_key, (n, 1, 1, channels), x_best.dtype)
  return x_best + inside[..., None] * 2 * eps * signs


def square(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  eps: float,
  queries: int = 5000,
  p_init: float = 0.8,
  eot_draws: int = 1,
  done: jax.Array | None = None,
) -> core.AttackResult:
  """Square Attack, one restart: `queries` random squares after the striped start, each
  kept where it lowers the image's margin (mean over `eot_draws` draws); returns the
  best point per image, whether its margin is negative and the curve of images not
  fooled after each query (the last value after an early stop). `done` (N,) bool marks
  images not to attack (AutoAttack's cascade: fooled by an earlier attack).

  (start_key, queries_key) = split(key); query i (i = 0 the start) draws its square
  from fold_in(queries_key, i) and the model's noise from fold_in(fold_in(key, 1), i)
  (hence fold_in(that, j) for draw j). The loop stops early once every attacked image
  of a deterministic model (one draw) is fooled.
  """
  start_key, queries_key = jax.random.split(key)
  noise_key = jax.random.fold_in(key, 1)
  sides = jnp.asarray(square_sides(queries, p_init, x.shape[1], x.shape[2]))
  stripes = jax.random.rademacher(start_key, (x.shape[0], 1, x.shape[2], x.shape[3]), x.dtype)
  x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
  margin = _margin(logits_fn, jax.random.fold_in(noise_key, 0), x_best, y, eot_draws)
  done = jnp.zeros(y.shape, bool) if done is None else done
  stop_fooled = eot_draws == 1

  def attacking(margin):
    return ~done & ((margin > 0) if stop_fooled else True)

  def query(state):
    i, x_best, margin, curve = state
    x_new = core.linf_project(
      _patch(jax.random.fold_in(queries_key, i + 1), x_best, sides[i], eps), x, eps
    )
    margin_new = _margin(logits_fn, jax.random.fold_in(noise_key, i + 1), x_new, y, eot_draws)
    keep = attacking(margin) & (margin_new < margin)
    progress.tick(i + 1, queries)
    margin = jnp.where(keep, margin_new, margin)
    return (
      i + 1,
      jnp.where(core.per_example(keep, x), x_new, x_best),
      margin,
      curve.at[i + 1].set(core.unfooled(margin < 0)),
    )

  def going(state):
    i, _, margin, _ = state
    return (i < queries) & jnp.any(attacking(margin))

  curve = jnp.zeros((queries + 1, *y.shape), bool).at[0].set(core.unfooled(margin < 0))
  done_at, x_best, margin, curve = jax.lax.while_loop(going, query, (0, x_best, margin, curve))
  curve = jnp.where(jnp.arange(queries + 1)[:, None] > done_at, curve[done_at], curve)
  return core.make_result(x, x_best, margin < 0, curve)
