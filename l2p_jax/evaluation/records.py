"""One record per result (checkpoint, attack with its parameters, source of the examples)
with everything that reproduces it (`Record`, written to results.json by results_files
as its `to_json()`), its identity (what a rerun replaces) and its line on the console;
verdicts.py keeps its per-image verdicts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from l2p_jax import data
from l2p_jax.evaluation.attack_registry import AttackSpec
from l2p_jax.evaluation.judged_model import JudgedModel
from l2p_jax.evaluation.judging import SHARED_DRAWS, Judgement, chosen_rule


@dataclasses.dataclass(frozen=True)
class Record:
  """One result, as results.json holds it.

  label, checkpoint, step, workdir, method, arch, width, dataset, split: what was
  evaluated (a model given to `evaluation.evaluate`: checkpoint and method its label,
  step 0, workdir its output folder, arch 'predict', width 1; dataset 'arrays', split
  'evaluate'); attack, name, params: the attack (registry name, AttackSpec.name, its
  parameters with eps and examples); source: None for white-box, else the checkpoint
  the examples were made on (label, checkpoint, step); accuracy, correct, n, fooled,
  mean_l2: the outcome (fooled counts the examples predicted right on the clean input
  and wrong on the attack's, mean_l2 is the mean L2 norm of their perturbations, None if
  there are none; with K judged draws, correct and fooled count (image, draw) verdicts,
  out of n x K); judged_draws: K; accuracy_ci95: [low, high]
  (intervals.accuracy_interval); accuracy_all_draws: the share of images right under
  every judged draw; judge_seconds: of `seconds` (wall clock, compilation included),
  those spent judging; rule, draws, rule_from, noise, randomized: how predictions were
  made (rule_from 'authors' when the rule is the method authors' default, 'config' when
  config.predict set it); key, batch_size: what reproduces it (evaluation.KEY_LAYOUT);
  verdicts: its name in verdicts.npz; judging: judging.SHARED_DRAWS, its judged draws
  the evaluation's own, shared by every attack and the clean images (absent from
  records written before, whose judged draws were the attack's: a rerun redoes them);
  curve: for an attack that keeps one (PGD, APGD,
  Square) on the model it ran on, the accuracy as the attack itself saw it (the share of
  the n examples it had not fooled) at its start and after each iteration, the evidence
  that it converged (sanity.py's `converged`); other records have no such field.
  """

  label: str
  checkpoint: str
  step: int
  workdir: str
  method: str
  arch: str
  width: float
  dataset: str
  split: str
  attack: str
  name: str
  params: dict[str, Any]
  source: dict[str, Any] | None
  accuracy: float
  correct: int
  n: int
  fooled: int
  mean_l2: float | None
  judged_draws: int
  accuracy_ci95: list[float]
  accuracy_all_draws: float
  judge_seconds: float
  seconds: float
  rule: str
  draws: int
  rule_from: str
  noise: bool
  randomized: bool
  key: dict[str, Any]
  batch_size: int
  verdicts: str
  judging: str | None = None
  curve: list[float] | None = None

  def to_json(self) -> dict[str, Any]:
    """The record as results.json holds it (without `judging` or `curve` when None)."""
    record = dataclasses.asdict(self)
    for field in ('judging', 'curve'):
      if record[field] is None:
        del record[field]
    return record

  @classmethod
  def from_json(cls, record: dict[str, Any]) -> Record:
    """The record of a results.json entry, with or without `judging` and `curve`;
    TypeError when its fields are not RECORD_FIELDS."""
    return cls(**record)


RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(Record))


def attacked(
  spec: AttackSpec,
  target: JudgedModel,
  label: str,
  split: data.HostSplit,
  source: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """A record's first fields: the model, the data and the attack with its parameters
  (and the transfer source that made the examples, if any)."""
  return {
    'label': label,
    **target.description,
    'dataset': split.name,
    'split': split.split,
    'attack': spec.attack,
    'name': spec.name,
    'params': spec.describe(),
    'source': source,
  }


def make_record(
  config: ml_collections.ConfigDict,
  spec: AttackSpec,
  target: JudgedModel,
  label: str,
  split: data.HostSplit,
  judgement: Judgement,
  seconds: float,
  source: dict[str, Any] | None = None,
) -> Record:
  """One result: what was attacked how, with which key and prediction rule, and the
  outcome."""
  rule, draws, origin = chosen_rule(config, target.authors_prediction)
  record = {
    **attacked(spec, target, label, split, source),
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
  return Record(**record, verdicts=verdicts_id(record), judging=SHARED_DRAWS)


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


# How a record was measured beyond its identity: a rerun that measures the same identity
# otherwise replaces the earlier record, and `replaced_lines` says so.
MEASURED_WITH = ('n', 'judged_draws', 'judging', 'key')


def replaced_lines(new: list[dict[str, Any]], stored: dict[str, Any] | None) -> list[str]:
  """A line per record of the stored results.json that a record in `new` replaces
  although it was measured otherwise (other images, judged draws or key), naming what
  changed: results.json keeps one record per identity, and the earlier one goes."""
  earlier = {identity(r): r for r in (stored or {}).get('records', [])}
  lines = []
  for record in new:
    old = earlier.get(identity(record))
    if old is None:
      continue
    changed = [f for f in MEASURED_WITH if old.get(f) != record.get(f)]
    said = [
      'another key' if f == 'key' else f'{f} {old.get(f)} -> {record.get(f)}' for f in changed
    ]
    if said:
      lines.append(
        f'{record["label"]} {record["name"]}: replaces the record of an earlier run in this '
        f'folder, measured with other settings ({", ".join(said)})'
      )
  return lines


def verdicts_id(record: dict[str, Any]) -> str:
  """The name of a record's per-image verdicts in verdicts.npz: a hash of its identity,
  so that the record that replaces it replaces its verdicts."""
  return hashlib.sha1(json.dumps(identity(record)).encode()).hexdigest()[:16]


def log_record(record: Record) -> None:
  """One console line per result (first process only)."""
  if jax.process_index() == 0:
    origin = f' from {record.source["label"]}' if record.source else ''
    low, high = record.accuracy_ci95
    draws = record.judged_draws
    tqdm.write(
      f'{record.label}{origin} {record.name}: accuracy '
      f'{100 * record.accuracy:.2f}% [{100 * low:.1f}, {100 * high:.1f}] of {record.n}'
      + (
        f' x {draws} draws; {100 * record.accuracy_all_draws:.2f}% of the images right under'
        ' every draw'
        if draws > 1
        else ''
      )
      + f' ({record.seconds:.1f}s)'
    )
