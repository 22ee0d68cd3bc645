"""The evaluation of any model, not only our checkpoints (`evaluate`): a pure
`predict(x, key) -> logits` of float32 NHWC images in [0, 1] goes through the runner's
own code path (runner.evaluate_model, recording.conclude), so its records have eval.py's
keys, judged draws, intervals, worst case and sanity checks. Bad input is refused
before any attack, one line each (`InputError`)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from l2p_jax.attacks import LogitsFn
from l2p_jax.evaluation import estimate, eval_config, progress, recording, runner
from l2p_jax.evaluation.attack_registry import (
  AttackSpec,
  EvaluationError,
  listed_names,
  plan_attacks,
)
from l2p_jax.evaluation.judged_model import JudgedModel, PredictLogits
from l2p_jax.evaluation.judging import CleanVerdicts, as_inputs

# What records say about the data of evaluate(): its images are the caller's arrays.
DATASET, SPLIT = 'arrays', 'evaluate'
# A model of evaluate() is judged by its first draw unless config.predict.rule says more.
DEFAULT_PREDICTION = ('single', 1)


class InputError(EvaluationError):
  """A model, images or labels given to `evaluate` that cannot be judged as they are."""


@dataclasses.dataclass(frozen=True)
class Examples:
  """The images and labels given to `evaluate`, with data.HostSplit's fields (which
  judging reads), the images float32 in [0, 1] or uint8."""

  name: str
  split: str
  images: np.ndarray
  labels: np.ndarray
  num_classes: int

  @property
  def num_examples(self) -> int:
    return len(self.labels)


def default_config(arg: str = '') -> ml_collections.ConfigDict:
  """eval.py's config (configs/eval.py): the full evaluation ('') or its tiny CPU
  variant ('tiny')."""
  return eval_config.get_config(arg)


def _settings(
  config: ml_collections.ConfigDict | None,
  attacks: str | Sequence[str] | None,
  seed: int,
  output_dir: str | None,
) -> ml_collections.ConfigDict:
  """A copy of `config` (default_config() if None) with `attacks` (None keeps
  config.attacks), `seed` and `output_dir` (None keeps config.output_dir) set."""
  config = copy.deepcopy(default_config() if config is None else config)
  if attacks is not None:
    config.attacks = ','.join(listed_names(attacks))
  config.seed = seed
  if output_dir is not None:
    config.output_dir = output_dir
  return config


def checked_images(images: Any) -> np.ndarray:
  """`images` as NumPy, float32 or uint8 (read as k/255 inside the jitted attacks, as
  eval.py reads a split); InputError unless an NHWC batch of floats in [0, 1] or uint8."""
  images = np.asarray(images)
  if images.ndim != 4 or not len(images):
    raise InputError(
      f'images must be a non-empty NHWC batch (N, H, W, C); got shape {images.shape}.'
    )
  if images.shape[1] in (1, 3) and images.shape[3] > 4:
    raise InputError(
      f'images of shape {images.shape} look NCHW; evaluate takes NHWC: pass '
      'images.transpose(0, 2, 3, 1).'
    )
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise InputError(f'images must be floats in [0, 1] (or uint8); got {images.dtype}.')
  images = images.astype(np.float32)
  finite = np.all(np.isfinite(images))
  if not finite or images.min() < 0 or images.max() > 1:
    raise InputError(
      f'images must lie in [0, 1]; found values from {np.nanmin(images):g} to '
      f'{np.nanmax(images):g}{"" if finite else " and non-finite ones"} (normalization '
      'belongs inside predict).'
    )
  return images


def checked_labels(labels: Any, n: int) -> np.ndarray:
  """`labels` as int32 NumPy; InputError unless n integer class indices (N,)."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise InputError(
      f'labels must be integer class indices of shape (N,); got {labels.dtype} of shape '
      f'{labels.shape}.'
    )
  if len(labels) != n:
    raise InputError(f'{len(labels)} labels for {n} images; give one label per image.')
  return labels.astype(np.int32)


def _probe(model: JudgedModel, images: np.ndarray, batch_size: int) -> tuple[int, bool]:
  """(classes, whether the logits change with the key) of predict on every image under
  the keys 0 and 1; InputError for logits of the wrong shape or dtype, or not finite."""
  key = jax.random.key(0)
  logits_fn = model.logits_fn(True)
  images = np.asarray(as_inputs(images))
  batch = images[: min(batch_size, len(images))]
  out = jax.eval_shape(logits_fn, batch, key)
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise InputError(f'predict must return one array of logits; it returned {out}.')
  if len(out.shape) != 2 or out.shape[0] != len(batch) or out.shape[1] < 2:
    raise InputError(
      f'predict returned logits of shape {out.shape} for {len(batch)} images; it must '
      'return (N, classes), at least 2 classes.'
    )
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise InputError(f'predict returned {out.dtype} logits; they must be floating point.')
  logits, varies, bad = jax.jit(logits_fn), False, 0
  for start in range(0, len(images), len(batch)):
    chunk = images[start : start + len(batch)]
    padded = np.concatenate([chunk, batch[: len(batch) - len(chunk)]])
    first, second = (np.asarray(logits(padded, jax.random.key(k)))[: len(chunk)] for k in (0, 1))
    varies |= bool(np.any(first != second))
    bad += int(np.sum(~(np.isfinite(first).all(1) & np.isfinite(second).all(1))))
  if bad:
    raise InputError(
      f'predict returned non-finite logits (NaN or inf) for {bad} of {len(images)} images.'
    )
  return out.shape[1], varies


def given_model(
  predict: LogitsFn,
  example: np.ndarray,
  randomized: bool,
  label: str,
  output_dir: str | None,
  predict_noise_off: LogitsFn | None,
) -> JudgedModel:
  """The JudgedModel of evaluate's arguments (the arrays predict closes over, found on
  the `example` images, its traced variables), judged by the first draw by default and
  described by `label` (records.Record)."""
  logits = PredictLogits(predict, predict_noise_off if randomized else predict)
  return JudgedModel(
    logits,
    logits.closed_over(example, jax.random.key(0)),
    randomized,
    DEFAULT_PREDICTION,
    {
      'checkpoint': label,
      'step': 0,
      'workdir': output_dir,
      'method': label,
      'arch': 'predict',
      'width': 1.0,
    },
    noise_off=predict_noise_off is not None or not randomized,
  )


def checked_examples(
  model: JudgedModel, images: np.ndarray, labels: Any, batch_size: int
) -> Examples:
  """The checked images and the labels to judge the model on; InputError for labels or
  logits it cannot judge, or a model declared deterministic whose logits change with
  the key."""
  labels = checked_labels(labels, len(images))
  classes, varies = _probe(model, images, batch_size)
  if varies and not model.randomized:
    raise InputError(
      'predict is declared randomized=False but its logits change with the key; pass '
      'randomized=True to judge it over noise draws.'
    )
  if labels.min() < 0 or labels.max() >= classes:
    raise InputError(
      f'labels must lie in [0, {classes}) (predict gives {classes} logits); found '
      f'{labels.min()} to {labels.max()}.'
    )
  return Examples(DATASET, SPLIT, images, labels, classes)


def _runnable(specs: list[AttackSpec], model: JudgedModel, label: str) -> list[AttackSpec]:
  """The specs the model can be attacked with: the noise-off ones only with the model's
  noise off given, each one left out said on the console."""
  for spec in specs:
    if not spec.attack_noise and not model.noise_off:
      tqdm.write(f'{label} {spec.name}: skipped, it needs predict_noise_off (the noise off).')
  return [s for s in specs if s.attack_noise or model.noise_off]


def _say_plan_and_estimate(
  config: ml_collections.ConfigDict,
  model: JudgedModel,
  label: str,
  split: Examples,
  specs: Sequence[AttackSpec],
  mesh: jax.sharding.Mesh,
) -> int:
  """Says the plan and the time estimate of evaluating `model` under `specs`, as eval.py
  does (nothing is reused, so every attack is priced); returns how many attacks run."""
  planned = runner.model_specs(config, model, specs)
  progress.say_plan(config, len(planned), split.num_examples)
  priced = [
    estimate.planned(f'attack {k}/{len(planned)} {label} {spec.name}', spec,
                     split.num_examples, config, [model], False)
    for k, spec in enumerate(planned, 1)
  ]  # fmt: skip
  clean = [estimate.clean_judging(label, split.num_examples, config, model)]
  estimate.say_estimate(config, priced, clean, model, split, mesh)
  return len(planned)


def evaluate(
  predict: LogitsFn,
  images: Any,
  labels: Any,
  *,
  randomized: bool,
  attacks: str | Sequence[str] | None = None,
  config: ml_collections.ConfigDict | None = None,
  seed: int = 0,
  output_dir: str | None = None,
  label: str = 'model',
  predict_noise_off: LogitsFn | None = None,
) -> dict[str, Any]:
  """Evaluates `predict(x, key) -> logits` (pure JAX, float32 NHWC x in [0, 1], its
  noise drawn from `key`) on `images` (NHWC, floats in [0, 1], or uint8 read as k/255
  as eval.py reads a split) and `labels` as eval.py
  does a checkpoint: `attacks` (eval.py's names; None: config.attacks, eval.py's
  default list in the default config) with config's settings (configs/eval.py's
  get_config(); its data and model sections do not apply; config.seed becomes `seed`),
  judged under config.judge.draws draws if `randomized`, once if not, by
  config.predict's rule (default: the first draw). The noise-off attacks run only with
  `predict_noise_off`, the model with its noise off; transfer needs several models
  (evaluate_workdirs). Returns the results as results.json holds them (records,
  worst_case, sanity; the records' checkpoint and method are `label`) and, given
  `output_dir` (or config.output_dir), writes results.json, verdicts.npz, results.md
  and the plots there, keeping the earlier records it does not redo. Raises
  InputError, one line, for input it cannot judge."""
  config = _settings(config, attacks, seed, output_dir)
  runner.validate_config(config)
  specs, transfer = plan_attacks(config)
  if transfer:
    raise EvaluationError(
      'transfer needs several models; evaluate judges one: leave it out of attacks '
      '(evaluate_workdirs runs it between checkpoints).'
    )
  images = checked_images(images)
  example = np.asarray(as_inputs(images[:1]))
  model = given_model(predict, example, randomized, label, config.output_dir, predict_noise_off)
  if not (config.noise or model.noise_off):
    raise InputError(
      'config.noise=False judges the model with its noise off: pass predict_noise_off.'
    )
  split = checked_examples(model, images, labels, config.batch_size)
  specs = _runnable(specs, model, label)
  stored = recording.open_results(config.output_dir)  # Refused now, not after the attacks.
  mesh = runner.eval_mesh(config)
  planned = _say_plan_and_estimate(config, model, label, split, specs, mesh)
  # A predict function's label does not pin its model, so nothing stored is reused.
  recorder = recording.Recorder(config, stored, config.output_dir, planned, reuse=False)
  recorder.entries = [recording.model_entry(label, model, None)]
  with recorder.stops():
    runner.evaluate_model(config, model, label, split, specs, mesh, recorder, CleanVerdicts())
  entry = recording.model_entry(label, model, runner.logits_vary(config, model, split))
  return recording.conclude(
    config, [entry], recorder.records, recorder.found, stored, config.output_dir
  )
