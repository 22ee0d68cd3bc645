"""One record per result (checkpoint, attack with its parameters, source of the examples)
with everything that reproduces it, and its line on the console; results_report writes
the records out."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from l2p_jax import data
from l2p_jax.evaluation.attack_registry import AttackSpec
from l2p_jax.evaluation.judging import prediction_rule
from l2p_jax.training.checkpointing import Checkpoint


def make_record(
  config: ml_collections.ConfigDict,
  spec: AttackSpec,
  target: Checkpoint,
  label: str,
  split: data.HostSplit,
  counts: dict[str, Any],
  seconds: float,
  source: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """One result: what was attacked how, with which key and prediction rule, and the
  outcome (see results_report.RECORD_FIELDS)."""
  rule, draws, origin = prediction_rule(config, target.meta['config']['method'])
  return {
    'label': label,
    **target.describe(),
    'dataset': split.name,
    'split': split.split,
    'attack': spec.attack,
    'name': spec.name,
    'params': spec.describe(),
    'source': source,
    **counts,
    'seconds': seconds,
    'rule': rule,
    'draws': draws,
    'rule_from': origin,
    'noise': config.noise,
    'randomized': config.noise and target.randomized,
    'key': {'seed': config.seed, 'fold_in': [spec.key_id]},
    'batch_size': config.batch_size,
  }


def log_record(result: dict[str, Any]) -> None:
  """One console line per result (first process only)."""
  if jax.process_index() == 0:
    origin = f' from {result["source"]["label"]}' if result['source'] else ''
    tqdm.write(
      f'{result["label"]}{origin} {result["name"]}: accuracy '
      f'{100 * result["accuracy"]:.2f}% of {result["n"]} ({result["seconds"]:.1f}s)'
    )
