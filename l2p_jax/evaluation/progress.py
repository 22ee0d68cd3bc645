"""What an evaluation shows so a person can follow it: before the first attack the plan
(attacks, images, judged draws) and a warning when the default attack list, sized for a
GPU, meets a CPU and many images; during each attack its bar (`AttackBar`), moved by the
attack's iterations from inside its compiled loops (attacks/progress.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import jax
import ml_collections
from tqdm import tqdm

from l2p_jax import data
from l2p_jax.attacks import progress as attack_progress
from l2p_jax.evaluation import eval_config
from l2p_jax.evaluation.attack_registry import AttackSpec

T = TypeVar('T')

# Above this many images the default list on a CPU takes hours: C&W alone took 522 s
# for 16 images of a tiny L2P model (issue 38).
CPU_IMAGES = 16


def plan_lines(config: ml_collections.ConfigDict, planned: int, images: int) -> list[str]:
  """The plan's line and, for the default attack list on a CPU with more than
  CPU_IMAGES images, a warning saying what to pass instead."""
  lines = [
    f'plan: {planned} attacks on {images} images, randomized models judged over '
    f'{config.judge.draws} noise draws; each attack has its bar (attack k/{planned}) counting '
    'its iterations with an ETA, and its record is written as soon as it ends.'
  ]
  default = config.attacks == eval_config.get_config().attacks
  if default and images > CPU_IMAGES and jax.default_backend() == 'cpu':
    lines.append(
      f'warning: the default attack list is sized for a GPU; on this CPU its {planned} '
      f'attacks on {images} images may take hours (C&W alone took 9 minutes for 16 images '
      'of a tiny model). Name fewer with --config.attacks or fewer images with '
      '--config.data.examples.'
    )
  return lines


def say_plan(config: ml_collections.ConfigDict, planned: int, images: int) -> None:
  """Writes plan_lines on the console (first process only)."""
  if jax.process_index() == 0:
    for line in plan_lines(config, planned, images):
      tqdm.write(line)


class AttackBar:
  """One attack's bar over its batches x its cost's iterations per batch (1 for an attack
  without loops or a cost), with tqdm's rate and ETA: moved by the attack's ticks during
  a batch (the largest fraction heard, a device's or another's) and to the batch's end
  after it. Shown on the first process only, when config.progress_bar asks for it."""

  def __init__(self, spec: AttackSpec, examples: int, config: ml_collections.ConfigDict, desc: str):
    self.per_batch = max(0 if spec.cost is None else spec.cost.iterations, 1)
    self.start = 0
    self.lock = threading.Lock()
    self.bar = tqdm(
      total=data.num_eval_batches(examples, config.batch_size) * self.per_batch,
      desc=desc,
      unit='it',
      dynamic_ncols=True,
      disable=not config.progress_bar or jax.process_index() != 0,
    )

  def heard(self, done: int, total: int) -> None:
    """`done` of `total` of the batch under way have run."""
    with self.lock:
      at = self.start + min(done * self.per_batch // max(total, 1), self.per_batch)
      if at > self.bar.n:
        self.bar.update(at - self.bar.n)

  def over(self, batches: Iterable[T]) -> Iterator[tuple[int, T]]:
    """(b, batch) of `batches`: while the caller holds one, the attack's ticks move the
    bar; when it asks for the next, the batch is complete. The bar closes at the end."""
    for b, batch in enumerate(batches):
      with self.lock:
        self.start = b * self.per_batch
      with attack_progress.listening(self.heard):
        yield b, batch
        jax.effects_barrier()  # Every tick of the batch heard before the next one starts.
      self.heard(1, 1)
    self.bar.close()
