"""The import graph of l2p_jax has no circle: every module's imports (module-level and
inside functions alike) point down the layers of DESIGN.md."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = 'l2p_jax'


def module_names(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  """Every module of the package by dotted name (a package by its __init__.py)."""
  names = {}
  for path in sorted((root / PACKAGE).rglob('*.py')):
    parts = path.relative_to(root).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    names['.'.join(parts)] = path
  return names


def _ancestors(name: str) -> list[str]:
  """'a.b.c' -> ['a', 'a.b']."""
  parts = name.split('.')
  return ['.'.join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package's modules that importing module `name` runs: each named in an `import`
  or `from` statement anywhere in its file, and each package above one of those whose
  __init__ runs first (the importer's own packages aside: they are already running)."""
  is_package = path.name == '__init__.py'
  named = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      named.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # Relative: from the importer's package.
        package = name if is_package else name.rpartition('.')[0]
        package = '.'.join(package.split('.')[: len(package.split('.')) - node.level + 1])
        base = f'{package}.{base}' if base else package
      named.add(base)
      named.update(f'{base}.{alias.name}' for alias in node.names)
  own = set(_ancestors(name)) | {name}
  found = set()
  for target in named:
    for candidate in (*_ancestors(target), target):
      if candidate in modules and candidate not in own:
        found.add(candidate)
  return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
  """module -> the package's modules it imports."""
  names = module_names(root)
  return {name: imported_modules(name, path, set(names)) for name, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One circle of `graph` as [a, b, ..., a], or None when it has none."""
  state, stack = {}, []  # state: 1 on the current path, 2 done.

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_detector_finds_a_circle_and_only_a_circle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'a'}}) == ['a', 'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set(), 'd': {'a'}}) is None


def test_the_graph_sees_lazy_imports_and_packages_run_first(tmp_path):
  """A function-level import counts; importing pkg.mod runs pkg's __init__ first."""
  package = tmp_path / PACKAGE
  (package / 'pkg').mkdir(parents=True)
  (package / '__init__.py').write_text('')
  (package / 'pkg' / '__init__.py').write_text('from l2p_jax.pkg import mod\n')
  (package / 'pkg' / 'mod.py').write_text('from . import helper\n')
  (package / 'pkg' / 'helper.py').write_text('def f():\n  from l2p_jax import top\n')
  (package / 'top.py').write_text('import l2p_jax.pkg.mod\n')
  graph = import_graph(tmp_path)
  assert graph['l2p_jax.pkg.helper'] == {'l2p_jax.top'}
  assert graph['l2p_jax.top'] == {'l2p_jax.pkg', 'l2p_jax.pkg.mod'}
  assert find_cycle(graph) == [
    'l2p_jax.pkg',
    'l2p_jax.pkg.mod',
    'l2p_jax.pkg.helper',
    'l2p_jax.top',
    'l2p_jax.pkg',
  ]


def test_l2p_jax_imports_point_one_way():
  graph = import_graph()
  assert 'l2p_jax.methods' in graph and 'l2p_jax.training.step' in graph['l2p_jax.training.loop']
  cycle = find_cycle(graph)
  if cycle:
    pytest.fail('import circle: ' + ' -> '.join(cycle))
