"""What a run of a config builds before its first step, in one place: the method's network,
its optimizers, the step's settings and the initial train state. The training loop, the
parity trajectories and the benchmarks all start here, so they train the same program."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from l2p_jax import experiment, methods
from l2p_jax.training import optim
from l2p_jax.training import step as step_lib
from l2p_jax.training.rules import StepSettings
from l2p_jax.training.train_state import TrainState, create_train_state


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """A config's method record, network, optimizers (one per variable collection) and the
  step's settings."""

  method: methods.Method
  model: nn.Module
  optimizers: dict[str, optax.GradientTransformation]
  settings: StepSettings

  def initializer(
    self, image_shape: Sequence[int], out_shardings: Any = None
  ) -> Callable[[jax.Array], TrainState]:
    """The jitted train state at step 0 as a function of its initialization key."""
    return jax.jit(
      functools.partial(create_train_state, self.model, self.optimizers, image_shape=image_shape),
      out_shardings=out_shardings,
    )


def run_setup(
  config: ml_collections.ConfigDict,
  num_classes: int,
  mean: Sequence[float],
  std: Sequence[float],
  train_split_size: int,
  method: methods.Method | None = None,
) -> RunSetup:
  """The RunSetup of `config` for inputs normalized by (mean, std); train_split_size is
  Adv-BNN's N (see step.kl_loss_weight); `method` is config.method's record when the
  caller has looked it up already."""
  method = method or methods.get(config.method)
  return RunSetup(
    method=method,
    model=experiment.build_model(config, method, num_classes, mean, std),
    optimizers=optim.make_optimizers(
      config.optim.momentum,
      config.optim.nesterov,
      config.optim.weight_decay,
      config.optim.optimizer,
    ),
    settings=StepSettings.from_config(
      config, method, kl_weight=step_lib.kl_loss_weight(config, train_split_size)
    ),
  )


def init_key(seed: int) -> jax.Array:
  """The key of a run's initial parameters: config.seed's initialization stream."""
  return jax.random.fold_in(jax.random.key(seed), step_lib.INIT_STREAM)
