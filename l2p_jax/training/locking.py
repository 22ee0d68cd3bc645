"""One training run per workdir: an exclusive `fcntl.flock` on WORKDIR/lock.

The kernel drops the lock when its holder exits, however it dies, so a lock left by a
crashed run never blocks the rerun that resumes it; the file only names the holder
(pid and host) for the message a second run gets.
"""

from __future__ import annotations

import fcntl
import os
import socket

from l2p_jax.errors import UserError


class WorkdirLockedError(UserError, RuntimeError):
  """Another live process is training in the same workdir."""


class WorkdirLock:
  """Holds WORKDIR/lock from `__enter__` to `__exit__`; raises WorkdirLockedError
  naming the holder when another process has it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'lock')
    self._file = None

  def __enter__(self) -> WorkdirLock:
    f = open(self.path, 'a+')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'an unknown process'
      f.close()
      raise WorkdirLockedError(
        f'{os.path.dirname(self.path)} is in use by another training run ({holder}, '
        f'lock file {self.path}). Wait for it to finish or stop it, or use another '
        '--workdir.'
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on host {socket.gethostname()}\n')
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc_info) -> None:
    self._file.close()  # Closing the file releases the lock.
    self._file = None
