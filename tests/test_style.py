"""House rules that ruff does not check: no library function longer than MAX_LINES."""

import ast
import pathlib

LIBRARY = pathlib.Path(__file__).resolve().parent.parent / 'l2p_jax'
MAX_LINES = 70  # From `def` to the last line, docstring included, decorators not.


def long_functions(root: pathlib.Path, limit: int) -> list[tuple[str, str, int]]:
  """(file, function, lines) of every function or method under `root` longer than `limit`
  lines, counted as node.end_lineno - node.lineno + 1."""
  found = []
  for path in sorted(root.rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > limit:
          found.append((str(path.relative_to(root.parent)), node.name, length))
  return found


def test_no_library_function_is_longer_than_70_lines():
  too_long = long_functions(LIBRARY, MAX_LINES)
  assert not too_long, f'Functions over {MAX_LINES} lines (split them): ' + ', '.join(
    f'{file} {name} {length}' for file, name, length in too_long
  )
