"""An evaluation's records as they finish (`Recorder`): each attack's written to the output
folder when it ends, with the worst cases and sanity checks of everything so far
(`conclude`), so a stopped run keeps what it finished and a rerun of the same command
reuses it instead of attacking again; Ctrl-C or SIGTERM as one line
(`EvaluationInterrupted`)."""

from __future__ import annotations

import contextlib
import gc
import json
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from l2p_jax import data
from l2p_jax.errors import UserError
from l2p_jax.evaluation import results_files, results_report, summary, verdicts
from l2p_jax.evaluation.attack_registry import AttackSpec
from l2p_jax.evaluation.judged_model import JudgedModel
from l2p_jax.evaluation.judging import (
  KEY_LAYOUT,
  SHARED_DRAWS,
  Judgement,
  chosen_rule,
  judged_draws,
)
from l2p_jax.evaluation.records import Record, attacked, log_record, replaced_lines
from l2p_jax.runtime import cli

Verdicts = dict[str, Any]  # verdicts.npz's arrays by name (verdicts.arrays).


class EvaluationInterrupted(UserError, RuntimeError):
  """Ctrl-C or SIGTERM stopped the evaluation; the attacks it finished are written, and
  a rerun of the same command goes on from them."""


class Recorder:
  """The records of one evaluation as they finish: each attack's written to the output
  folder as soon as it ends (`add`), so a stopped run keeps them, and (with `reuse`) the
  stored record that spares a rerun an attack it already finished (`recorded`)."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    stored: results_files.Stored,
    output_dir: str | None,
    planned: int,
    reuse: bool = True,
  ):
    self.config, self.stored, self.output_dir, self.planned = config, stored, output_dir, planned
    self.reuse = reuse
    self.records: list[dict[str, Any]] = []
    self.found: Verdicts = {}
    self.entries: list[dict[str, Any]] = []
    self.finished = 0
    self.stopped = False  # A stop was asked for (see `stops`).

  def recorded(self, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record whose fields include `wanted` (its checkpoint, step, attack
    with its parameters, data and image count, key and prediction rule) and whose
    verdicts are stored; None when there is none or reuse is off, so the attack runs."""
    if not self.reuse:
      return None
    wanted = json.loads(json.dumps(wanted))  # As results.json holds it (tuples as lists).
    for record in (self.stored.results or {}).get('records', []):
      if all(record.get(k) == v for k, v in wanted.items()) and (
        f'{record["verdicts"]}.right' in self.stored.verdicts
      ):
        return record
    return None

  def add(self, records: Sequence[dict[str, Any]], found: Verdicts) -> None:
    """One finished attack's records and verdicts, written with all before them; none
    once a stop was asked for, even one whose KeyboardInterrupt Python dropped."""
    if self.stopped:
      raise KeyboardInterrupt
    if jax.process_index() == 0:
      for line in replaced_lines(list(records), self.stored.results):
        tqdm.write(line)
    self.records += records
    self.found.update(found)
    self.finished += 1
    if self.output_dir is not None:
      conclude(
        self.config, self.entries, self.records, self.found, self.stored, self.output_dir, False
      )

  @contextlib.contextmanager
  def stops(self) -> Iterator[None]:
    """Turns Ctrl-C and SIGTERM (KeyboardInterrupt) into EvaluationInterrupted, saying
    how many attacks are recorded. A stop is also marked: one that lands in a garbage
    collector callback (JAX registers one), where Python would drop the exception with
    a traceback, is only marked there and ends the run before its next record."""

    def stop(signum, frame):
      self.stopped = True
      if not _in_gc_callback(frame):
        signal.default_int_handler(signum, frame)

    main = threading.current_thread() is threading.main_thread()  # Handlers live there.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
      yield
    except KeyboardInterrupt:
      raise EvaluationInterrupted(
        f'interrupted; {self.finished} of {self.planned} attacks recorded; rerun the same '
        'command to go on.'
      ) from None
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)


def _in_gc_callback(frame: Any) -> bool:
  """Whether `frame` runs inside one of the garbage collector's callbacks."""
  codes = {getattr(callback, '__code__', None) for callback in gc.callbacks}
  while frame is not None and frame.f_code not in codes:
    frame = frame.f_back
  return frame is not None


def record_and_verdicts(record: Record, judgement: Judgement) -> tuple[dict[str, Any], Verdicts]:
  """Logs `record`; returns it as results.json holds it, with its per-image verdicts."""
  log_record(record)
  arrays = verdicts.arrays(record.verdicts, judgement.right, judgement.draw_right, judgement.bits)
  return record.to_json(), arrays


def wanted_fields(
  config: ml_collections.ConfigDict,
  spec: AttackSpec,
  model: JudgedModel,
  label: str,
  split: data.HostSplit,
  source: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The fields of the record `spec` would make on `model` that decide whether a stored
  one may stand for it (everything but the outcome and the times; `judging`, so that a
  record judged under the attack's own draws, before they were shared, is redone)."""
  rule, draws, _ = chosen_rule(config, model.authors_prediction)
  return {
    **attacked(spec, model, label, split, source),
    'n': min(spec.examples or split.num_examples, split.num_examples),  # 0: all.
    'judged_draws': judged_draws(config, model),
    'rule': rule,
    'draws': draws,
    'noise': config.noise,
    'key': {'seed': config.seed, 'fold_in': [spec.key_id]},
    'judging': SHARED_DRAWS,
  }


def reuse_records(recorder: Recorder, records: Sequence[dict[str, Any]], desc: str) -> None:
  """Adds stored `records` and their verdicts as this run's, saying so on the console."""
  names = [f'{r["verdicts"]}.{part}' for r in records for part in verdicts.PARTS]
  names = [name for name in names if name in recorder.stored.verdicts]
  if jax.process_index() == 0:
    tqdm.write(f'{desc}: recorded by an earlier run into this folder, not rerun')
  for record in records:
    log_record(Record.from_json(record))
  recorder.add(records, {n: recorder.stored.verdicts[n] for n in names})


def model_entry(label: str, model: JudgedModel, varies: bool | None) -> dict[str, Any]:
  """A model's entry in results.json's `checkpoints`: its label, description and
  whether its logits vary between noise draws (None: not measured)."""
  return {'label': label, **model.description, 'logits_vary': varies}


def open_results(output_dir: str | None) -> results_files.Stored:
  """What output_dir holds before the attacks run, refused now if it cannot be written
  or read (nothing for None: the results are returned, not written)."""
  if output_dir is None:
    return results_files.Stored(None, {})
  cli.check_writable_folder(
    'the results folder', output_dir, 'pass --config.output_dir=DIR to write them elsewhere'
  )
  return results_files.read_stored(output_dir)


def conclude(
  config: ml_collections.ConfigDict,
  entries: Sequence[dict[str, Any]],
  records: Sequence[dict[str, Any]],
  found: Verdicts,
  stored: results_files.Stored,
  output_dir: str | None,
  final: bool = True,
) -> dict[str, Any]:
  """The results of the models' `entries` (model_entry) and their records: merged with
  the earlier records and verdicts of output_dir (`stored`), the worst cases and sanity
  checks added; written to output_dir (results.json, verdicts.npz, results.md and the
  plots, first process only; None writes nothing), the files and checks said on the
  console when `final` (not after each attack). Returns the merged results."""
  results = {
    'config': config.to_dict(),
    'key_layout': KEY_LAYOUT,
    'checkpoints': list(entries),
    'records': list(records),
  }
  results, found = results_files.merge(results, found, stored)
  results = summary.summarize(results, found)
  if jax.process_index() == 0:
    if output_dir is not None:
      paths = results_files.write_results(results, found, output_dir)
      paths += results_report.write_report(results, output_dir)
      for path in paths if final else ():
        tqdm.write(f'Wrote {path}')
    for line in results_report.console_lines(results) if final else ():
      tqdm.write(line)
  return results
