"""What the command-line entry points share: flag parsing that first imports the
user's modules of `--config.modules` (their defenses register themselves) and ends a
bad config argument or a mistyped `--config.FIELD=...` override in one line, a check of
the folder a command writes, and one line, not tracebacks, for a user error or a full
disk."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator

from absl import flags

from l2p_jax.errors import UserError
from l2p_jax.runtime import files


def unknown_field_message(program: str, error: Exception, argv: list[str]) -> str:
  """The one line for a `--config.` override (in `argv`) naming a field the locked
  config lacks; `error` is what ml_collections raised, with its suggestion if any."""
  text = str(error).replace("\\'", "'")  # The message is a repr inside a repr.
  key = (re.findall(r"'(\w+)'", text) or [text])[0]
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  bad = [
    a.split('=')[0]
    for a in argv[1:]
    if re.fullmatch(rf'--config(\.\w+)*\.{re.escape(key)}(\.\w+)*(=.*)?', a)
  ]
  return f'{program}: {" ".join(bad) or key}: the config has no field {key!r}' + (
    f'; did you mean {suggestion.group(1)!r}?'
    if suggestion
    else '; check the spelling against the config file.'
  )


MODULES_FLAG = '--config.modules'


def modules_named(argv: list[str]) -> list[str]:
  """The comma-separated modules of the last `--config.modules=A,B` (or
  `--config.modules A,B`) in `argv`."""
  value = ''
  for flag, following in zip(argv, argv[1:] + ['']):
    if flag.startswith(MODULES_FLAG + '='):
      value = flag.partition('=')[2]
    elif flag == MODULES_FLAG:
      value = following
  return listed(value)


def listed(value: str) -> list[str]:
  """The names of a comma-separated string, blanks dropped."""
  return [name.strip() for name in value.split(',') if name.strip()]


def import_modules(names: list[str]) -> None:
  """Imports the modules `names` (a user's defenses register their methods on import);
  UserError naming the first that does not import and why."""
  for name in names:
    try:
      importlib.import_module(name)
    except Exception as error:  # pylint: disable=broad-except  (whatever the module raised)
      reason = (str(error).strip().splitlines() or [''])[0]
      raise UserError(
        f'{MODULES_FLAG}: the module {name!r} does not import ({type(error).__name__}: '
        f'{reason}); put its folder on PYTHONPATH and check its name.'
      ) from None


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `app.run` that imports the modules of `--config.modules`
  before the config is built (a method they register can then be named in it) and exits
  with one line naming a module that does not import, a config field the command line
  sets but the (locked) config does not have, what the config file refused (e.g. an
  unknown ARCH, without its exception's type) or absl's flag error."""

  def parse(argv: list[str]) -> list[str]:
    try:
      import_modules(modules_named(argv))
    except UserError as error:
      raise SystemExit(f'{program}: {error}') from None
    try:
      rest = flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
      raise SystemExit(unknown_field_message(program, error, argv)) from None
    except flags.Error as error:
      message = str(error).strip()
      if 'Error whilst parsing config file' in message:  # Its last line is the error.
        reason = re.sub(r'^[\w.]*(Error|Exception): ', '', message.splitlines()[-1].strip())
        raise SystemExit(f'{program}: {reason}') from None
      raise SystemExit(
        f'{program}: {message} Pass --helpshort or --helpfull to see help on flags.'
      ) from None
    _check_config_files_loaded(program)
    return rest

  return parse


def _check_config_files_loaded(program: str) -> None:
  """Exits with one line naming a config file that did not load: ml_collections
  defers that error to the config's first use, as a traceback."""
  for flag in (flags.FLAGS[name] for name in flags.FLAGS):
    if type(flag.value).__name__ == '_ErrorConfig':  # ml_collections' stand-in.
      reason = str(flag.value._error).strip().splitlines()[-1].strip()  # noqa: SLF001
      raise SystemExit(
        f'{program}: --{flag.name}={flag.config_filename} did not load ({reason}); name a '
        'config file of configs/, as FILE.py[:ARG].'
      )


def check_writable_folder(what: str, path: str, fix: str = 'name a folder you can write') -> None:
  """Raises UserError, naming `what` (e.g. '--workdir'), `path` and `fix`, unless `path`
  is a folder this process can write or can create: a file in the way, or a read-only
  folder, is refused before any work."""
  path = os.path.abspath(os.path.expanduser(path))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  where = f'{what} {path}' + (f' cannot be created: {existing}' if existing != path else '')
  if not os.path.isdir(existing):
    raise UserError(f'{where} is a file, not a folder; {fix}.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'{where} is read-only here; {fix}.')


@contextlib.contextmanager
def one_line_errors(
  program: str, kept: Callable[[], str] | None = None, also: tuple[type[Exception], ...] = ()
) -> Iterator[None]:
  """Ends a UserError (or one of `also`), or a full disk anywhere below, as one line
  `program: message` (SystemExit, status 1); for a full disk, `kept()` adds what was
  kept (e.g. the last good checkpoint)."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    if files.is_disk_full(error):
      parts = [files.disk_full_message(error)] + ([kept()] if kept else [])
      raise SystemExit(
        f'{program}: {"; ".join(parts)}. Free some space and rerun the same command.'
      ) from None
    if isinstance(error, (UserError, *also)):
      raise SystemExit(f'{program}: {error}') from None
    raise


def exit_at_once(message: str) -> None:
  """Ends the process now with one line `message` on stderr (status 1): an ordinary exit
  waits for the compiled computations still running (an attack cannot be cancelled),
  which after Ctrl-C keeps the cores busy for minutes."""
  sys.stdout.flush()
  sys.stderr.write(message + '\n')
  sys.stderr.flush()
  os._exit(1)
