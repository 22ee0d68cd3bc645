"""How long an evaluation's planned attacks will take, said before the first one: the
seconds of one input gradient and one forward pass per image, timed on the first batch
of the first model, priced by each attack's registry Cost (gradients and forward passes
per image) plus the judging of its examples (every judged draw's prediction draws), and
the judging of each model's clean images, made once and shared by its attacks
(judging.CleanVerdicts)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
from tqdm import tqdm

from l2p_jax import attacks, data
from l2p_jax.evaluation.attack_registry import AttackSpec
from l2p_jax.evaluation.judged_model import JudgedModel
from l2p_jax.evaluation.judging import as_inputs, chosen_rule, judged_draws

TIMED_CALLS = 3  # Timed calls of each function after the one that compiles it; the best counts.


@dataclasses.dataclass(frozen=True)
class Planned:
  """One planned attack: its name on the console, its spec, the images it attacks, the
  forward passes per image of judging them (over every target), and whether an earlier
  run recorded it into the output folder (then it is not rerun, and not priced)."""

  name: str
  spec: AttackSpec
  images: int
  judge_forwards: int
  recorded: bool = False


@dataclasses.dataclass(frozen=True)
class CleanJudging:
  """The judging of one model's clean images: `forwards` forward passes per image, once
  for all of its attacks."""

  name: str
  images: int
  forwards: int


def judge_forwards(config: ml_collections.ConfigDict, targets: Sequence[JudgedModel]) -> int:
  """Forward passes per image of judging one input on `targets`: each one's judged
  draws x its rule's prediction draws."""
  return sum(
    judged_draws(config, t) * chosen_rule(config, t.authors_prediction)[1] for t in targets
  )


def clean_judging(
  name: str, images: int, config: ml_collections.ConfigDict, model: JudgedModel
) -> CleanJudging:
  """The judging of `model`'s first `images` clean images, shared by its attacks."""
  return CleanJudging(name, images, judge_forwards(config, [model]))


def planned(
  name: str,
  spec: AttackSpec,
  images: int,
  config: ml_collections.ConfigDict,
  targets,
  recorded: bool = False,
) -> Planned:
  """A Planned attack of `spec` on `images` images (its examples, when fewer), judged on
  `targets`, `recorded` or not by an earlier run."""
  attacked = min(spec.examples or images, images)
  return Planned(name, spec, attacked, judge_forwards(config, targets), recorded)


def _best_seconds(function: Callable, *args) -> float:
  """The fastest of TIMED_CALLS calls of `function` after one that compiles it."""
  jax.block_until_ready(function(*args))
  times = []
  for _ in range(TIMED_CALLS):
    started = time.perf_counter()
    jax.block_until_ready(function(*args))
    times.append(time.perf_counter() - started)
  return min(times)


def measure(
  config: ml_collections.ConfigDict,
  model: JudgedModel,
  split: data.HostSplit,
  mesh: jax.sharding.Mesh,
) -> tuple[float, float]:
  """Seconds per image of one input gradient (of the cross-entropy) and of one forward
  pass of `model`, noise as config.noise says, on the split's first batch."""
  batch = next(data.device_batches(mesh, data.eval_batches(split, config.batch_size)))
  labels = batch['label']

  def forward(variables, images, key):
    return model.logits(variables, config.noise, as_inputs(images), key)

  def gradient(variables, images, key):
    loss = lambda x: attacks.cross_entropy(model.logits(variables, config.noise, x, key), labels)
    return jax.grad(lambda x: loss(x).sum())(as_inputs(images))

  arguments = (model.variables, batch['image'], jax.random.key(0))
  seconds = [_best_seconds(jax.jit(f), *arguments) for f in (gradient, forward)]
  return seconds[0] / config.batch_size, seconds[1] / config.batch_size


def _duration(seconds: float) -> str:
  return f'{seconds:.3g} s' if seconds < 120 else f'{seconds / 60:.3g} min'


def estimate_lines(
  attacks_planned: Sequence[Planned],
  gradient: float,
  forward: float,
  clean: Sequence[CleanJudging] = (),
) -> list[str]:
  """The estimate's total line, one line per attack and one per model's `clean` judging,
  from the seconds per image of a `gradient` and a `forward` pass; an attack without a
  registry cost is unpriced, and one recorded by an earlier run is not rerun."""
  lines, total, unpriced = [], 0.0, 0
  for p in attacks_planned:
    cost = p.spec.cost
    if p.recorded:
      lines.append(f'  {p.name}: already recorded in the output folder, not priced')
      continue
    if cost is None:
      unpriced += 1
      lines.append(f'  {p.name}: unpriced (its registry entry has no cost)')
      continue
    forwards = cost.forwards + p.judge_forwards
    seconds = p.images * (cost.gradients * gradient + forwards * forward)
    total += seconds
    lines.append(
      f'  {p.name}: ~{_duration(seconds)} ({p.images} images x {cost.gradients} gradients '
      f'and {forwards} forward passes)'
    )
  for c in clean:
    seconds = c.images * c.forwards * forward
    total += seconds
    lines.append(
      f'  judging the clean images of {c.name}, once for all its attacks: ~{_duration(seconds)} '
      f'({c.images} images x {c.forwards} forward passes)'
    )
  head = (
    f'estimate: ~{_duration(total)} in all, from a gradient at {gradient * 1e3:.3g} ms/image '
    f'(a forward pass at {forward * 1e3:.3g} ms/image) measured here; an upper bound where an '
    'attack stops early, compiling not counted'
  )
  head += f', {unpriced} unpriced attacks not counted.' if unpriced else '.'
  return [head, *lines]


def say_estimate(
  config: ml_collections.ConfigDict,
  attacks_planned: Sequence[Planned],
  clean: Sequence[CleanJudging],
  model: JudgedModel,
  split: data.HostSplit,
  mesh: jax.sharding.Mesh,
) -> None:
  """Measures `model` on the split (every process: the timed calls run on every device)
  and writes estimate_lines on the console (first process only)."""
  lines = estimate_lines(attacks_planned, *measure(config, model, split, mesh), clean)
  if jax.process_index() == 0:
    for line in lines:
      tqdm.write(line)
