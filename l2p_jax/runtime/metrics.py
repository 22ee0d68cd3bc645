"""Where a run's numbers go: one JSON object per epoch in `metrics.jsonl`, TensorBoard
event files, all written by process 0 only."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from flax import traverse_util

from l2p_jax.runtime import files


class MetricsWriter:
  """Appends per-epoch records to DIR/metrics.jsonl and scalars to DIR/tensorboard."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.active = jax.process_index() == 0
    self._tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # Only process 0 imports the writer.

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def drop_epochs_from(self, epoch: int) -> None:
    """Forgets records of `epoch` and later: a resumed run writes them again."""
    if self.active and os.path.exists(self.path):
      kept = [r for r in read_metrics(self.path) if r['epoch'] < epoch]
      files.write_text(self.path, ''.join(json.dumps(r) + '\n' for r in kept))

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    """Writes flat or nested scalars to TensorBoard at `step`."""
    if self.active:
      for name, value in traverse_util.flatten_dict(values, sep='/').items():
        self._tb.add_scalar(name, value, step)

  def epoch(self, record: dict[str, Any]) -> None:
    """Appends one epoch's record to metrics.jsonl and its scalars to TensorBoard."""
    if self.active:
      files.append_line(self.path, json.dumps(record))  # A failed append leaves no half line.
      self.scalars(record['step'], {k: v for k, v in record.items() if k not in ('epoch', 'step')})
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
