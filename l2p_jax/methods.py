"""The registry of defenses: one record per method, which the rest of the library asks
instead of comparing method names.

A new defense is one `register(Method(...))` call; training, evaluation and the grid
then know it by `config.method`.
"""

from __future__ import annotations

import dataclasses

from l2p_jax.errors import UserError


class UnknownMethodError(UserError, ValueError):
  """A method name that no record is registered under."""


@dataclasses.dataclass(frozen=True)
class Method:
  """One defense.

  name: `config.method`; title: its name in tables; randomized: its network draws noise
  at test time (and is judged over draws); config_section: the config section of its own
  settings (None: it has none); authors_prediction: (rule, draws) of the prediction its
  authors judge it by.
  """

  name: str
  title: str
  randomized: bool
  config_section: str | None = None
  authors_prediction: tuple[str, int] = ('single', 1)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` to the registry (replacing a record of the same name) and returns it."""
  _REGISTRY[method.name] = method
  return method


def get(name: str) -> Method:
  """The record of method `name`; UnknownMethodError naming the known ones if none."""
  if name not in _REGISTRY:
    raise UnknownMethodError(f'Unknown method {name!r}; expected one of {names()}.')
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered methods' names, in registration order (the paper's table order)."""
  return tuple(_REGISTRY)


NONE = register(Method('none', 'No defence', randomized=False))
VANILLA = register(Method('vanilla', 'Vanilla', randomized=False))
PNI = register(Method('pni', 'PNI-W', randomized=True))
# Adv-BNN's acc_under_attack.py sums the softmax of 50 weight draws.
ADV_BNN = register(
  Method(
    'adv_bnn',
    'Adv-BNN',
    randomized=True,
    config_section='bnn',
    authors_prediction=('mean_softmax', 50),
  )
)
L2P = register(Method('l2p', 'Learn2Perturb', randomized=True, config_section='l2p'))

# The paper's five methods; the registry may hold more (a user's own defense).
METHODS = names()
