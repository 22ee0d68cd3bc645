"""The one base class of the errors a user can fix: the entry points print any of them
as one line, without a traceback."""


class UserError(Exception):
  """A bad config value, a missing dataset or checkpoint, a refused resume: its message
  names the value and what would be accepted."""
