"""Orbax's log records kept off the console where they repeat, in dozens of lines and
tracebacks, what one line of ours already says: its INFO line per file written, its
warnings about read-only managers, its failed attempts to restore a damaged checkpoint
(checkpointing warns once, naming it) and its background threads' tracebacks on a full
disk (the entry point names what was kept); and TensorStore's tracebacks of writes that
outlive the failed save awaiting them, printed outside logging."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import traceback
from collections.abc import Iterator

from l2p_jax.runtime import files

_ORBAX = f'{os.sep}orbax{os.sep}'


def _is_disk_full(record: logging.LogRecord) -> bool:
  error = record.exc_info[1] if record.exc_info else None
  return (error is not None and files.is_disk_full(error)) or any(
    text in record.getMessage() for text in files.DISK_FULL_TEXTS
  )


class _Filter(logging.Filter):
  """Drops orbax's records below `level`, and orbax's and asyncio's (its unretrieved
  task errors, which orbax's writes leave) about a full disk; with `everything`, all of
  orbax's and asyncio's."""

  def __init__(self, level: int, everything: bool = False):
    super().__init__()
    self.level, self.everything = level, everything

  def filter(self, record: logging.LogRecord) -> bool:
    orbax = _ORBAX in record.pathname
    if not (orbax or record.name == 'asyncio'):
      return True
    if self.everything or _is_disk_full(record):
      return False
    return not (orbax and record.levelno < self.level)


_LOGGERS = ('absl', 'asyncio')


def _is_closed_loop_callback(unraisable: sys.UnraisableHookArgs) -> bool:
  """Whether an unraisable error is a callback's call into an asyncio event loop that
  has closed, and nothing else: TensorStore's, when a write of orbax's completes after
  the save awaiting it failed (on a full disk, a traceback for each pending write)."""
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return (
    isinstance(unraisable.exc_value, RuntimeError)
    and str(unraisable.exc_value) == 'Event loop is closed'
    and unraisable.object is None
    and bool(frames)
    and frames[0].name == 'call_soon_threadsafe'
    and all(f'{os.sep}asyncio{os.sep}' in frame.filename for frame in frames)
  )


def quiet_orbax(level: int = logging.ERROR) -> None:
  """From now on, drops orbax's log records below `level` and those about a full disk
  (its own and asyncio's), and TensorStore's calls into a closed event loop (see
  _is_closed_loop_callback); for the entry points, whose own lines say what happened."""
  quiet = _Filter(level)
  for name in _LOGGERS:
    logging.getLogger(name).addFilter(quiet)
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: (
    None if _is_closed_loop_callback(unraisable) else previous(unraisable)
  )


@contextlib.contextmanager
def silenced() -> Iterator[None]:
  """Within the block, drops every log record of orbax and asyncio's: for an attempt to
  restore a checkpoint that may be damaged, whose failure is reported once by the
  caller. A failure collects garbage before leaving, so that the failed attempt's tasks
  report their errors while the filter holds."""
  quiet = _Filter(logging.CRITICAL, everything=True)
  loggers = [logging.getLogger(name) for name in _LOGGERS]
  for logger in loggers:
    logger.addFilter(quiet)
  try:
    yield
  except BaseException:
    gc.collect()
    raise
  finally:
    for logger in loggers:
      logger.removeFilter(quiet)
