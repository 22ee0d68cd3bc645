"""Optimizers for the two variable collections: the network weights and the noise
parameters (SGD as every paper here; Adam as Adv-BNN's code).

Each collection has its own optax transformation and state, so that Learn2Perturb
can update one while the other is held fixed (its alternating back-propagation)
without moving the fixed one's momentum; the joint methods update both from one
gradient. The learning rate is a pure function of the epoch, applied outside the
transformation, so an extra update of one collection never shifts the schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax


def sgd(
  momentum: float, nesterov: bool, weight_decay: float, decay_mask: Any = None
) -> optax.GradientTransformation:
  """PyTorch-style SGD direction: decay added to the gradient, then (Nesterov) momentum.

  The result is multiplied by -learning_rate in `apply_updates`, which reproduces
  `torch.optim.SGD(weight_decay=..., momentum=..., nesterov=...)` exactly.
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=decay_mask),
    optax.trace(decay=momentum, nesterov=nesterov),
  )


def adam(weight_decay: float, decay_mask: Any = None) -> optax.GradientTransformation:
  """PyTorch-style Adam direction (betas 0.9/0.999, eps 1e-8, decay added to the
  gradient), as `torch.optim.Adam` in Adv-BNN's code once multiplied by -lr."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=decay_mask),
    optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
  )


OPTIMIZERS = ('sgd', 'adam')


def make_optimizers(
  momentum: float, nesterov: bool, weight_decay: float, optimizer: str = 'sgd'
) -> dict[str, optax.GradientTransformation]:
  """One transformation per collection; the `perturb` collection is masked out of
  weight decay (noise parameters get none, as in every paper compared here).
  `optimizer='adam'` ignores momentum and nesterov."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}.')
  no_decay = lambda tree: jax.tree.map(lambda _: False, tree)  # noqa: E731
  if optimizer == 'adam':
    return {'params': adam(weight_decay), 'perturb': adam(weight_decay, no_decay)}
  return {
    'params': sgd(momentum, nesterov, weight_decay),
    'perturb': sgd(momentum, nesterov, weight_decay, decay_mask=no_decay),
  }


def learning_rate(epoch: int, base: float, boundaries: Sequence[int], decay: float) -> float:
  """Piecewise-constant schedule: `base` times `decay` per boundary epoch passed."""
  return base * decay ** sum(epoch >= b for b in boundaries)


def update(
  tx: optax.GradientTransformation, grads: Any, opt_state: Any, variables: Any, lr: jax.Array
) -> tuple[Any, Any]:
  """One update of one collection; returns (new variables, new optimizer state)."""
  direction, opt_state = tx.update(grads, opt_state, variables)
  new = jax.tree.map(lambda v, d: (v - lr * d).astype(v.dtype), variables, direction)
  return new, opt_state
