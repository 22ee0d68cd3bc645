"""House rules that ruff does not check: no library function longer than MAX_LINES,
except the few in LONGER, each with its own limit and the reason it reads better whole.

The training loop is one function on purpose: like Flax's examples/imagenet
`train_and_evaluate`, it reads top to bottom (set-up, the jitted steps, the epochs with
their records and checkpoints); split into pieces it needed a record of ten fields to
hand the run from one to the next.
"""

import ast
import pathlib

LIBRARY = pathlib.Path(__file__).resolve().parent.parent / 'l2p_jax'
MAX_LINES = 70  # From `def` to the last line, docstring included, decorators not.
# (file, function): its limit. The reason is in the module's docstring.
LONGER = {('l2p_jax/training/loop.py', 'train_and_evaluate'): 160}


def long_functions(root: pathlib.Path, limit: int) -> list[tuple[str, str, int]]:
  """(file, function, lines) of every function or method under `root` longer than `limit`
  lines (or its LONGER limit), counted as node.end_lineno - node.lineno + 1."""
  found = []
  for path in sorted(root.rglob('*.py')):
    file = str(path.relative_to(root.parent))
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > LONGER.get((file, node.name), limit):
          found.append((file, node.name, length))
  return found


def test_no_library_function_is_longer_than_70_lines():
  too_long = long_functions(LIBRARY, MAX_LINES)
  assert not too_long, f'Functions over {MAX_LINES} lines (split them): ' + ', '.join(
    f'{file} {name} {length}' for file, name, length in too_long
  )


def test_every_longer_function_still_exists():
  """An allowance outlives no function: a renamed or split one drops out of LONGER."""
  functions = {
    (str(path.relative_to(LIBRARY.parent)), node.name)
    for path in LIBRARY.rglob('*.py')
    for node in ast.walk(ast.parse(path.read_text()))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
  }
  assert set(LONGER) <= functions, set(LONGER) - functions
