"""The attacks an evaluation can run, in two tables: ATTACK_FUNCTIONS, the function an
`AttackSpec` runs by its `attack`, and ATTACKS, the names config.attacks accepts, each
with the specs it plans from the config (`plan_attacks`).

A spec's text is its identity: its key_id (a CRC-32 of its repr) picks its random
numbers and names its records, so the spec's fields, their order and values are part of
every earlier result's key and must not change. Settings that change only how fast an
attack runs (loop unrolling, chunks of candidates) are the spec's `speed`, outside its
text: a rerun with other speed settings meets the same random numbers.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from l2p_jax import attacks
from l2p_jax.errors import UserError


class EvaluationError(UserError, ValueError):
  """A request the evaluation cannot serve, with one message saying what to do."""


def _clean(
  logits_fn: attacks.LogitsFn, key: jax.Array, x: jax.Array, y: jax.Array
) -> attacks.AttackResult:
  """No attack: the inputs themselves, so clean accuracy runs through the same path."""
  del logits_fn, key
  return attacks.AttackResult(x, jnp.zeros(y.shape, bool), jnp.zeros(y.shape, x.dtype))


# The function each AttackSpec runs, by its `attack` (the records' 'attack' field).
ATTACK_FUNCTIONS: dict[str, Callable[..., attacks.AttackResult]] = {
  'clean': _clean,
  'fgsm': attacks.fgsm,
  'pgd': attacks.pgd,
  'cw': attacks.cw_l2,
  'apgd_rand': attacks.autoattack_rand,
  'few_pixel': attacks.few_pixel,
}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack with every parameter that changes its result.

  attack: a key of ATTACK_FUNCTIONS; params: its static keyword arguments that change
  its result; eps: the L-inf radius (None for attacks without one), passed traced so
  that an eps sweep compiles once; examples: attack only the first N examples of the
  split (0: all); attack_noise: False makes the examples on the checkpoint with its
  noise off (the mean network), which are then judged with the noise on (an adaptive
  attack on noise defenses); speed: keyword arguments that change only the speed,
  outside the spec's text and equality.
  """

  attack: str
  params: tuple[tuple[str, Any], ...] = ()
  eps: float | None = None
  examples: int = 0
  attack_noise: bool = True
  speed: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), repr=False, compare=False)

  def __post_init__(self):
    if self.attack not in ATTACK_FUNCTIONS:
      raise ValueError(
        f'Unknown attack {self.attack!r}; expected one of {tuple(ATTACK_FUNCTIONS)}.'
      )

  @property
  def function(self) -> Callable[..., attacks.AttackResult]:
    """The attack function this spec runs."""
    return ATTACK_FUNCTIONS[self.attack]

  @property
  def arguments(self) -> tuple[tuple[str, Any], ...]:
    """Every static keyword argument of the function: params, then speed settings."""
    return self.params + self.speed

  @property
  def key_id(self) -> int:
    """The number folded into the seed's key for this attack (stable across runs)."""
    return zlib.crc32(repr(self).encode()) & 0x7FFFFFFF

  @property
  def name(self) -> str:
    """A readable one-line description, e.g. 'pgd(steps=20, ..., eps=8/255)'."""
    parts = [f'{k}={v}' for k, v in self.params]
    if self.eps is not None:
      parts.append(f'eps={self.eps * 255:g}/255')
    if self.examples:
      parts.append(f'first {self.examples}')
    if not self.attack_noise:
      parts.append('noise off')
    return f'{self.attack}({", ".join(parts)})'

  def describe(self) -> dict[str, Any]:
    """The parameters as a JSON-ready dict."""
    return {
      **dict(self.params),
      'eps': self.eps,
      'examples': self.examples,
      'attack_noise': self.attack_noise,
    }


def listed_names(value: str | Sequence[str]) -> list[str]:
  """The items of a comma-separated string or of a sequence of such strings, as
  config.attacks and the --workdir and --checkpoint flags take them."""
  items = [value] if isinstance(value, str) else list(value)
  return [name.strip() for item in items for name in item.split(',') if name.strip()]


# --- the specs of each config.attacks name ------------------------------------------


def _unroll(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The speed setting of the attacks with loops: unrolled or not (config.unroll)."""
  return (('unroll', True if config.unroll else 1),)


def _pgd(
  config: ml_collections.ConfigDict,
  steps: int,
  eps: float,
  eot_draws: int = 1,
  attack_noise: bool = True,
) -> AttackSpec:
  """PGD (with EOT over `eot_draws` draws) of `steps` steps at `eps`, config.pgd's
  other settings, on the checkpoint with its noise on or off."""
  p = config.pgd
  return AttackSpec(
    'pgd',
    (
      ('steps', steps),
      ('step_size', p.step_size),
      ('random_start', p.random_start),
      ('restarts', p.restarts),
      ('eot_draws', eot_draws),
    ),
    eps,
    attack_noise=attack_noise,
    speed=_unroll(config),
  )


def _few_pixel(config: ml_collections.ConfigDict, n_pixels: int) -> AttackSpec:
  """The few-pixel attack on `n_pixels` pixels with config.few_pixel's settings."""
  f = config.few_pixel
  return AttackSpec(
    'few_pixel',
    (('n_pixels', n_pixels), ('population', f.population), ('iterations', f.iterations)),
    None,
    f.examples,
    speed=(('chunk_size', f.chunk_size),),
  )


# PNI's C&W settings (He et al. 2019's attack code), run by the `cw_pni` preset whatever
# config.cw says, so that the authors' C&W column can still be reported beside ours.
PNI_CW = ml_collections.FrozenConfigDict(
  {'c_init': 0.01, 'learning_rate': 5e-4, 'kappa': 0.0, 'binary_steps': 9, 'steps': 10}
)


def _cw(
  config: ml_collections.ConfigDict, cw: ml_collections.ConfigDict | None = None
) -> AttackSpec:
  """C&W L2 with the settings `cw` (default config.cw's)."""
  cw = config.cw if cw is None else cw
  return AttackSpec(
    'cw',
    (
      ('c_init', cw.c_init),
      ('learning_rate', cw.learning_rate),
      ('kappa', cw.kappa),
      ('binary_steps', cw.binary_steps),
      ('steps', cw.steps),
    ),
    speed=_unroll(config),
  )


def _apgd(config: ml_collections.ConfigDict, attack_noise: bool = True) -> AttackSpec:
  """AutoAttack's 'rand' version (APGD-CE and APGD-DLR with EOT over config.apgd's
  draws), or with the noise off APGD on the mean network (one draw is all it has)."""
  return AttackSpec(
    'apgd_rand',
    (('steps', config.apgd.steps), ('eot_draws', config.apgd.eot_draws if attack_noise else 1)),
    config.eps,
    attack_noise=attack_noise,
    speed=_unroll(config),
  )


def _eps_sweep(config: ml_collections.ConfigDict) -> list[AttackSpec]:
  """FGSM and PGD at every eps of config.eps_sweep.eps_255 (in 1/255 units); PGD takes
  eps_sweep.steps steps of eps_sweep.step_fraction * eps, so that every radius is crossed
  in the same number of steps, with config.pgd's random start and restarts."""
  sweep = config.eps_sweep
  pgd = (
    ('steps', sweep.steps),
    ('step_fraction', sweep.step_fraction),
    ('random_start', config.pgd.random_start),
    ('restarts', config.pgd.restarts),
    ('eot_draws', 1),
  )
  return [
    spec
    for e in sweep.eps_255
    for spec in (
      AttackSpec('fgsm', (), e / 255),
      AttackSpec('pgd', pgd, e / 255, speed=_unroll(config)),
    )
  ]


@dataclasses.dataclass(frozen=True)
class RegisteredAttack:
  """A name of config.attacks: its specs as a function of (config, N of `name<N>`: 0
  when not given, accepted only when `counted`); none for 'transfer', which asks for
  the transfer matrix instead."""

  specs: Callable[[ml_collections.ConfigDict, int], list[AttackSpec]]
  counted: bool = False


# Every attack evaluation runs, by its name in config.attacks.
ATTACKS: dict[str, RegisteredAttack] = {
  'clean': RegisteredAttack(lambda c, n: [AttackSpec('clean')]),
  'fgsm': RegisteredAttack(lambda c, n: [AttackSpec('fgsm', (), c.eps)]),
  'pgd': RegisteredAttack(lambda c, n: [_pgd(c, n or c.pgd.steps, c.eps)], counted=True),
  'eot_pgd': RegisteredAttack(
    lambda c, n: [_pgd(c, n or c.pgd.steps, c.eps, c.eot.draws)], counted=True
  ),
  'eps_sweep': RegisteredAttack(lambda c, n: _eps_sweep(c)),
  'cw': RegisteredAttack(lambda c, n: [_cw(c)]),
  'cw_pni': RegisteredAttack(lambda c, n: [_cw(c, PNI_CW)]),
  'apgd': RegisteredAttack(lambda c, n: [_apgd(c)]),
  # Made on the mean network (noise off), judged on the noisy one; randomized models only.
  'noise_off_pgd': RegisteredAttack(
    lambda c, n: [_pgd(c, n or c.pgd.steps, c.eps, attack_noise=False)], counted=True
  ),
  'noise_off_apgd': RegisteredAttack(lambda c, n: [_apgd(c, attack_noise=False)]),
  'few_pixel': RegisteredAttack(
    lambda c, n: [_few_pixel(c, p) for p in ((n,) if n else c.few_pixel.pixels)], counted=True
  ),
  'transfer': RegisteredAttack(lambda c, n: []),
}
ATTACK_NAMES = tuple(
  f'{name}{suffix}'
  for name, entry in ATTACKS.items()
  for suffix in ('', '<N>')[: 1 + entry.counted]
)


def plan_attacks(
  config: ml_collections.ConfigDict, names: str | Sequence[str] | None = None
) -> tuple[list[AttackSpec], bool]:
  """The white-box attacks that `names` (default: config.attacks) asks for, with their
  parameters from `config` and duplicates removed (the eps sweep's FGSM at the headline
  eps is the headline FGSM), and whether the transfer matrix is asked for."""
  specs, transfer = [], False
  for name in listed_names(config.attacks if names is None else names):
    base, number = re.fullmatch(r'(.*?)(\d*)', name).groups()
    if base not in ATTACKS or (number and not ATTACKS[base].counted):
      raise EvaluationError(
        f'Unknown attack {name!r} in config.attacks; accepted: {", ".join(ATTACK_NAMES)}.'
      )
    if number and int(number) < 1:
      raise EvaluationError(f'Attack {name!r} needs a count of at least 1.')
    specs += ATTACKS[base].specs(config, int(number or 0))
    transfer |= base == 'transfer'
  return list(dict.fromkeys(specs)), transfer
