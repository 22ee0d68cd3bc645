"""Evaluation of trained checkpoints under attack: a model rebuilt from its checkpoint
alone, any attack run over a split and judged with a prediction rule, transfer attacks
between checkpoints, and one record per (checkpoint, attack, parameters).

Keys (so that any result can be recomputed bit for bit): an attack with all its
parameters (an `AttackSpec`) has the key fold_in(key(seed), spec.key_id), key_id being
a CRC-32 of the spec's text; batch b of the split uses batch_key = fold_in(that key, b);
the attack runs with fold_in(batch_key, 0) and the prediction of its output with
fold_in(batch_key, 1). Keys do not depend on the checkpoint, so every model meets the
same random numbers and a transfer cell whose source is its target equals that model's
white-box result.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from l2p_jax import attacks, data, experiment, models
from l2p_jax.errors import UserError
from l2p_jax.evaluation import prediction, results_report
from l2p_jax.runtime import sharding
from l2p_jax.training import checkpointing
from l2p_jax.training.checkpointing import Checkpoint

# The prediction rule each method's authors judge it by: Adv-BNN's acc_under_attack.py
# sums the softmax of 50 weight draws; the others predict from one draw.
AUTHORS_PREDICTION = {'adv_bnn': ('mean_softmax', 50)}
DEFAULT_DRAWS = 50  # Draws of vote and mean_softmax when config.predict.draws is None.
KEY_LAYOUT = (
  'attack spec key = fold_in(key(seed), key_id); batch b: batch_key = '
  'fold_in(spec key, b); attack key = fold_in(batch_key, 0); prediction key '
  '= fold_in(batch_key, 1)'
)


class EvaluationError(UserError, ValueError):
  """A request the evaluation cannot serve, with one message saying what to do."""


# --- attacks by name ------------------------------------------------------------------


def _clean(
  logits_fn: attacks.LogitsFn, key: jax.Array, x: jax.Array, y: jax.Array
) -> attacks.AttackResult:
  """No attack: the inputs themselves, so clean accuracy runs through the same path."""
  del logits_fn, key
  return attacks.AttackResult(x, jnp.zeros(y.shape, bool), jnp.zeros(y.shape, x.dtype))


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack with every parameter that changes its result.

  attack: a key of ATTACK_FUNCTIONS; params: its static keyword arguments; eps: the L-inf
  radius (None for attacks without one), passed traced so that an eps sweep compiles
  once; examples: attack only the first N examples of the split (0: all).
  """

  attack: str
  params: tuple[tuple[str, Any], ...] = ()
  eps: float | None = None
  examples: int = 0

  @property
  def key_id(self) -> int:
    """The number folded into the seed's key for this attack (stable across runs)."""
    return zlib.crc32(repr(self).encode()) & 0x7FFFFFFF

  @property
  def name(self) -> str:
    """A readable one-line description, e.g. 'pgd(steps=20, ..., eps=8/255)'."""
    parts = [f'{k}={v}' for k, v in self.params if k != 'unroll']
    if self.eps is not None:
      parts.append(f'eps={self.eps * 255:g}/255')
    if self.examples:
      parts.append(f'first {self.examples}')
    return f'{self.attack}({", ".join(parts)})'

  def describe(self) -> dict[str, Any]:
    """The parameters as a JSON-ready dict."""
    return {**dict(self.params), 'eps': self.eps, 'examples': self.examples}


def _names(value: str | Sequence[str]) -> list[str]:
  """The items of a comma-separated string or of a sequence of such strings."""
  items = [value] if isinstance(value, str) else list(value)
  return [name.strip() for item in items for name in item.split(',') if name.strip()]


def _pgd(
  config: ml_collections.ConfigDict, steps: int, eps: float, eot_draws: int = 1
) -> AttackSpec:
  """PGD (with EOT over `eot_draws` draws) of `steps` steps at `eps`, config.pgd's
  other settings."""
  p = config.pgd
  return AttackSpec(
    'pgd',
    (
      ('steps', steps),
      ('step_size', p.step_size),
      ('random_start', p.random_start),
      ('restarts', p.restarts),
      ('eot_draws', eot_draws),
      ('unroll', _unroll(config)),
    ),
    eps,
  )


def _few_pixel(config: ml_collections.ConfigDict, n_pixels: int) -> AttackSpec:
  """The few-pixel attack on `n_pixels` pixels with config.few_pixel's settings."""
  f = config.few_pixel
  return AttackSpec(
    'few_pixel',
    (
      ('n_pixels', n_pixels),
      ('population', f.population),
      ('iterations', f.iterations),
      ('chunk_size', f.chunk_size),
    ),
    None,
    f.examples,
  )


def _cw(config: ml_collections.ConfigDict) -> AttackSpec:
  """C&W L2 with config.cw's settings."""
  cw = config.cw
  return AttackSpec(
    'cw',
    (
      ('c_init', cw.c_init),
      ('learning_rate', cw.learning_rate),
      ('kappa', cw.kappa),
      ('binary_steps', cw.binary_steps),
      ('steps', cw.steps),
      ('unroll', _unroll(config)),
    ),
  )


def _apgd(config: ml_collections.ConfigDict) -> AttackSpec:
  """AutoAttack's 'rand' version (APGD-CE and APGD-DLR with EOT), config.apgd's."""
  return AttackSpec(
    'apgd_rand',
    (
      ('steps', config.apgd.steps),
      ('eot_draws', config.apgd.eot_draws),
      ('unroll', _unroll(config)),
    ),
    config.eps,
  )


def _unroll(config: ml_collections.ConfigDict) -> bool | int:
  return True if config.unroll else 1


@dataclasses.dataclass(frozen=True)
class RegisteredAttack:
  """A name of config.attacks: the attack function it runs and the name its
  AttackSpecs carry (both None for a plan of other attacks), the config section of
  its parameters, and its specs as a function of (config, N of `name<N>`: 0 when not
  given, accepted only when `counted`)."""

  attack: str | None
  function: Callable[..., attacks.AttackResult] | None
  section: str | None
  specs: Callable[[ml_collections.ConfigDict, int], list[AttackSpec]]
  counted: bool = False


# Every attack evaluation runs, by its name in config.attacks.
ATTACKS: dict[str, RegisteredAttack] = {
  'clean': RegisteredAttack('clean', _clean, None, lambda c, n: [AttackSpec('clean')]),
  'fgsm': RegisteredAttack(
    'fgsm', attacks.fgsm, None, lambda c, n: [AttackSpec('fgsm', (), c.eps)]
  ),
  'pgd': RegisteredAttack(
    'pgd', attacks.pgd, 'pgd', lambda c, n: [_pgd(c, n or c.pgd.steps, c.eps)], counted=True
  ),
  'eot_pgd': RegisteredAttack(
    'pgd',
    attacks.pgd,
    'eot',
    lambda c, n: [_pgd(c, n or c.pgd.steps, c.eps, c.eot.draws)],
    counted=True,
  ),
  'eps_sweep': RegisteredAttack(
    None,
    None,
    'eps_sweep',
    lambda c, n: [
      spec
      for e in c.eps_sweep.eps_255
      for spec in (AttackSpec('fgsm', (), e / 255), _pgd(c, c.pgd.steps, e / 255))
    ],
  ),
  'cw': RegisteredAttack('cw', attacks.cw_l2, 'cw', lambda c, n: [_cw(c)]),
  'apgd': RegisteredAttack('apgd_rand', attacks.autoattack_rand, 'apgd', lambda c, n: [_apgd(c)]),
  'few_pixel': RegisteredAttack(
    'few_pixel',
    attacks.few_pixel,
    'few_pixel',
    lambda c, n: [_few_pixel(c, p) for p in ((n,) if n else c.few_pixel.pixels)],
    counted=True,
  ),
  'transfer': RegisteredAttack(None, None, 'transfer', lambda c, n: []),
}
ATTACK_NAMES = tuple(
  f'{name}{suffix}'
  for name, entry in ATTACKS.items()
  for suffix in ('', '<N>')[: 1 + entry.counted]
)
# The function of an AttackSpec, by its `attack`.
ATTACK_FUNCTIONS = {
  entry.attack: entry.function for entry in ATTACKS.values() if entry.function is not None
}


def plan_attacks(
  config: ml_collections.ConfigDict, names: str | Sequence[str] | None = None
) -> tuple[list[AttackSpec], bool]:
  """The white-box attacks that `names` (default: config.attacks) asks for, with their
  parameters from `config` and duplicates removed (an eps-sweep point at the headline
  eps is the headline attack), and whether the transfer matrix is asked for."""
  specs, transfer = [], False
  for name in _names(config.attacks if names is None else names):
    base, number = re.fullmatch(r'(.*?)(\d*)', name).groups()
    if base not in ATTACKS or (number and not ATTACKS[base].counted):
      raise EvaluationError(
        f'Unknown attack {name!r} in config.attacks; accepted: {", ".join(ATTACK_NAMES)}.'
      )
    if number and int(number) < 1:
      raise EvaluationError(f'Attack {name!r} needs a count of at least 1.')
    specs += ATTACKS[base].specs(config, int(number or 0))
    transfer |= base == 'transfer'
  return list(dict.fromkeys(specs)), transfer


def prediction_rule(config: ml_collections.ConfigDict, method: str) -> tuple[str, int, str]:
  """(rule, draws, origin) of a `method` checkpoint's predictions: config.predict's
  rule, or with none set the method authors' (AUTHORS_PREDICTION, else one draw);
  origin says which ('config' or 'authors')."""
  rule, draws = config.predict.rule, config.predict.draws
  if rule is None:
    rule, authors_draws = AUTHORS_PREDICTION.get(method, ('single', 1))
    return rule, 1 if rule == 'single' else draws or authors_draws, 'authors'
  return rule, 1 if rule == 'single' else draws or DEFAULT_DRAWS, 'config'


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises EvaluationError for settings no evaluation can use."""
  rule = config.predict.rule
  if rule is not None and rule not in prediction.RULES:
    raise EvaluationError(
      f'Unknown prediction rule {rule!r} (config.predict.rule); expected one of {prediction.RULES}.'
    )
  for field, value, low in (
    ('eps', config.eps, 0),
    ('predict.draws', config.predict.draws or 1, 1),
    ('batch_size', config.batch_size, 1),
    ('few_pixel.population', config.few_pixel.population, 4),
    ('few_pixel.examples', config.few_pixel.examples, 0),
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
  split = data.load_split(
    d['dataset'],
    d['eval_split'],
    source=d['source'],
    data_dir=d['data_dir'] or None,
    local_dir=d['local_dir'] or None,
    download=d['download'],
  )
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


# --- running attacks ------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('model', 'attack', 'params', 'noise'))
def _attack_batch(
  variables: dict[str, Any],
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  eps: jax.Array | None,
  *,
  model: models.ResNet,
  attack: str,
  params: tuple,
  noise: bool,
) -> jax.Array:
  """The attack's inputs for one uint8 batch; compiled once per (model, attack, params)."""
  kwargs = dict(params) if eps is None else {**dict(params), 'eps': eps}
  return ATTACK_FUNCTIONS[attack](
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
      attack=spec.attack,
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


def _record(
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


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  checkpoint: Checkpoint,
  label: str,
  split: data.HostSplit,
  specs: Sequence[AttackSpec],
  mesh: jax.sharding.Mesh,
) -> list[dict[str, Any]]:
  """One white-box record per attack spec for one checkpoint."""
  records = []
  for spec in specs:
    started = time.time()
    [counts] = attack_accuracy(
      spec, checkpoint, [checkpoint], split, config=config, mesh=mesh, desc=f'{label} {spec.name}'
    )
    records.append(_record(config, spec, checkpoint, label, split, counts, time.time() - started))
    _log(records[-1])
  return records


def transfer_records(
  config: ml_collections.ConfigDict,
  sources: Sequence[Checkpoint],
  targets: Sequence[Checkpoint],
  labels: dict[str, str],
  split: data.HostSplit,
  mesh: jax.sharding.Mesh,
) -> list[dict[str, Any]]:
  """Supplementary Table 2: every target judged on the FGSM and PGD examples made on
  every source; a cell records its row's time (making the examples and judging all)."""
  records = []
  for source in sources:
    for spec in plan_attacks(config, 'fgsm,pgd')[0]:
      started = time.time()
      counts = attack_accuracy(
        spec,
        source,
        targets,
        split,
        config=config,
        mesh=mesh,
        desc=f'transfer from {labels[source.path]} {spec.name}',
      )
      seconds = time.time() - started
      origin = {'label': labels[source.path], 'checkpoint': source.path, 'step': source.step}
      for target, c in zip(targets, counts):
        records.append(
          _record(config, spec, target, labels[target.path], split, c, seconds, source=origin)
        )
        _log(records[-1])
  return records


def _log(record: dict[str, Any]) -> None:
  """One console line per result."""
  if jax.process_index() == 0:
    origin = f' from {record["source"]["label"]}' if record['source'] else ''
    tqdm.write(
      f'{record["label"]}{origin} {record["name"]}: accuracy '
      f'{100 * record["accuracy"]:.2f}% of {record["n"]} ({record["seconds"]:.1f}s)'
    )


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


def _eval_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The device mesh, with EvaluationError if config.batch_size does not split over it."""
  mesh = sharding.make_mesh()
  try:
    sharding.check_batch_size(config.batch_size, mesh)
  except ValueError as error:
    raise EvaluationError(f'config.batch_size: {error}') from None
  return mesh


def _write_results(results: dict[str, Any], output_dir: str) -> dict[str, Any]:
  """Merges the earlier records of output_dir into `results`, writes the report there
  (first process only) and returns the merged results."""
  results = results_report.merge_previous(results, output_dir)
  if jax.process_index() == 0:
    for path in results_report.write_report(results, output_dir):
      tqdm.write(f'Wrote {path}')
  return results


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
  workdirs, checkpoint_paths = _names(workdirs), _names(checkpoint_paths)
  _check_paths(workdirs, checkpoint_paths)
  validate_config(config)
  specs, transfer = plan_attacks(config)
  mesh = _eval_mesh(config)
  cache = _RestoredCheckpoints(config)
  paths = checkpoint_paths or workdirs
  evaluated = [cache.load(path) for path in paths]
  if transfer:
    sources = [cache.load(p) for p in _names(config.transfer.sources) or paths]
    targets = [cache.load(p) for p in _names(config.transfer.targets) or paths]
  labels = _labels(list(cache.restored.values()))
  examples = functools.cache(load_examples)

  records = []
  for checkpoint in evaluated:
    split = examples(data_settings(config, checkpoint))
    check_model_takes_split(split, checkpoint)
    records += evaluate_checkpoint(config, checkpoint, labels[checkpoint.path], split, specs, mesh)
  if transfer:
    split = examples(data_settings(config, sources[0]))
    for checkpoint in sources + targets:
      check_model_takes_split(split, checkpoint)
    records += transfer_records(config, sources, targets, labels, split, mesh)
  results = {
    'config': config.to_dict(),
    'key_layout': KEY_LAYOUT,
    'checkpoints': [{'label': labels[c.path], **c.describe()} for c in cache.restored.values()],
    'records': records,
  }
  return _write_results(results, config.output_dir or os.path.join(workdirs[0], 'eval'))
