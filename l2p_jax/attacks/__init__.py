"""Adversarial attacks as pure, jittable functions of (logits_fn, key, x, y, **params).

`logits_fn(x, key)` maps NHWC inputs in [0, 1] to logits, drawing the model's noise
from `key`; every attack derives all its randomness from its own `key` and returns an
`AttackResult(x_adv, success, l2)`. Keep the keyword parameters static under `jax.jit`,
e.g. `jax.jit(functools.partial(pgd, logits_fn, eps=8/255, steps=7, step_size=0.01))`.
"""

from l2p_jax.attacks.apgd import apgd, autoattack_rand, checkpoint_steps
from l2p_jax.attacks.autoattack import apgd_targeted, autoattack
from l2p_jax.attacks.core import (
  LOSSES,
  AttackResult,
  LogitsFn,
  LossFn,
  cross_entropy,
  cw_margin,
  dlr,
  dlr_targeted,
  eot_evaluate,
  eot_value_and_grad,
  first_success,
  get_loss,
  linf_project,
  linf_random_start,
  sign_step,
)
from l2p_jax.attacks.cw import cw_l2
from l2p_jax.attacks.few_pixel import few_pixel
from l2p_jax.attacks.pgd import fgsm, pgd, pgd_noise_keys
from l2p_jax.attacks.square import square

__all__ = [
  'AttackResult',
  'LOSSES',
  'LogitsFn',
  'LossFn',
  'apgd',
  'apgd_targeted',
  'autoattack',
  'autoattack_rand',
  'checkpoint_steps',
  'cross_entropy',
  'cw_l2',
  'cw_margin',
  'dlr',
  'dlr_targeted',
  'eot_evaluate',
  'eot_value_and_grad',
  'fgsm',
  'few_pixel',
  'first_success',
  'get_loss',
  'linf_project',
  'linf_random_start',
  'pgd',
  'pgd_noise_keys',
  'sign_step',
  'square',
]
