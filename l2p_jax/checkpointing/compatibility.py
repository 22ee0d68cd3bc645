"""Whether a saved run's config and a new one describe the same steps: the fields that
refuse a resume, and the other differences it reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
from flax import traverse_util

from l2p_jax.checkpointing.manager import CheckpointMismatchError

# Config fields that decide the shapes and meaning of the saved variables.
STRUCTURE_FIELDS = ('method', 'model', 'data.dataset')
# Config fields that decide what a step of training is (its model, its batches, its
# random numbers): resuming a checkpoint with other values is refused.
STEP_FIELDS = STRUCTURE_FIELDS + (
  'seed',
  'batch_size',
  'data.train_split',
  'data.train_examples',
  'data.normalization',
  'optim.optimizer',
)  # SGD and Adam states differ.


def config_differences(
  saved_config: dict[str, Any], config: ml_collections.ConfigDict
) -> list[tuple[str, str]]:
  """Every flattened field on which a saved config and `config` disagree, as
  (field, 'checkpoint has X, config has Y'), sorted by field."""
  saved = traverse_util.flatten_dict(saved_config, sep='.')
  current = traverse_util.flatten_dict(config.to_dict(), sep='.')
  differences = []
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key, '<absent>'), current.get(key, '<absent>')
    if _normalize(old) != _normalize(new):
      differences.append((key, f'checkpoint has {old!r}, config has {new!r}'))
  return differences


def _among(field: str, fields: Sequence[str]) -> bool:
  return any(field == f or field.startswith(f + '.') for f in fields)


def check_compatible(
  saved_config: dict[str, Any], config: ml_collections.ConfigDict, where: str
) -> list[str]:
  """Raises CheckpointMismatchError naming every STEP_FIELDS difference; returns the
  other differences (and fields the saved config does not have) as
  'field: checkpoint has X, config has Y' lines."""
  differences = config_differences(saved_config, config)
  # A field the checkpoint's config lacks is newer than the checkpoint; its default
  # keeps the behaviour the run had, so it is reported, not refused.
  saved = traverse_util.flatten_dict(saved_config, sep='.')
  refused = [
    f'{key}: {change}' for key, change in differences if _among(key, STEP_FIELDS) and key in saved
  ]
  if refused:
    raise CheckpointMismatchError(
      f'The checkpoint in {where} was written for a different model or different '
      'steps (model, data, batch size or seed) than this config describes:\n  '
      + '\n  '.join(refused)
      + '\nUse the same values to resume, or a new --workdir to start a new run.'
    )
  return [f'{key}: {change}' for key, change in differences]


def _normalize(value: Any) -> Any:
  """JSON turns tuples into lists; compare them as equal."""
  return list(value) if isinstance(value, tuple) else value
