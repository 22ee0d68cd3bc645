"""Attacks run over a split and judged: each batch attacked on a source model, and
every target's predictions on the result made under K judged noise draws (K =
config.judge.draws for a randomized model, 1 for a deterministic one), each draw by the
target's prediction rule (`attack_accuracy`). The adversarial examples are made once;
only the judgement is repeated, so K draws cost K forward passes, not K attacks; the
clean images' predictions (for `fooled`) are made once per target, batch and draw and
shared by every attack (`CleanVerdicts`).

Keys (so that any result can be recomputed bit for bit): an attack with all its
parameters (an `AttackSpec`) has the key fold_in(key(seed), spec.key_id), key_id being
a CRC-32 of the spec's text; batch b of the split runs the attack with
fold_in(fold_in(that key, b), 0). The judged draws do not depend on the attack: draw k
of batch b predicts with fold_in(judging_key(seed, b), k), judging_key(seed, b) =
fold_in(fold_in(key(seed), JUDGING_STREAM), b), whose prediction draw j (vote,
mean_softmax) uses fold_in(that, j); so every attack's verdicts under draw k, the clean
images' included, meet the same noise, and a per-draw worst case over attacks is a fair
union. Keys do not depend on the model, so every model meets the same random numbers and
a transfer cell whose source is its target equals that model's white-box result.
(Records written before the judged draws were shared, without `judging`, drew draw k of
batch b from the attack's key: fold_in(fold_in(fold_in(spec key, b), 1), k).)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from l2p_jax import attacks, data, experiment, methods
from l2p_jax.attacks import progress as attack_progress
from l2p_jax.evaluation import intervals, prediction, progress
from l2p_jax.evaluation.attack_registry import AttackSpec
from l2p_jax.evaluation.judged_model import JudgedModel, Logits

DEFAULT_DRAWS = 50  # Draws of vote and mean_softmax when config.predict.draws is None.
# Folded into key(seed) for the judged draws: above every key_id (a CRC-32 cut to 31 bits).
JUDGING_STREAM = 2**31
# A record's `judging`: its judged draws are the evaluation's own, shared by every attack.
SHARED_DRAWS = 'shared_draws'
KEY_LAYOUT = (
  'attack spec key = fold_in(key(seed), key_id); batch b: attack key = '
  'fold_in(fold_in(spec key, b), 0); judged draw k of batch b (every attack and the clean '
  'images alike): fold_in(fold_in(fold_in(key(seed), 2**31), b), k); its prediction draw j: '
  'fold_in(draw key, j)'
)


def chosen_rule(
  config: ml_collections.ConfigDict, authors: tuple[str, int]
) -> tuple[str, int, str]:
  """(rule, draws, origin) of a model's predictions: config.predict's rule, or with none
  set `authors`, the (rule, draws) the model's authors judge it by; origin says which
  ('config' or 'authors')."""
  rule, draws = config.predict.rule, config.predict.draws
  if rule is None:
    rule, authors_draws = authors
    return rule, 1 if rule == 'single' else draws or authors_draws, 'authors'
  return rule, 1 if rule == 'single' else draws or DEFAULT_DRAWS, 'config'


def prediction_rule(config: ml_collections.ConfigDict, method: str) -> tuple[str, int, str]:
  """chosen_rule of a `method` checkpoint, whose authors' rule is its registry record's
  authors_prediction."""
  return chosen_rule(config, methods.get(method).authors_prediction)


def as_inputs(images: jax.Array) -> jax.Array:
  """A batch as the models take it: a split's uint8 images in [0, 1] floats, float
  images (evaluate's) as they are."""
  return images if jnp.issubdtype(images.dtype, jnp.floating) else data.to_float(images)


@functools.partial(jax.jit, static_argnames=('logits', 'attack', 'params', 'noise', 'ticks'))
def _attack_batch(
  variables: Any,
  images: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  key: jax.Array,
  eps: jax.Array | None,
  *,
  logits: Logits,
  attack: Callable[..., attacks.AttackResult],
  params: tuple,
  noise: bool,
  ticks: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """The attack's inputs for one batch and, for an attack that keeps a curve, the real
  (unpadded) examples it had not fooled after each iteration (None for the others);
  compiled once per (model, attack, params). `ticks` compiles in the attack's progress
  callbacks (attacks/progress.py); without it the program has none."""
  kwargs = dict(params) if eps is None else {**dict(params), 'eps': eps}
  with attack_progress.reporting(ticks):
    result = attack(
      functools.partial(logits, variables, noise), key, as_inputs(images), labels, **kwargs
    )
  if result.curve is None:
    return result.x_adv, None
  return result.x_adv, jnp.sum(result.curve & mask.astype(bool), axis=1, dtype=jnp.int32)


def judging_key(seed: int, batch: int) -> jax.Array:
  """The key whose fold_in(., k) is judged draw k of batch `batch`, whatever the attack."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), JUDGING_STREAM), batch)


def judged_right(
  logits_fn: attacks.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  labels: jax.Array,
  *,
  judged_draws: int,
  rule: str,
  draws: int,
  first_draw: int = 0,
) -> jax.Array:
  """(N, judged_draws) bool, x classified right under each judged draw: draw k (of
  first_draw, first_draw + 1, ...) predicts with the key fold_in(key, k) by `rule` over
  `draws` prediction draws. One draw at a time, so judging draw k alone gives the same
  bits."""

  def one_draw(k):
    key_k = jax.random.fold_in(key, k)
    return prediction.predict(logits_fn, key_k, x, draws=draws, rule=rule) == labels

  return jax.lax.map(one_draw, first_draw + jnp.arange(judged_draws)).T


@functools.partial(jax.jit, static_argnames=('logits', 'noise', 'judged_draws', 'draws', 'rule'))
def _right_bits(
  variables: Any,
  x: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  logits: Logits,
  noise: bool,
  judged_draws: int,
  draws: int,
  rule: str,
) -> jax.Array:
  """judged_right of one batch of float inputs (a split's images as an attack receives
  them, or an attack's output): one program for both, so that the clean attack's
  verdicts are the clean images'."""
  logits_fn = functools.partial(logits, variables, noise)
  return judged_right(logits_fn, key, x, labels, judged_draws=judged_draws, rule=rule, draws=draws)


# A batch's images as an attack receives them (the clean attack's output), made apart.
_inputs = jax.jit(as_inputs)


@jax.jit
def _tally(
  images: jax.Array, x_adv: jax.Array, mask: jax.Array, right: jax.Array, clean: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One batch's verdicts from its (N, K) right bits on the attack's inputs and on the
  clean images under the same draws: per example the draws right and the draws fooled
  (right on the clean image, wrong on the attack's), the L2 size of its perturbation,
  and per draw the real examples right."""
  return (
    right.sum(axis=1, dtype=jnp.int32),
    (clean & ~right).sum(axis=1, dtype=jnp.int32),
    attacks.core.l2_norm(x_adv - as_inputs(images)),
    (right & mask.astype(bool)[:, None]).sum(axis=0, dtype=jnp.int32),
  )


class CleanVerdicts:
  """The clean images' judged verdicts ((N, K) right bits) of every target and batch an
  evaluation run meets, made once and shared by all its attacks and transfer rows. A
  batch is the same one only for the same target, judgement, seed, batch size, batch
  index and images: a split's first 64 images share a 512-image split's first batches
  only where those batches hold the same images (padding included)."""

  def __init__(self):
    self._right: dict[tuple, jax.Array] = {}
    self.made = 0  # Batches whose clean verdicts were made, not found.

  def right(
    self,
    target: JudgedModel,
    split: data.HostSplit,
    b: int,
    batch: dict[str, jax.Array],
    settings: tuple[int, str, int],
    config: ml_collections.ConfigDict,
  ) -> jax.Array:
    """Batch b of the split: the clean images' right bits for `target` judged with
    `settings` (judged draws, rule, draws), made on first use."""
    size = config.batch_size
    rows = slice(b * size, (b + 1) * size)
    images = np.asarray(split.images[rows])
    content = hashlib.sha1(images.tobytes() + np.asarray(split.labels[rows]).tobytes())
    key = (target, config.seed, config.noise, size, b, len(images), content.hexdigest())
    key += tuple(settings)
    if key not in self._right:
      self._right[key] = _target_right(target, _inputs(batch['image']), batch, b, settings, config)
      self.made += 1
    return self._right[key]


@dataclasses.dataclass
class Judgement:
  """One target's verdicts on an attack's inputs over n examples and K judged draws:
  per example the draws right and fooled and the perturbation's L2 size, per draw the
  examples right, the seconds spent judging, when the target is the model the attack
  ran on and the attack keeps one, its curve: the examples it had not fooled (its own
  verdict) at its start and after each iteration, and the (n, K) bits of each example
  right under each draw (for the per-draw worst case; None where not kept)."""

  right: np.ndarray
  fooled: np.ndarray
  l2: np.ndarray
  draw_right: np.ndarray
  seconds: float = 0.0
  curve: np.ndarray | None = None
  bits: np.ndarray | None = None

  @property
  def judged_draws(self) -> int:
    return len(self.draw_right)

  def counts(self) -> dict[str, Any]:
    """The record's outcome fields (see records.Record)."""
    n, k = len(self.right), self.judged_draws
    correct, fooled = int(self.right.sum()), int(self.fooled.sum())
    low, high = intervals.accuracy_interval(self.right / k, k, self.draw_right / n)
    curve = {} if self.curve is None else {'curve': [int(c) / n for c in self.curve]}
    return {
      'accuracy': correct / (n * k),
      'correct': correct,
      'n': n,
      'fooled': fooled,
      'mean_l2': float(np.dot(self.fooled, self.l2) / fooled) if fooled else None,
      'judged_draws': k,
      'accuracy_ci95': [low, high],
      'accuracy_all_draws': float(np.mean(self.right == k)),
      'judge_seconds': self.seconds,
      **curve,
    }


def judged_draws(config: ml_collections.ConfigDict, model: JudgedModel) -> int:
  """How many draws judge `model`: config.judge.draws for a randomized model with its
  noise on, 1 for a deterministic one (every draw is the same)."""
  return config.judge.draws if config.noise and model.randomized else 1


def attack_accuracy(
  spec: AttackSpec,
  source: JudgedModel,
  targets: Sequence[JudgedModel],
  split: data.HostSplit,
  *,
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  clean: CleanVerdicts,
  desc: str = '',
) -> list[Judgement]:
  """Runs `spec` on `source` over the split, batch by batch, and judges every target on
  the resulting inputs under its judged draws (white-box: targets == [source]), each
  draw predicting by config.predict's rule. Returns one Judgement per target; the
  target that is the source (white-box, or a transfer cell of a model to itself) holds
  the attack's curve, summed over the batches without their padded rows, when the attack
  keeps one. The clean images' verdicts come from `clean` (made there on first use, so
  an evaluation that passes one CleanVerdicts to every call makes them once).
  """
  split = experiment.first_examples(
    split, min(spec.examples, split.num_examples), f'{spec.attack} examples'
  )
  key = jax.random.fold_in(jax.random.key(config.seed), spec.key_id)
  eps = None if spec.eps is None else jnp.float32(spec.eps)
  settings = [
    (judged_draws(config, t), *chosen_rule(config, t.authors_prediction)[:2]) for t in targets
  ]
  outputs = [[] for _ in targets]
  seconds = [0.0] * len(targets)
  curve = None
  batches = data.device_batches(mesh, data.eval_batches(split, config.batch_size))
  bar = progress.AttackBar(spec, split.num_examples, config, desc or spec.name)
  for b, batch in bar.over(batches):
    x_adv, unfooled = _attack_batch(
      source.variables,
      batch['image'],
      batch['label'],
      batch['mask'],
      jax.random.fold_in(jax.random.fold_in(key, b), 0),
      eps,
      logits=source.logits,
      attack=spec.function,
      params=spec.arguments,
      noise=config.noise and spec.attack_noise,
      ticks=bool(config.progress_bar),
    )
    _wait(x_adv)
    if unfooled is not None:
      unfooled = multihost_utils.process_allgather(unfooled, tiled=True)
      curve = unfooled if curve is None else curve + unfooled
    for t, (target, setting) in enumerate(zip(targets, settings)):
      started = time.time()
      verdicts = _batch_verdicts(target, setting, x_adv, b, batch, split, config, clean)
      outputs[t].append([multihost_utils.process_allgather(v, tiled=True) for v in verdicts])
      seconds[t] += time.time() - started
  return [
    _judgement(parts, split.num_examples, s, curve if target is source else None)
    for parts, s, target in zip(outputs, seconds, targets)
  ]


def _target_right(
  target: JudgedModel,
  inputs: jax.Array,
  batch: dict[str, jax.Array],
  b: int,
  setting: tuple[int, str, int],
  config: ml_collections.ConfigDict,
) -> jax.Array:
  """`target`'s right bits on `inputs` (batch b's images or their attacked versions)
  under its (judged draws, rule, prediction draws), draw k keyed by judging_key alone."""
  k, rule, draws = setting
  return _right_bits(
    target.variables,
    inputs,
    batch['label'],
    judging_key(config.seed, b),
    logits=target.logits,
    noise=config.noise,
    judged_draws=k,
    draws=draws,
    rule=rule,
  )


def _batch_verdicts(
  target: JudgedModel,
  setting: tuple[int, str, int],
  x_adv: jax.Array,
  b: int,
  batch: dict[str, jax.Array],
  split: data.HostSplit,
  config: ml_collections.ConfigDict,
  clean: CleanVerdicts,
) -> tuple[jax.Array, ...]:
  """`target`'s verdicts on batch b's attacked inputs under its (judged draws, rule,
  prediction draws): _tally's counts against the shared clean verdicts, and the
  per-(draw, image) right bits."""
  right = _target_right(target, x_adv, batch, b, setting, config)
  clean_right = clean.right(target, split, b, batch, setting, config)
  return (*_tally(batch['image'], x_adv, batch['mask'], right, clean_right), right)


def _wait(x: jax.Array) -> None:
  """Waits for `x` in short sleeps, not in one blocking call, so that Ctrl-C or SIGTERM
  is handled within a moment, not when the attack's batch ends."""
  while not x.is_ready():
    time.sleep(0.05)


def _judgement(
  parts: list[list[np.ndarray]], n: int, seconds: float, curve: np.ndarray | None
) -> Judgement:
  """A target's Judgement from its batches' (right, fooled, l2, draw_right, bits), the
  padded rows at the end of the last batch cut off, with the attack's curve summed over
  the batches (or None)."""
  right, fooled, l2, draw_right, bits = zip(*parts)
  return Judgement(
    right=np.concatenate(right)[:n],
    fooled=np.concatenate(fooled)[:n],
    l2=np.concatenate(l2)[:n],
    draw_right=np.sum(draw_right, axis=0),
    seconds=seconds,
    curve=curve,
    bits=np.concatenate(bits)[:n],
  )
