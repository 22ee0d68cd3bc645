"""The evaluation of models under attack: the white-box attacks of config.attacks on
one model (`evaluate_model`, any JudgedModel: a checkpoint's, or evaluate's predict
function), each record written as its attack ends (recording.py); for trained
checkpoints (`evaluate_workdirs`) each model rebuilt from its checkpoint alone, the data
it is evaluated on and the transfer matrix between them. Keys and prediction rules: see
judging."""

from __future__ import annotations

import collections
import functools
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from l2p_jax import checkpointing, data, experiment, methods
from l2p_jax.checkpointing import Checkpoint
from l2p_jax.evaluation import estimate, prediction, progress, results_files
from l2p_jax.evaluation.attack_registry import (
  AttackSpec,
  EvaluationError,
  listed_names,
  plan_attacks,
  registered_attacks,
  transfer_specs,
)
from l2p_jax.evaluation.judged_model import FlaxLogits, JudgedModel
from l2p_jax.evaluation.judging import CleanVerdicts, as_inputs, attack_accuracy
from l2p_jax.evaluation.recording import (
  Recorder,
  Verdicts,
  conclude,
  model_entry,
  open_results,
  record_and_verdicts,
  reuse_records,
  wanted_fields,
)
from l2p_jax.evaluation.records import make_record
from l2p_jax.runtime import sharding


def _setting(config: ml_collections.ConfigDict, field: str, attack: str) -> Any:
  """config's dotted `field`; EvaluationError when the config has none."""
  value = config
  for part in field.split('.'):
    if part not in value:
      raise EvaluationError(
        f'config.{field} is missing: the attack {attack!r} is registered with a bound on it; '
        'add it to the eval config.'
      )
    value = value[part]
  return value


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises EvaluationError for settings no evaluation can use (the bounds of every
  registered attack included)."""
  rule = config.predict.rule
  if rule is not None and rule not in prediction.RULES:
    raise EvaluationError(
      f'Unknown prediction rule {rule!r} (config.predict.rule); expected one of {prediction.RULES}.'
    )
  draws = config.predict.draws
  for field, value, low in (
    ('eps', config.eps, 0),
    ('predict.draws', 1 if draws is None else draws, 1),  # None: the rule's default.
    ('batch_size', config.batch_size, 1),
    ('judge.draws', config.judge.draws, 1),
    *(
      (field, _setting(config, field, entry.name), low)
      for entry in registered_attacks()
      for field, low in entry.bounds
    ),
  ):
    if value < low:
      raise EvaluationError(f'config.{field}={value} must be at least {low}.')


def data_settings(
  config: ml_collections.ConfigDict, checkpoint: Checkpoint
) -> tuple[tuple[str, Any], ...]:
  """The data to evaluate on, as sorted (field, value) pairs of the training config's
  `data` section: the checkpoint's dataset and eval split unless config.data overrides
  them (None keeps the checkpoint's value)."""
  d = dict(checkpoint.meta['config']['data'])
  for field, saved in (
    ('dataset', 'dataset'),
    ('source', 'source'),
    ('data_dir', 'data_dir'),
    ('local_dir', 'local_dir'),
    ('split', 'eval_split'),
    ('examples', 'eval_examples'),
  ):
    if config.data[field] is not None:
      d[saved] = config.data[field]
  return tuple(sorted(d.items()))


def load_examples(settings: tuple[tuple[str, Any], ...]) -> data.HostSplit:
  """The first data.examples examples of the split that `settings` names."""
  d = dict(settings)
  split = experiment.read_split(d, d['eval_split'])
  try:
    return experiment.first_examples(split, d['eval_examples'], 'data.examples')
  except ValueError as error:
    raise EvaluationError(str(error)) from None


def check_model_takes_split(split: data.HostSplit, checkpoint: Checkpoint) -> None:
  """Raises EvaluationError unless the checkpoint's model takes the split's images and
  predicts its classes."""
  meta = checkpoint.meta
  if split.num_classes != meta['num_classes'] or list(split.images.shape[1:]) != list(
    meta['image_shape']
  ):
    raise EvaluationError(
      f'{split.name}/{split.split} has {split.num_classes} classes of '
      f'{split.images.shape[1:]} images, but the model in {checkpoint.path} was trained '
      f'for {meta["num_classes"]} classes of {tuple(meta["image_shape"])} images.'
    )


def checkpoint_model(checkpoint: Checkpoint) -> JudgedModel:
  """A restored checkpoint as the evaluation judges it: its network, randomized and
  judged as its method's registry record says."""
  method = methods.get(checkpoint.meta['config']['method'])
  return JudgedModel(
    FlaxLogits(checkpoint.model),
    checkpoint.variables,
    checkpoint.randomized,
    method.authors_prediction,
    checkpoint.describe(),
  )


def model_specs(
  config: ml_collections.ConfigDict, model: JudgedModel, specs: Sequence[AttackSpec]
) -> list[AttackSpec]:
  """The white-box attacks of `specs` as `model` meets them (the noise-off attacks on
  randomized models only), each once (a deterministic model's EOT-PGD is its PGD)."""
  randomized = config.noise and model.randomized
  # Without noise the noise-off attack is the white-box one.
  chosen = (spec.for_model(config, randomized) for spec in specs)
  return list(dict.fromkeys(spec for spec in chosen if spec.attack_noise or randomized))


def evaluate_model(
  config: ml_collections.ConfigDict,
  model: JudgedModel,
  label: str,
  split: data.HostSplit,
  specs: Sequence[AttackSpec],
  mesh: jax.sharding.Mesh,
  recorder: Recorder,
  clean: CleanVerdicts,
) -> None:
  """One white-box record per attack spec for one model (model_specs), each added to
  `recorder` as it ends, the clean images judged once (`clean`); an attack recorded by
  an earlier run is not rerun."""
  for spec in model_specs(config, model, specs):
    desc = f'attack {recorder.finished + 1}/{recorder.planned} {label} {spec.name}'
    stored = recorder.recorded(wanted_fields(config, spec, model, label, split))
    if stored is not None:
      reuse_records(recorder, [stored], desc)
      continue
    started = time.time()
    [judgement] = attack_accuracy(
      spec, model, [model], split, config=config, mesh=mesh, clean=clean, desc=desc
    )
    record = make_record(config, spec, model, label, split, judgement, time.time() - started)
    made, arrays = record_and_verdicts(record, judgement)
    recorder.add([made], arrays)


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  checkpoint: Checkpoint,
  label: str,
  split: data.HostSplit,
  specs: Sequence[AttackSpec],
  mesh: jax.sharding.Mesh,
  found: Verdicts,
) -> list[dict[str, Any]]:
  """evaluate_model of a restored checkpoint, nothing written: its records, their
  verdicts added to `found`."""
  model = checkpoint_model(checkpoint)
  recorder = Recorder(config, results_files.Stored(None, {}), None, len(specs))
  evaluate_model(config, model, label, split, specs, mesh, recorder, CleanVerdicts())
  found.update(recorder.found)
  return recorder.records


def _origin(labels: dict[str, str], source: JudgedModel) -> dict[str, Any]:
  """A transfer record's `source`: the model its examples were made on."""
  return {
    'label': labels[source.path],
    'checkpoint': source.path,
    'step': source.description['step'],
  }


def transfer_records(
  config: ml_collections.ConfigDict,
  sources: Sequence[JudgedModel],
  targets: Sequence[JudgedModel],
  labels: dict[str, str],
  split: data.HostSplit,
  mesh: jax.sharding.Mesh,
  recorder: Recorder,
  clean: CleanVerdicts,
) -> None:
  """Supplementary Table 2: every target judged on the FGSM and PGD examples made on
  every source (the clean images judged once, `clean`), added to `recorder` row by row;
  a cell records its row's time (making the examples and judging all)."""
  for source in sources:
    origin = _origin(labels, source)
    for spec in transfer_specs(config):
      desc = f'attack {recorder.finished + 1}/{recorder.planned} transfer from '
      desc += f'{origin["label"]} {spec.name}'
      stored = [
        recorder.recorded(wanted_fields(config, spec, t, labels[t.path], split, origin))
        for t in targets
      ]
      if None not in stored:
        reuse_records(recorder, stored, desc)
        continue
      started = time.time()
      judgements = attack_accuracy(
        spec, source, targets, split, config=config, mesh=mesh, clean=clean, desc=desc
      )
      seconds = time.time() - started
      found, records = {}, []
      for target, judgement in zip(targets, judgements):
        label = labels[target.path]
        record = make_record(config, spec, target, label, split, judgement, seconds, origin)
        made, arrays = record_and_verdicts(record, judgement)
        records.append(made)
        found.update(arrays)
      recorder.add(records, found)


def _labels(restored: Sequence[Checkpoint]) -> dict[str, str]:
  """Short unique names: the run folder's name, with the step where two share it."""
  base = {c.path: os.path.basename(c.workdir) for c in restored}
  taken = collections.Counter(base.values())
  return {
    c.path: (base[c.path] if taken[base[c.path]] == 1 else f'{os.path.relpath(c.workdir)}@{c.step}')
    for c in restored
  }


class _RestoredCheckpoints:
  """Restores each checkpoint once however many paths name it, keeping them in the order
  they were first asked for (which fixes their labels and the results' order)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.restored: dict[tuple[str, int], Checkpoint] = {}

  def load(self, path: str) -> Checkpoint:
    """The checkpoint that `path` names, restored on first use; EvaluationError if none."""
    try:
      found = checkpointing.find_checkpoint(path)
      if found not in self.restored:
        self.restored[found] = checkpointing.load_checkpoint(
          path, arch=self.config.model.arch, width=self.config.model.width
        )
    except checkpointing.RESTORE_ERRORS as error:
      raise EvaluationError(str(error)) from None
    return self.restored[found]


def _check_paths(workdirs: Sequence[str], checkpoint_paths: Sequence[str]) -> None:
  """Raises EvaluationError unless there is a workdir and, if checkpoints are named, one
  per workdir."""
  if not workdirs:
    raise EvaluationError('Name at least one --workdir.')
  if checkpoint_paths and len(checkpoint_paths) != len(workdirs):
    raise EvaluationError(
      f'{len(checkpoint_paths)} --checkpoint paths for {len(workdirs)} '
      '--workdir folders; give one per workdir, or none.'
    )


def logits_vary(
  config: ml_collections.ConfigDict, model: JudgedModel, split: data.HostSplit
) -> bool:
  """Whether the model's logits on the split's first examples differ between two noise
  draws (with config.noise), for the judged_over_draws sanity check."""
  images = as_inputs(split.images[: min(config.batch_size, split.num_examples)])
  logits = jax.jit(model.logits_fn(config.noise))
  first, second = (np.asarray(logits(images, jax.random.key(k))) for k in (0, 1))
  return bool(np.any(first != second))


def eval_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The device mesh of an evaluation: every device, fewer when they do not divide
  config.batch_size (the training loop's one check)."""
  return sharding.mesh_for_batches({'config.batch_size': config.batch_size}, EvaluationError)


def _plan(
  config: ml_collections.ConfigDict,
  specs: Sequence[AttackSpec],
  evaluated: Sequence[Checkpoint],
  transfer: tuple[Sequence[Checkpoint], Sequence[Checkpoint]] | None,
  labels: dict[str, str],
  judged: dict[str, JudgedModel],
  examples: Any,
  recorder: Recorder,
) -> tuple[list[estimate.Planned], set[str]]:
  """Every attack evaluate_workdirs will run, in its order (each model's white-box ones,
  then the transfer rows; `transfer`: sources and targets, None for none), each marked
  if `recorder` holds its records; and the paths of the models that some attack not yet
  recorded judges (whose clean images will be judged)."""
  split = lambda c: examples(data_settings(config, c))  # noqa: E731
  is_recorded = lambda spec, t, on, origin=None: (  # noqa: E731
    recorder.recorded(wanted_fields(config, spec, judged[t.path], labels[t.path], on, origin))
    is not None
  )
  plan = [
    (f'{labels[c.path]} {spec.name}', spec, c, [c], is_recorded(spec, c, split(c)))
    for c in evaluated
    for spec in model_specs(config, judged[c.path], specs)
  ]
  if transfer:
    sources, targets = transfer
    for c in sources:
      origin = _origin(labels, judged[c.path])
      plan += [
        (
          f'transfer from {labels[c.path]} {spec.name}',
          spec,
          sources[0],
          targets,
          all(is_recorded(spec, t, split(sources[0]), origin) for t in targets),
        )
        for spec in transfer_specs(config)
      ]
  planned = [
    estimate.planned(
      f'attack {k}/{len(plan)} {name}',
      spec,
      split(checkpoint).num_examples,
      config,
      [judged[t.path] for t in models],
      recorded,
    )
    for k, (name, spec, checkpoint, models, recorded) in enumerate(plan, 1)
  ]
  return planned, {t.path for *_, models, recorded in plan if not recorded for t in models}


def _clean_judging(
  config: ml_collections.ConfigDict,
  checkpoints: Sequence[Checkpoint],
  labels: dict[str, str],
  judged: dict[str, JudgedModel],
  examples: Any,
) -> list[estimate.CleanJudging]:
  """The judging of each judged model's clean images, once per model (CleanVerdicts)."""
  once = {c.path: c for c in checkpoints}
  return [
    estimate.clean_judging(
      labels[path], examples(data_settings(config, c)).num_examples, config, judged[path]
    )
    for path, c in once.items()
  ]


def evaluate_workdirs(
  config: ml_collections.ConfigDict,
  workdirs: str | Sequence[str],
  checkpoint_paths: str | Sequence[str] = (),
) -> dict[str, Any]:
  """Evaluates the latest checkpoint of every workdir (or the named checkpoints, one per
  workdir) under config.attacks, runs the transfer matrix if asked, and writes
  results.json, results.md and the plots to config.output_dir (default: the first
  workdir's eval/), keeping the earlier records there that this run does not redo.
  Returns the results written to results.json.
  """
  workdirs, checkpoint_paths = listed_names(workdirs), listed_names(checkpoint_paths)
  _check_paths(workdirs, checkpoint_paths)
  validate_config(config)
  specs, transfer = plan_attacks(config)
  output_dir = config.output_dir or os.path.join(workdirs[0], 'eval')
  stored = open_results(output_dir)  # Refused now, not after the attacks.
  mesh = eval_mesh(config)
  cache = _RestoredCheckpoints(config)
  paths = checkpoint_paths or workdirs
  evaluated = [cache.load(path) for path in paths]
  if transfer:
    sources = [cache.load(p) for p in listed_names(config.transfer.sources) or paths]
    targets = [cache.load(p) for p in listed_names(config.transfer.targets) or paths]
  labels = _labels(list(cache.restored.values()))
  judged = {c.path: checkpoint_model(c) for c in cache.restored.values()}
  examples = functools.cache(load_examples)

  recorder = Recorder(config, stored, output_dir, planned=0)
  plan, judging = _plan(
    config,
    specs,
    evaluated,
    (sources, targets) if transfer else None,
    labels,
    judged,
    examples,
    recorder,
  )
  recorder.planned = len(plan)
  recorder.entries = [model_entry(labels[p], m, None) for p, m in judged.items()]
  first = examples(data_settings(config, evaluated[0]))
  progress.say_plan(config, len(plan), first.num_examples)
  check_model_takes_split(first, evaluated[0])
  varies, clean = {}, CleanVerdicts()  # One per run: every attack shares the clean verdicts.
  with recorder.stops():
    judged_now = [c for c in [*evaluated, *(targets if transfer else ())] if c.path in judging]
    cleans = _clean_judging(config, judged_now, labels, judged, examples)
    estimate.say_estimate(config, plan, cleans, judged[evaluated[0].path], first, mesh)
    for checkpoint in evaluated:
      split = examples(data_settings(config, checkpoint))
      check_model_takes_split(split, checkpoint)
      label, model = labels[checkpoint.path], judged[checkpoint.path]
      evaluate_model(config, model, label, split, specs, mesh, recorder, clean)
      varies[checkpoint.path] = logits_vary(config, model, split)
    if transfer:
      split = examples(data_settings(config, sources[0]))
      for checkpoint in sources + targets:
        check_model_takes_split(split, checkpoint)
      models = [[judged[c.path] for c in group] for group in (sources, targets)]
      transfer_records(config, *models, labels, split, mesh, recorder, clean)
      for checkpoint in targets:
        varies.setdefault(checkpoint.path, logits_vary(config, judged[checkpoint.path], split))
  entries = [model_entry(labels[p], m, varies.get(p)) for p, m in judged.items()]
  return conclude(config, entries, recorder.records, recorder.found, stored, output_dir)
