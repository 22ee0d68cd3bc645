"""Attacks run over a split and judged: each batch attacked on a source checkpoint, every
target's predictions on the result made by its prediction rule, and the counts summed
(`attack_accuracy`).

Keys (so that any result can be recomputed bit for bit): an attack with all its
parameters (an `AttackSpec`) has the key fold_in(key(seed), spec.key_id), key_id being
a CRC-32 of the spec's text; batch b of the split uses batch_key = fold_in(that key, b);
the attack runs with fold_in(batch_key, 0) and the prediction of its output with
fold_in(batch_key, 1). Keys do not depend on the checkpoint, so every model meets the
same random numbers and a transfer cell whose source is its target equals that model's
white-box result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from l2p_jax import attacks, data, experiment, methods, models
from l2p_jax.evaluation import prediction
from l2p_jax.evaluation.attack_registry import AttackSpec
from l2p_jax.training.checkpointing import Checkpoint

DEFAULT_DRAWS = 50  # Draws of vote and mean_softmax when config.predict.draws is None.
KEY_LAYOUT = (
  'attack spec key = fold_in(key(seed), key_id); batch b: batch_key = '
  'fold_in(spec key, b); attack key = fold_in(batch_key, 0); prediction key '
  '= fold_in(batch_key, 1)'
)


def prediction_rule(config: ml_collections.ConfigDict, method: str) -> tuple[str, int, str]:
  """(rule, draws, origin) of a `method` checkpoint's predictions: config.predict's
  rule, or with none set the rule the method's authors judge it by (its registry
  record's authors_prediction); origin says which ('config' or 'authors')."""
  rule, draws = config.predict.rule, config.predict.draws
  if rule is None:
    rule, authors_draws = methods.get(method).authors_prediction
    return rule, 1 if rule == 'single' else draws or authors_draws, 'authors'
  return rule, 1 if rule == 'single' else draws or DEFAULT_DRAWS, 'config'


@functools.partial(jax.jit, static_argnames=('model', 'attack', 'params', 'noise'))
def _attack_batch(
  variables: dict[str, Any],
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  eps: jax.Array | None,
  *,
  model: models.ResNet,
  attack: Callable[..., attacks.AttackResult],
  params: tuple,
  noise: bool,
) -> jax.Array:
  """The attack's inputs for one uint8 batch; compiled once per (model, attack, params)."""
  kwargs = dict(params) if eps is None else {**dict(params), 'eps': eps}
  return attack(
    models.inference_logits(model, variables, noise), key, data.to_float(images), labels, **kwargs
  ).x_adv


@functools.partial(jax.jit, static_argnames=('model', 'noise', 'draws', 'rule'))
def _judge_batch(
  variables: dict[str, Any],
  images: jax.Array,
  x_adv: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  key: jax.Array,
  *,
  model: models.ResNet,
  noise: bool,
  draws: int,
  rule: str,
) -> jax.Array:
  """(correct, fooled, L2 sum of fooled) over the batch's real examples: predictions
  on x_adv made by `rule` over `draws` noise draws; fooled examples are those predicted
  right on the clean images (same key) and wrong on x_adv."""
  predict = functools.partial(
    prediction.predict,
    models.inference_logits(model, variables, noise),
    key,
    draws=draws,
    rule=rule,
  )
  x = data.to_float(images)
  mask = mask.astype(bool)
  correct = mask & (predict(x_adv) == labels)
  fooled = mask & (predict(x) == labels) & ~correct
  l2 = attacks.core.l2_norm(x_adv - x)
  return jnp.stack([jnp.sum(correct), jnp.sum(fooled), jnp.sum(jnp.where(fooled, l2, 0.0))]).astype(
    jnp.float32
  )


def attack_accuracy(
  spec: AttackSpec,
  source: Checkpoint,
  targets: Sequence[Checkpoint],
  split: data.HostSplit,
  *,
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  desc: str = '',
) -> list[dict[str, Any]]:
  """Runs `spec` on `source` over the split, batch by batch, and judges every target on
  the resulting inputs with config.predict's rule (white-box: targets == [source]).

  Returns per target: accuracy, correct, n, fooled (right on the clean input, wrong on
  the attack's) and mean_l2 (mean L2 of the fooled perturbations, None if none).
  """
  split = experiment.first_examples(
    split, min(spec.examples, split.num_examples), 'few_pixel.examples'
  )
  key = jax.random.fold_in(jax.random.key(config.seed), spec.key_id)
  eps = None if spec.eps is None else jnp.float32(spec.eps)
  totals = np.zeros((len(targets), 3))
  rules = [prediction_rule(config, t.meta['config']['method'])[:2] for t in targets]
  batches = data.device_batches(mesh, data.eval_batches(split, config.batch_size))
  bar = _progress_bar(batches, split, config, desc or spec.name)
  for b, batch in enumerate(bar):
    batch_key = jax.random.fold_in(key, b)
    x_adv = _attack_batch(
      source.variables,
      batch['image'],
      batch['label'],
      jax.random.fold_in(batch_key, 0),
      eps,
      model=source.model,
      attack=spec.function,
      params=spec.params,
      noise=config.noise,
    )
    for t, (target, (rule, draws)) in enumerate(zip(targets, rules)):
      totals[t] += np.asarray(
        _judge_batch(
          target.variables,
          batch['image'],
          x_adv,
          batch['label'],
          batch['mask'],
          jax.random.fold_in(batch_key, 1),
          model=target.model,
          noise=config.noise,
          draws=draws,
          rule=rule,
        )
      )
  return [_counts(correct, fooled, l2, split.num_examples) for correct, fooled, l2 in totals]


def _progress_bar(
  batches: Iterable[Any], split: data.HostSplit, config: ml_collections.ConfigDict, desc: str
) -> tqdm:
  """A progress bar over the split's evaluation batches, shown on the first process only
  and only when config.progress_bar asks for it."""
  return tqdm(
    batches,
    total=data.num_eval_batches(split.num_examples, config.batch_size),
    desc=desc,
    unit='batch',
    dynamic_ncols=True,
    disable=not config.progress_bar or jax.process_index() != 0,
  )


def _counts(correct: float, fooled: float, l2: float, n: int) -> dict[str, Any]:
  """One target's outcome over n examples from its summed (correct, fooled, L2 of the
  fooled) totals: accuracy, the counts, and the mean L2 of the fooled (None if none)."""
  return {
    'accuracy': correct / n,
    'correct': int(correct),
    'n': n,
    'fooled': int(fooled),
    'mean_l2': float(l2 / fooled) if fooled else None,
  }
