"""Writing a file so that a full disk or a kill never leaves half of it: the new
version goes to a temporary file in the same folder, reaches the disk (fsync), and
only then replaces the old one (os.replace, atomic); on any failure the temporary
is removed and the previous version stays as it was. A full disk is raised as
DiskFullError, one line saying what was kept."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from l2p_jax.errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ('No space left on device', 'Disk quota exceeded')


class DiskFullError(UserError):
  """No space was left on the device (or the quota was used up) writing a file; the
  message names the file and says what was kept."""


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, means the disk (or the quota) is
  full: an OSError with ENOSPC/EDQUOT, or a message saying so (TensorStore's, through
  orbax, is a ValueError)."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
      return True
    if any(text in str(error) for text in DISK_FULL_TEXTS):
      return True
    error = error.__cause__ or error.__context__
  return False


def _permissions(path: str) -> int:
  """The mode bits a replacement of `path` gets: the old file's, else what open() would
  give a new file under the process's umask."""
  if os.path.exists(path):
    return os.stat(path).st_mode & 0o7777
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


@contextlib.contextmanager
def _replacing(path: str, mode: str) -> Iterator[IO]:
  """A temporary file beside `path` to write, that replaces `path` when the block ends
  without an error and is removed when it fails."""
  path = os.path.abspath(path)
  folder, name = os.path.split(path)
  existed, temporary = os.path.exists(path), None
  try:
    handle, temporary = tempfile.mkstemp(prefix=f'.{name}.', suffix='.partial', dir=folder)
    with os.fdopen(handle, mode) as f:
      os.fchmod(f.fileno(), _permissions(path))
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException as error:
    if temporary is not None:
      with contextlib.suppress(OSError):
        os.remove(temporary)
    if is_disk_full(error):
      kept = f'the previous {name} is intact' if existed else f'no {name} was written'
      raise DiskFullError(f'no space left on device writing {path}; {kept}') from error
    raise


def write_with(path: str, write: Callable[[IO], Any], binary: bool = False) -> None:
  """Writes `path` atomically with `write(file)`."""
  with _replacing(path, 'wb' if binary else 'w') as f:
    write(f)


def append_line(path: str, line: str) -> None:
  """Appends `line` and a newline to `path`; if that fails (a full disk), cuts the file
  back to its old length, so that no half line follows the earlier ones."""
  descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  try:
    size = os.lseek(descriptor, 0, os.SEEK_END)
    rest = (line + '\n').encode()
    try:
      while rest:
        rest = rest[os.write(descriptor, rest) :]
    except BaseException as error:
      os.ftruncate(descriptor, size)
      if is_disk_full(error):
        raise DiskFullError(
          f'no space left on device appending to {os.path.abspath(path)}; its earlier lines '
          'are intact'
        ) from error
      raise
  finally:
    os.close(descriptor)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically."""
  write_with(path, lambda f: f.write(text))


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON with sorted keys to `path` atomically."""
  write_text(path, json.dumps(value, indent=2, sort_keys=True))


def save_figure(figure: Any, path: str, **savefig_kwargs: Any) -> None:
  """Saves a matplotlib figure to `path` atomically (the format from its extension)."""
  extension = os.path.splitext(path)[1].lstrip('.') or None
  write_with(path, lambda f: figure.savefig(f, format=extension, **savefig_kwargs), binary=True)


def disk_full_message(error: BaseException) -> str:
  """What a full disk stopped, in a few words: DiskFullError's own message, else the
  file the lower layer was writing, when it says."""
  if isinstance(error, DiskFullError):
    return str(error)
  while error is not None:
    where = getattr(error, 'filename', None) or re.search(r'"(/[^"]+)"', str(error))
    if where:
      return f'no space left on device writing {where if isinstance(where, str) else where[1]}'
    error = error.__cause__ or error.__context__
  return 'no space left on device'
