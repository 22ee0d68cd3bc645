"""What the command-line entry points share: flag parsing that ends a bad config
argument or a mistyped `--config.FIELD=...` override in one line, not tracebacks."""

from __future__ import annotations

import re
from collections.abc import Callable

from absl import flags


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


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `app.run` that exits with one line naming a config field the
  command line sets but the (locked) config does not have, or what the config file
  refused (e.g. an unknown ARCH)."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
      raise SystemExit(unknown_field_message(program, error, argv)) from None
    except flags.Error as error:
      message = str(error).strip()
      if 'Error whilst parsing config file' in message:  # Its last line is the error.
        message = message.splitlines()[-1].strip()
      raise SystemExit(
        f'{program}: {message}\nPass --helpshort or --helpfull to see help on flags.'
      ) from None

  return parse
