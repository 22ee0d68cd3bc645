"""One record per result (checkpoint, attack with its parameters, source of the examples)
with everything that reproduces it, its identity (what a rerun replaces) and its line on
the console; results_report writes the records out, verdicts the per-image verdicts."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from l2p_jax import data
from l2p_jax.checkpointing import Checkpoint
from l2p_jax.evaluation.attack_registry import AttackSpec
from l2p_jax.evaluation.judging import Judgement, prediction_rule


def make_record(
  config: ml_collections.ConfigDict,
  spec: AttackSpec,
  target: Checkpoint,
  label: str,
  split: data.HostSplit,
  judgement: Judgement,
  seconds: float,
  source: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """One result: what was attacked how, with which key and prediction rule, and the
  outcome (see results_report.RECORD_FIELDS)."""
  rule, draws, origin = prediction_rule(config, target.meta['config']['method'])
  record = {
    'label': label,
    **target.describe(),
    'dataset': split.name,
    'split': split.split,
    'attack': spec.attack,
    'name': spec.name,
    'params': spec.describe(),
    'source': source,
    **judgement.counts(),
    'seconds': seconds,
    'rule': rule,
    'draws': draws,
    'rule_from': origin,
    'noise': config.noise,
    'randomized': config.noise and target.randomized,
    'key': {'seed': config.seed, 'fold_in': [spec.key_id]},
    'batch_size': config.batch_size,
  }
  return {**record, 'verdicts': verdicts_id(record)}


def identity(record: dict[str, Any]) -> tuple:
  """What a record measured: the checkpoint, the attack with its parameters, the data
  and the prediction rule; a newer record of the same identity replaces an older one."""
  source = record['source'] and record['source']['checkpoint']
  return (
    record['checkpoint'],
    source,
    record['name'],
    record['dataset'],
    record['split'],
    record['rule'],
    record['draws'],
    record['noise'],
  )


def verdicts_id(record: dict[str, Any]) -> str:
  """The name of a record's per-image verdicts in verdicts.npz: a hash of its identity,
  so that the record that replaces it replaces its verdicts."""
  return hashlib.sha1(json.dumps(identity(record)).encode()).hexdigest()[:16]


def log_record(result: dict[str, Any]) -> None:
  """One console line per result (first process only)."""
  if jax.process_index() == 0:
    origin = f' from {result["source"]["label"]}' if result['source'] else ''
    low, high = result['accuracy_ci95']
    draws = result['judged_draws']
    tqdm.write(
      f'{result["label"]}{origin} {result["name"]}: accuracy '
      f'{100 * result["accuracy"]:.2f}% [{100 * low:.1f}, {100 * high:.1f}] of {result["n"]}'
      + (
        f' x {draws} draws, right under all {100 * result["accuracy_all_draws"]:.2f}%'
        if draws > 1
        else ''
      )
      + f' ({result["seconds"]:.1f}s)'
    )
