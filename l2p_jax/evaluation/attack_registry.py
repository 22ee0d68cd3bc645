"""The attacks an evaluation can run: one `Attack` entry per attack function, carrying
everything the rest of the evaluation reads about it (config.attacks names and bounds,
column title and place, threat model, worst case, sanity-check role), registered with
`register_attack`; `AttackSpec`, one attack with its parameters; `plan_attacks`, the
specs that config.attacks asks for. The built-in attacks register in builtin_attacks.py.

A spec's text is its identity: its key_id (a CRC-32 of its repr) picks its random
numbers and names its records, so the spec's fields, their order and values are part of
every earlier result's key and must not change. Settings that change only how fast an
attack runs (loop unrolling, chunks of candidates) are the spec's `speed`, outside its
text: a rerun with other speed settings meets the same random numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections

from l2p_jax import attacks
from l2p_jax.errors import UserError


class EvaluationError(UserError, ValueError):
  """A request the evaluation cannot serve, with one message saying what to do."""


# Threat models: what an attack's perturbation is bounded by.
CLEAN, LINF, L2, L0 = 'clean', 'linf', 'l2', 'l0'
THREAT_MODELS = {
  CLEAN: 'no perturbation (the inputs themselves)',
  LINF: 'an L-inf ball of radius eps (the headline config.eps or a sweep radius)',
  L2: 'L2 minimum norm, unbounded (its cells add the mean L2 of what fooled the model)',
  L0: 'L0: a few pixels changed without bound',
}
# Roles in the sanity checks (sanity.py) and the accuracy-vs-eps curves.
ITERATIVE, SINGLE_STEP, GRADIENT_FREE = 'iterative', 'single_step', 'gradient_free'
ROLES = ('', ITERATIVE, SINGLE_STEP, GRADIENT_FREE)
TRANSFER = 'transfer'  # The config.attacks name of the transfer matrix.


class Cost(NamedTuple):
  """What an attack costs per attacked image: input gradients and forward passes (one
  noise draw each, every EOT draw counted; an upper bound where it stops early), the
  iterations its loops run (what its progress bar counts), and which measured gradient
  rate of benchmarks/eval_projection prices its gradients ('pgd7': one at a time,
  'eot_pgd': averaged over EOT draws, 'apgd'; 'forward' for an attack without gradients)."""

  gradients: int
  forwards: int
  iterations: int
  rate: str = 'pgd7'


@dataclasses.dataclass(frozen=True)
class Preset:
  """A name of config.attacks: its specs as a function of (config, N of `name<N>`: 0
  when not given, accepted only when `counted`)."""

  specs: Callable[[ml_collections.ConfigDict, int], list[AttackSpec]]
  counted: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Attack:
  """One attack as the evaluation knows it.

  name: AttackSpec.attack and the records' 'attack'; function: the pure attack
  (logits_fn, key, x, y, **params, eps=...) -> AttackResult; threat_model: a key of
  THREAT_MODELS; title: a record's params -> its column title (results.md, REPORT.md);
  column: where its columns stand in the attack table (smaller left); presets: its
  names in config.attacks; bounds: (config field, lowest value) pairs validate_config
  checks; worst_case: its records at the headline eps join the per-image worst case;
  transfer: the transfer matrix makes its examples (with its first preset); budget: the
  parameter that orders its columns; role: ITERATIVE, SINGLE_STEP or GRADIENT_FREE for
  the sanity checks and eps curves ('' none); note: a sentence results.md adds when it
  was run; randomized: (planned spec, config) -> the spec a randomized model (noise on)
  runs instead (None: the planned spec for every model; AttackSpec.for_model); cost: a
  spec's params -> its Cost per image (None: unpriced, its bar counting batches).
  """

  name: str
  function: Callable[..., attacks.AttackResult]
  threat_model: str
  title: Callable[[dict[str, Any]], str]
  column: float
  presets: Mapping[str, Preset]
  bounds: tuple[tuple[str, int], ...] = ()
  worst_case: bool = False
  transfer: bool = False
  budget: str = 'steps'
  role: str = ''
  note: str = ''
  randomized: Callable[[AttackSpec, ml_collections.ConfigDict], AttackSpec] | None = None
  cost: Callable[[dict[str, Any]], Cost] | None = None


_REGISTRY: dict[str, Attack] = {}


def registered_attacks() -> tuple[Attack, ...]:
  """Every registered attack, in the order of registration."""
  return tuple(_REGISTRY.values())


def attack_entry(name: str) -> Attack:
  """The registered attack `name`; EvaluationError naming the registered ones if none."""
  if name not in _REGISTRY:
    raise EvaluationError(
      f'Unknown attack {name!r}; registered: {", ".join(_REGISTRY)} (register_attack adds one).'
    )
  return _REGISTRY[name]


def _preset_names() -> dict[str, Preset]:
  return {name: preset for entry in _REGISTRY.values() for name, preset in entry.presets.items()}


def register_attack(entry: Attack) -> Attack:
  """Adds `entry` to the attacks every evaluation can run and returns it; ValueError
  when it clashes with a registered attack or is not complete."""
  taken = _preset_names()
  problems = [
    f'the attack {entry.name!r} is registered' if entry.name in _REGISTRY else '',
    f'threat_model must be one of {tuple(THREAT_MODELS)}'
    if entry.threat_model not in THREAT_MODELS
    else '',
    f'role must be one of {ROLES}' if entry.role not in ROLES else '',
    'it needs at least one preset (its names in config.attacks)' if not entry.presets else '',
    'function and title must be callable'
    if not (callable(entry.function) and callable(entry.title))
    else '',
    'column must be a number' if not isinstance(entry.column, (int, float)) else '',
    'cost must be None or callable' if not (entry.cost is None or callable(entry.cost)) else '',
    *(
      f'config.attacks name {n!r} is taken or ends in a digit'
      for n in entry.presets
      if n in taken or n == TRANSFER or not re.fullmatch(r'.*\D', n)
    ),
    *(
      f'column {entry.column} is taken by {other.name!r}'
      for other in _REGISTRY.values()
      if other.column == entry.column
    ),
  ]
  problems = [p for p in problems if p]
  if problems:
    raise ValueError(f'Cannot register attack {entry.name!r}: {"; ".join(problems)}.')
  _REGISTRY[entry.name] = entry
  return entry


def unregister_attack(name: str) -> None:
  """Removes the registered attack `name` (a notebook's or a test's)."""
  attack_entry(name)
  del _REGISTRY[name]


@contextlib.contextmanager
def registered(entry: Attack) -> Iterator[Attack]:
  """`entry` registered for the duration of a with block, then removed."""
  register_attack(entry)
  try:
    yield entry
  finally:
    unregister_attack(entry.name)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack with every parameter that changes its result.

  attack: a registered attack's name; params: its static keyword arguments that change
  its result; eps: the L-inf radius (None for attacks without one), passed traced so
  that an eps sweep compiles once; examples: attack only the first N examples of the
  split (0: all); attack_noise: False makes the examples on the checkpoint with its
  noise off (the mean network), which are then judged with the noise on (an adaptive
  attack on noise defenses); speed: keyword arguments that change only the speed,
  outside the spec's text and equality. `entry`, its registry entry, is looked up once.
  """

  attack: str
  params: tuple[tuple[str, Any], ...] = ()
  eps: float | None = None
  examples: int = 0
  attack_noise: bool = True
  speed: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), repr=False, compare=False)
  entry: Attack = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, 'entry', attack_entry(self.attack))

  @property
  def function(self) -> Callable[..., attacks.AttackResult]:
    """The attack function this spec runs."""
    return self.entry.function

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

  def for_model(self, config: ml_collections.ConfigDict, randomized: bool) -> AttackSpec:
    """The spec a model runs: for a randomized one attacked with its noise on, its
    entry's `randomized` variant (e.g. with EOT draws); for a deterministic one this
    planned spec with one EOT draw where its params have `eot_draws` (every draw gives
    the same logits); else this planned spec."""
    adapt = self.entry.randomized
    if randomized:
      return adapt(self, config) if adapt and self.attack_noise else self
    params = tuple((k, 1 if k == 'eot_draws' else v) for k, v in self.params)
    return dataclasses.replace(self, params=params) if params != self.params else self

  @property
  def cost(self) -> Cost | None:
    """Its entry's Cost per image for these params (None: the entry has no `cost`)."""
    return None if self.entry.cost is None else self.entry.cost(dict(self.params))

  def priced(self) -> Cost:
    """`cost`, or EvaluationError when its registry entry has none."""
    if self.cost is None:
      raise EvaluationError(
        f'The attack {self.attack!r} has no cost: give its registry entry (Attack) a `cost`, '
        'its params -> Cost(gradients, forwards, iterations) per image.'
      )
    return self.cost

  def describe(self) -> dict[str, Any]:
    """The parameters as a JSON-ready dict."""
    return {
      **dict(self.params),
      'eps': self.eps,
      'examples': self.examples,
      'attack_noise': self.attack_noise,
    }


def attack_title(record: dict[str, Any]) -> str:
  """A record's column title, by its attack's entry: Clean, FGSM, PGD-7, C&W, 1 px, ..."""
  return attack_entry(record['attack']).title(record['params'])


def from_source(record: dict[str, Any]) -> str:
  """' from <source label>' for a transfer record, '' for a white-box one."""
  return f' from {record["source"]["label"]}' if record['source'] else ''


def listed_names(value: str | Sequence[str]) -> list[str]:
  """The items of a comma-separated string or of a sequence of such strings, as
  config.attacks and the --workdir and --checkpoint flags take them."""
  items = [value] if isinstance(value, str) else list(value)
  return [name.strip() for item in items for name in item.split(',') if name.strip()]


def attack_names() -> tuple[str, ...]:
  """The names config.attacks accepts, `<N>` marking a count."""
  names = [f'{n}{s}' for n, p in _preset_names().items() for s in ('', '<N>')[: 1 + p.counted]]
  return (*names, TRANSFER)


def plan_attacks(
  config: ml_collections.ConfigDict, names: str | Sequence[str] | None = None
) -> tuple[list[AttackSpec], bool]:
  """The white-box attacks that `names` (default: config.attacks) asks for, with their
  parameters from `config` and duplicates removed (the eps sweep's FGSM at the headline
  eps is the headline FGSM), and whether the transfer matrix is asked for."""
  presets, specs, transfer = _preset_names(), [], False
  for name in listed_names(config.attacks if names is None else names):
    base, number = re.fullmatch(r'(.*?)(\d*)', name).groups()
    if name == TRANSFER:
      transfer = True
      continue
    if base not in presets or (number and not presets[base].counted):
      raise EvaluationError(
        f'Unknown attack {name!r} in config.attacks; accepted: {", ".join(attack_names())}.'
      )
    if number and int(number) < 1:
      raise EvaluationError(f'Attack {name!r} needs a count of at least 1.')
    specs += presets[base].specs(config, int(number or 0))
  return list(dict.fromkeys(specs)), transfer


def transfer_specs(config: ml_collections.ConfigDict) -> list[AttackSpec]:
  """The attacks whose examples the transfer matrix makes on every source (each
  `transfer` entry's first preset), in the order of registration."""
  return [
    spec
    for entry in _REGISTRY.values()
    if entry.transfer
    for spec in next(iter(entry.presets.values())).specs(config, 0)
  ]
