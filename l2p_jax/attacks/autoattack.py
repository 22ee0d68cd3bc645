"""AutoAttack (Croce & Hein, ICML 2020): APGD-T, APGD on the targeted DLR loss towards
each of the highest-scored other classes in turn, and the suites: the standard cascade
(APGD-CE, APGD-T, Square) for deterministic models, the 'rand' version (APGD-CE and
APGD-DLR with EOT) for randomized ones. FAB-T, the standard version's third attack, is
not built: the cascade runs without it.

A fixed batch shape keeps every attack jittable, so where AutoAttack runs a stage only on
the images the earlier ones left robust, ours runs it on the batch (skipped when nothing
is left, Square starting only on what is left) and keeps per image the first success:
the same verdicts. A suite's curve is its stages' one after the other (a skipped stage's
iterations all fooled), so its x axis counts the iterations of the whole attack.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from l2p_jax.attacks import core, progress
from l2p_jax.attacks.apgd import apgd, apgd_on_loss, autoattack_rand
from l2p_jax.attacks.square import square


def _unless_all_fooled(
  best: core.AttackResult,
  attack: Callable[[core.AttackResult], core.AttackResult],
  at: int | jax.Array,
) -> core.AttackResult:
  """`best` with attack(best)'s successes added (first success per image) and its curve
  after its start written into best's from row `at` (core.later_rows), the attack
  skipped when every image is fooled already (its rows then stay: all fooled)."""

  def run(b):
    new = attack(b)
    rows = core.later_rows(new.curve, b.success)
    curve = jax.lax.dynamic_update_slice_in_dim(b.curve, rows, at, axis=0)
    return core.first_success([b, new])._replace(curve=curve)

  return jax.lax.cond(jnp.all(best.success), lambda b: b, run, best)


def _lengthened(result: core.AttackResult, rows: int) -> core.AttackResult:
  """`result` with `rows` rows of all fooled after its curve, for later stages to fill."""
  padding = jnp.zeros((rows, *result.curve.shape[1:]), bool)
  return result._replace(curve=jnp.concatenate([result.curve, padding]))


def _then(
  best: core.AttackResult, attack: Callable[[core.AttackResult], core.AttackResult]
) -> core.AttackResult:
  """`best` followed by attack(best) (`_unless_all_fooled`), its curve lengthened by the
  attack's iterations: the cascade's curve counts the iterations of all its stages."""
  rows = jax.eval_shape(attack, best).curve.shape[0] - 1
  return _unless_all_fooled(_lengthened(best, rows), attack, best.curve.shape[0])


def apgd_targeted(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  eps: float,
  steps: int = 100,
  target_classes: int = 9,
  eot_draws: int = 1,
  unroll: int | bool = 1,
) -> core.AttackResult:
  """APGD-T as AutoAttack runs it: for k = 1..target_classes (at most the other classes),
  APGD (one restart) on the targeted DLR loss towards the k-th highest other class of
  the clean input's logits (mean over `eot_draws` draws), each run only while an image
  is left unfooled; per image the first run that fooled the model (else the first run's
  highest-loss point).

  The clean logits use the noise key fold_in(key, 0), target k's run fold_in(key, k).
  """
  clean = core.mean_over_draws(lambda k: logits_fn(x, k), jax.random.fold_in(key, 0), eot_draws)
  targets = min(target_classes, clean.shape[-1] - 1)
  is_true = jax.nn.one_hot(y, clean.shape[-1], dtype=bool)
  ranked = jnp.argsort(-jnp.where(is_true, -jnp.inf, clean), axis=-1)

  def towards(k, _=None):
    target = jax.lax.dynamic_index_in_dim(ranked, k - 1, axis=1, keepdims=False)
    return apgd_on_loss(
      logits_fn,
      functools.partial(core.dlr_targeted, targets=target),
      jax.random.fold_in(key, k),
      x,
      y,
      eps=eps,
      steps=steps,
      eot_draws=eot_draws,
      restarts=1,
      rho=0.75,
      momentum=0.75,
      unroll=unroll,
    )

  counted = lambda k, _=None: progress.within(k - 1, targets, towards)(k)  # Target k of targets.
  add_target = lambda k, best: _unless_all_fooled(
    best, functools.partial(counted, k), 1 + (k - 1) * steps
  )
  first = _lengthened(counted(1), (targets - 1) * steps)
  return jax.lax.fori_loop(2, targets + 1, add_target, first)


def autoattack(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  eps: float,
  version: str = 'standard',
  steps: int = 100,
  target_classes: int = 9,
  queries: int = 5000,
  eot_draws: int = 20,
  unroll: int | bool = 1,
) -> core.AttackResult:
  """AutoAttack's `version`: 'standard' (deterministic models) APGD-CE, APGD-T over
  `target_classes` targets and Square of `queries` queries, each on what the earlier
  left robust (FAB-T not built); 'rand' (randomized models) APGD-CE and APGD-DLR with
  `eot_draws` EOT draws (`autoattack_rand`). Per image the first success.

  Standard: APGD-CE uses fold_in(key, 0), APGD-T fold_in(key, 1), Square fold_in(key, 2).
  """
  if version == 'rand':
    return autoattack_rand(
      logits_fn, key, x, y, eps=eps, steps=steps, eot_draws=eot_draws, unroll=unroll
    )
  if version != 'standard':
    raise ValueError(f"Unknown AutoAttack version {version!r}; expected 'standard' or 'rand'.")
  stage = lambda k: jax.random.fold_in(key, k)
  # The bar's share of each stage: its iterations (APGD-T's at most target_classes runs).
  total = (1 + target_classes) * steps + queries
  apgd_ce = progress.within(0, total, apgd, steps)
  best = apgd_ce(logits_fn, stage(0), x, y, eps=eps, steps=steps, loss='ce', unroll=unroll)
  apgd_t = progress.within(steps, total, apgd_targeted, target_classes * steps)
  best = _then(
    best,
    lambda b: apgd_t(
      logits_fn, stage(1), x, y, eps=eps, steps=steps, target_classes=target_classes, unroll=unroll
    ),
  )
  square_part = progress.within((1 + target_classes) * steps, total, square, queries)
  return _then(
    best, lambda b: square_part(logits_fn, stage(2), x, y, eps=eps, queries=queries, done=b.success)
  )
