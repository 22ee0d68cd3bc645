"""The train state (variables, optimizer states, step count), the epoch's metric sums
checkpointed beside it, and their creation, checkpoint layout and optimizer restart."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from l2p_jax import models


@flax.struct.dataclass
class TrainState:
  """The variables, the optimizer states and the step count: what a step updates."""

  step: jax.Array
  params: Any
  perturb: Any
  batch_stats: Any
  opt_state: Any  # {'params': ..., 'perturb': ...}, one optax state per collection.

  @property
  def variables(self) -> dict[str, Any]:
    return {'params': self.params, 'perturb': self.perturb, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class EpochMetrics:
  """The current epoch's step metrics summed so far, checkpointed beside the state so
  a resumed epoch reports what an uninterrupted one would."""

  loss_sum: jax.Array  # Sum of step losses.
  correct_sum: jax.Array  # Clean training examples classified right.
  seen: jax.Array  # Training examples seen.
  nonfinite_step: jax.Array  # First step with a non-finite loss or state, -1 if none.

  @classmethod
  def empty(cls) -> EpochMetrics:
    """No step yet (NumPy values, for the loop to place on its mesh)."""
    return cls(np.float32(0), np.int32(0), np.int32(0), np.int32(-1))

  def add(self, metrics: dict[str, jax.Array]) -> EpochMetrics:
    """These sums with one more step's `metrics` (as `train_step` returns them)."""
    nonfinite = (self.nonfinite_step < 0) & ~metrics['finite']
    return EpochMetrics(
      loss_sum=self.loss_sum + metrics['loss'],
      correct_sum=self.correct_sum + metrics['correct'],
      seen=self.seen + metrics['count'],
      nonfinite_step=jnp.where(nonfinite, metrics['step'], self.nonfinite_step),
    )


def checkpoint_tree(state: TrainState, metrics: EpochMetrics) -> dict[str, Any]:
  """The state's and the epoch metrics' fields as the one dict a checkpoint holds (the
  layout of the checkpoints written when the sums were fields of the state)."""
  return {
    f.name: getattr(tree, f.name) for tree in (state, metrics) for f in dataclasses.fields(tree)
  }


def from_checkpoint_tree(tree: dict[str, Any]) -> tuple[TrainState, EpochMetrics]:
  """`checkpoint_tree`'s inverse: (state, epoch metrics)."""
  fields = lambda cls: {f.name: tree[f.name] for f in dataclasses.fields(cls)}
  return TrainState(**fields(TrainState)), EpochMetrics(**fields(EpochMetrics))


def create_train_state(
  model: models.ResNet, optimizers: dict, key: jax.Array, image_shape: tuple[int, ...]
) -> TrainState:
  """Initial variables (from `key`) and optimizer states."""
  params_key, noise_key = jax.random.split(key)
  variables = model.init(
    {'params': params_key, 'noise': noise_key}, jnp.zeros((1, *image_shape), jnp.float32)
  )
  perturb = variables.get('perturb', {})
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables['params'],
    perturb=perturb,
    batch_stats=variables['batch_stats'],
    opt_state={
      'params': optimizers['params'].init(variables['params']),
      'perturb': optimizers['perturb'].init(perturb),
    },
  )


def restart_optimizers(state: TrainState, optimizers: dict) -> TrainState:
  """Fresh optimizer states for both collections (Adv-BNN's code makes a new Adam
  at every learning-rate stage); the variables stay as they are."""
  return state.replace(
    opt_state={c: optimizers[c].init(getattr(state, c)) for c in ('params', 'perturb')}
  )
