"""What an evaluation says before its first attack, so a person can follow it: the plan
(attacks, images, judged draws) and a warning when the default attack list, sized for a
GPU, meets a CPU and many images."""

from __future__ import annotations

import jax
import ml_collections
from tqdm import tqdm

from l2p_jax.evaluation import eval_config

# Above this many images the default list on a CPU takes hours: C&W alone took 522 s
# for 16 images of a tiny L2P model (issue 38).
CPU_IMAGES = 16


def plan_lines(config: ml_collections.ConfigDict, planned: int, images: int) -> list[str]:
  """The plan's line and, for the default attack list on a CPU with more than
  CPU_IMAGES images, a warning saying what to pass instead."""
  lines = [
    f'plan: {planned} attacks on {images} images, randomized models judged over '
    f'{config.judge.draws} noise draws; each attack has its bar (attack k/{planned}) with '
    'an ETA from its first batch, and its record is written as soon as it ends.'
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
