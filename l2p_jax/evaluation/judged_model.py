"""A model as the evaluation attacks and judges it, whatever made it (`JudgedModel`): a
checkpoint of ours (`FlaxLogits`, runner.checkpoint_model) or any pure predict function
given to `evaluation.evaluate` (`PredictLogits`), so both take one code path."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from l2p_jax import models
from l2p_jax.attacks import LogitsFn

# (variables, noise, x, key) -> logits of a float32 NHWC batch x in [0, 1]; noise False
# is the model with its noise off. Hashable: the jitted attack and judgement take it as
# a static argument, so they compile once per model function, its variables traced.
Logits = Callable[[Any, bool, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FlaxLogits:
  """A Flax network in inference mode (BatchNorm's running statistics), its noise drawn
  from the 'noise' stream: a checkpoint's model."""

  model: nn.Module

  def __call__(self, variables: Any, noise: bool, x: jax.Array, key: jax.Array) -> jax.Array:
    return models.inference_logits(self.model, variables, noise)(x, key)


@dataclasses.dataclass(frozen=True)
class PredictLogits:
  """A user's `predict(x, key) -> logits` and, if given, the same model with its noise
  off (`noise_off`, None when there is none). The arrays they close over (weights) are
  the variables (`closed_over`), passed traced as a checkpoint's are, not compiled in as
  constants: compiling stays fast for large models, and a checkpoint's predict gives
  eval.py's bits."""

  predict: LogitsFn
  noise_off: LogitsFn | None = None

  def _function(self, noise: bool) -> LogitsFn:
    return self.predict if noise else self.noise_off

  def closed_over(self, x: jax.Array, key: jax.Array) -> dict[str, Any]:
    """The arrays that predict and noise_off close over (their jaxprs' constants at x's
    shape), by name."""
    functions = [f for f in (self.predict, self.noise_off) if f is not None]
    return {_name(c): c for f in functions for c in jax.make_jaxpr(f)(x, key).consts}

  def __call__(self, variables: Any, noise: bool, x: jax.Array, key: jax.Array) -> jax.Array:
    traced, shapes = jax.make_jaxpr(self._function(noise), return_shape=True)(
      _shape(x), _shape(key)
    )
    arrays = [variables.get(_name(c), c) for c in traced.consts]
    outputs = jax.core.eval_jaxpr(traced.jaxpr, arrays, x, key)
    return jax.tree.unflatten(jax.tree.structure(shapes), outputs)


def _shape(array: jax.Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(array.shape, array.dtype)


def _name(array: Any) -> str:
  """A closed-over array's name among the variables: its identity, which is the same at
  every trace of the function that holds it (and, the variables holding the array, no
  other object's)."""
  return str(id(array))


@dataclasses.dataclass(frozen=True, eq=False)
class JudgedModel:
  """One model under evaluation.

  logits: its Logits; variables: their traced argument (a checkpoint's weights, None
  for a predict function); randomized: it draws noise at test time (judged under
  config.judge.draws draws); authors_prediction: the (rule, draws) it is judged by when
  config.predict.rule is None; description: what its records and results.json's
  `checkpoints` say it is (checkpoint, step, workdir, method, arch, width); noise_off:
  logits with noise False exist (the noise-off attacks need them).
  """

  logits: Logits
  variables: Any
  randomized: bool
  authors_prediction: tuple[str, int]
  description: dict[str, Any]
  noise_off: bool = True

  @property
  def path(self) -> str:
    """Its name in records' `checkpoint` field (a checkpoint's step folder)."""
    return self.description['checkpoint']

  def logits_fn(self, noise: bool) -> LogitsFn:
    """Its logits as the attacks take them, (x, key) -> logits, with noise on or off."""
    return functools.partial(self.logits, self.variables, noise)
