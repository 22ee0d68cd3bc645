"""The README's two commands are the ones CI runs and the ones that work."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
  return re.findall(r'```bash\n(.*?)\n```', (ROOT / 'README.md').read_text(), re.S)


def test_ci_runs_the_readme_test_command():
  test_command = readme_commands()[1]
  assert 'pytest' in test_command
  # The style is checked before the tests, so a violation fails CI.
  assert test_command.index('ruff check .') < test_command.index('python -m pytest')
  assert test_command.index('ruff format --check .') < test_command.index('python -m pytest')
  ci_lines = (ROOT / '.ci' / 'run').read_text().splitlines()
  assert test_command in ci_lines


def test_readme_main_command_names_an_existing_config_and_extra():
  main = readme_commands()[0]
  config = re.search(r'--config (\S+?):', main).group(1)
  assert (ROOT / config).exists()
  extra = re.search(r'\.\[(\w+)\]', main).group(1)
  assert f'\n{extra} = [' in (ROOT / 'pyproject.toml').read_text()


def test_readme_library_table_names_every_module_of_the_tree():
  """Each subpackage of l2p_jax/ has a row, and each of its modules is named in it."""
  section = (ROOT / 'README.md').read_text().split('## Library')[1].split('\n\n')[1]
  rows = {
    match.group(1): match.group(2)
    for match in re.finditer(r'^\| `l2p_jax\.([\w.]+)` \| (.*) \|$', section, re.M)
  }
  library = ROOT / 'l2p_jax'
  for path in sorted(library.rglob('*.py')):
    parts = path.relative_to(library).with_suffix('').parts
    if parts[-1] == '__init__' and len(parts) == 1:
      continue
    row = rows.get(parts[0].removesuffix('.py'))
    assert row is not None, f'no README row for l2p_jax.{parts[0]}'
    if len(parts) > 1 and parts[-1] != '__init__' and parts[0] not in ('models', 'data', 'attacks'):
      assert f'`{parts[-1]}`' in row, f'README row of l2p_jax.{parts[0]} omits {parts[-1]}'
