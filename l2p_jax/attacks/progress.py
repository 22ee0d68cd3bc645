"""Progress reported from inside an attack's compiled loops, so that a bar can move while
one jitted call runs: each loop says `tick(done, total)` after an iteration, nested
loops place their inner loop's ticks in their own span with `part` (or `within`), and
an attack traced inside `reporting()` turns the ticks into `jax.debug.callback` calls
carrying the fraction of the whole attack done, as (done, total) integers, to the
host's `listening` function.

Traced outside `reporting()` (the default: the training step's PGD, any caller that did
not ask) a tick adds nothing to the program. A callback may run once per device, in any
order: a listener keeps the largest fraction it saw, not a count of calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

Listener = Callable[[int, int], None]
TICKS = 10  # Callbacks per run of a loop at most: each costs a host round trip.

_parts: list[tuple[jax.Array | int, int, int]] = []  # Trace time: (offset, span, total).
_reporting: list[bool] = []  # Trace time: whether ticks become callbacks.
_listener: list[Listener] = []  # Run time: who hears the ticks.


@contextlib.contextmanager
def reporting(on: bool = True) -> Iterator[None]:
  """While an attack is traced inside this block with `on`, its ticks are compiled into
  callbacks; with `on` False nothing changes."""
  _reporting.append(on)
  try:
    yield
  finally:
    _reporting.pop()


@contextlib.contextmanager
def part(offset: jax.Array | int, total: int, span: int = 1) -> Iterator[None]:
  """The ticks traced inside this block fill [offset, offset + span] of `total` units of
  the enclosing loop: e.g. restart r of R is part(r, R), a stage of 100 iterations
  after 20 others of 220 in all is part(20, 220, 100)."""
  _parts.append((offset, span, total))
  try:
    yield
  finally:
    _parts.pop()


def tick(done: jax.Array | int, total: jax.Array | int) -> None:
  """Says that `done` of the innermost loop's `total` iterations have run (nothing when
  the attack is not traced inside `reporting()`); a loop of more than TICKS iterations
  calls back every total // TICKS of them and at its end."""
  if not (_reporting and _reporting[-1]):
    return
  done, total = jnp.asarray(done, jnp.int32), jnp.asarray(total, jnp.int32)
  due = (done % jnp.maximum(total // TICKS, 1) == 0) | (done == total)
  for offset, span, outer in reversed(_parts):
    done, total = offset * total + span * done, outer * total
  jax.lax.cond(due, lambda: jax.debug.callback(_heard, done, total), lambda: None)


def _heard(done: np.ndarray, total: np.ndarray) -> None:
  if _listener:
    _listener[-1](int(done), int(total))


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
  """Sends the ticks of the attacks that run inside this block to listener(done, total)."""
  _listener.append(listener)
  try:
    yield
  finally:
    _listener.pop()


def within(offset: jax.Array | int, total: int, fn: Callable, span: int = 1) -> Callable:
  """`fn` whose ticks fill part(offset, total, span) of the enclosing loop."""

  def run(*args, **kwargs):
    with part(offset, total, span):
      return fn(*args, **kwargs)

  return run
