"""The README stays a short user's document whose commands are the ones CI runs and the ones
that work, and every page it leads to (docs/) exists and links only to files that exist."""

import importlib
import pathlib
import re
import shlex
import tomllib
import types

import fake_datasets
import numpy as np
import pytest

from l2p_jax import experiment
from l2p_jax.data import sources
from l2p_jax.evaluation import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
DOCS = sorted((ROOT / 'docs').glob('*.md'))
SECTIONS = [
  'Install',
  'Quick start',
  'The experiment grid',
  'Evaluating',
  'Evaluate your own model',
  'Reproducing the paper',
  'Running the tests',
  'Where to read more',
]


def bash_blocks(text: str) -> list[str]:
  return re.findall(r'```bash\n(.*?)\n```', text, re.S)


def command_lines(block: str) -> list[list[str]]:
  """Each command of a bash block as words, continuation lines joined, `&&` split."""
  joined = block.replace('\\\n', ' ')
  return [shlex.split(part) for line in joined.splitlines() for part in line.split('&&')]


def test_ci_runs_the_readme_test_command():
  (test_command,) = [block for block in bash_blocks(README) if 'pytest' in block]
  # The style is checked before the tests, so a violation fails CI.
  assert test_command.index('ruff check .') < test_command.index('python -m pytest')
  assert test_command.index('ruff format --check .') < test_command.index('python -m pytest')
  ci_lines = (ROOT / '.ci' / 'run').read_text().splitlines()
  assert test_command in ci_lines
  section = README.split('## Running the tests\n')[1].split('\n## ')[0]
  assert test_command in section


def test_readme_paper_command_names_an_existing_config_and_extra():
  main = next(block for block in bash_blocks(README) if '.[' in block and 'train.py' in block)
  config = re.search(r'--config (\S+?):', main).group(1)
  assert (ROOT / config).exists()
  extra = re.search(r'\.\[(\w+)\]', main).group(1)
  assert f'\n{extra} = [' in (ROOT / 'pyproject.toml').read_text()


def test_readme_first_command_pair_runs_offline_on_debians_fashion_mnist(tmp_path, monkeypatch):
  """The quick start's first block installs, trains and evaluates with no data flag, and
  its stated times are measured; on a machine with Debian's dataset-fashion-mnist (its
  folder faked here, TFDS empty) both commands find the data there."""
  section = README.split('## Quick start\n')[1].split('\n## ')[0]
  first = bash_blocks(section)[0]
  install, train, evaluate = command_lines(first)
  assert install == ['pip', 'install', '-e', '.']
  assert train[:2] == ['python', 'train.py'] and evaluate[:2] == ['python', 'eval.py']
  assert not [word for word in train + evaluate if word.startswith('--config.')]
  workdir = train[train.index('--workdir') + 1]
  assert evaluate[evaluate.index('--workdir') + 1] == workdir
  measured = r'Measured on a 2-core CPU .*: `train.py` \d+ s, `eval.py` \d+ s'
  assert re.search(measured, ' '.join(section.split()))

  monkeypatch.setattr(sources, 'SYSTEM_DATASETS', tmp_path / 'share')
  monkeypatch.setattr(sources.tfds.core.constants, 'DATA_DIR', str(tmp_path / 'tfds'))
  path, _, arg = train[train.index('--config') + 1].partition(':')
  config = importlib.import_module(path.removesuffix('.py').replace('/', '.')).get_config(arg)
  folder = sources.system_folder(config.data.dataset)
  with pytest.raises(
    sources.DatasetNotFoundError, match=f'(?s){re.escape(str(folder))}.*dataset-fashion-mnist'
  ):
    experiment.load_data(config)
  fake_datasets.write_idx(folder, train=600, test=200)
  train_split, eval_split, _ = experiment.load_data(config)
  assert (train_split.num_examples, eval_split.num_examples) == (512, 128)
  path, _, arg = evaluate[evaluate.index('--config') + 1].partition(':')
  eval_config = importlib.import_module(path.removesuffix('.py').replace('/', '.')).get_config(arg)
  checkpoint = types.SimpleNamespace(meta={'config': config.to_dict()})
  examples = runner.load_examples(runner.data_settings(eval_config, checkpoint))
  np.testing.assert_array_equal(examples.images, eval_split.images[: eval_config.data.examples])


def test_readme_extras_are_those_of_pyproject():
  pyproject = tomllib.loads((ROOT / 'pyproject.toml').read_text())
  extras = set(pyproject['project']['optional-dependencies'])
  named = {extra for group in re.findall(r'\.\[([\w,]+)\]', README) for extra in group.split(',')}
  assert named == extras


def test_readme_commands_parse():
  """Every command of the README runs a script that exists, with a config that builds and
  overrides that name existing fields (a renamed field fails here, not for a user)."""
  for block in bash_blocks(README):
    for words in command_lines(block):
      if words[:1] != ['python'] or words[1] == '-m':
        continue
      script = words[1]
      assert (ROOT / script).is_file(), script
      flags = dict(word.removeprefix('--').split('=', 1) for word in words[2:] if '=' in word)
      spec = words[words.index('--config') + 1] if '--config' in words else None
      if script == 'reproduce.py':
        scales = importlib.import_module('l2p_jax.reproduction.scales')
        assert words[words.index('--scale') + 1] in scales.SCALES
        continue
      path, _, arg = (spec or 'configs/eval.py:').partition(':')
      config = importlib.import_module(path.removesuffix('.py').replace('/', '.')).get_config(arg)
      for name in (flag.removeprefix('config.') for flag in flags if flag.startswith('config.')):
        node = config
        for field in name.split('.'):
          assert field in node, f'{script}: --config.{name} names no field of {spec}'
          node = node[field]


def attack_names(page: str) -> set[str]:
  section = page.split('`--config.attacks` takes these names')[1].split('\n\n')[1]
  return {
    name
    for row in section.splitlines()[2:]
    for name in re.findall(r'`([\w<>]+)`', row.split(' | ')[0])
  }


def test_readme_lists_every_attack_that_the_evaluation_page_explains():
  documented = attack_names((ROOT / 'docs' / 'evaluation.md').read_text())
  assert attack_names(README) == documented
  default = importlib.import_module('configs.eval').get_config().attacks.split(',')
  patterns = [re.compile(name.replace('<N>', r'\d+') + '$') for name in documented]
  for attack in default:
    assert any(pattern.match(attack) for pattern in patterns), attack


def test_readme_is_short_and_in_the_users_order():
  assert len(README.splitlines()) <= 250
  assert re.findall(r'^## (.*)$', README, re.M) == SECTIONS


def test_readme_has_no_commit_hashes():
  tokens = re.findall(r'\b[0-9a-f]{7,40}\b', README)
  hashes = [t for t in tokens if re.search(r'[0-9]', t) and re.search(r'[a-f]', t)]
  assert not hashes


def test_readme_links_every_docs_page_and_the_results():
  linked = set(re.findall(r'\]\(([^)#]+)', README.split('## Where to read more')[1]))
  pages = {str(page.relative_to(ROOT)) for page in DOCS}
  assert pages | {'BENCHMARKS.md', 'RESULTS.md', 'results/small/RESULTS.md'} <= linked


def anchors(page: pathlib.Path) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
  headings = re.findall(r'^#+ (.*)$', page.read_text(), re.M)
  return {re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-') for heading in headings}


def test_relative_links_of_readme_and_docs_point_at_what_exists():
  for page in [ROOT / 'README.md', *sorted((ROOT / 'docs').rglob('*.md'))]:
    for target in re.findall(r'\]\(([^)\s]+)\)', page.read_text()):
      if re.match(r'\w+://', target):
        continue
      path, _, anchor = target.partition('#')
      linked = (page.parent / path).resolve() if path else page
      assert linked.exists(), f'{page.name} links {target}, which does not exist'
      if anchor:
        assert anchor in anchors(linked), f'{page.name} links {target}: no such heading'


def test_library_page_names_every_module_of_the_tree():
  """Each subpackage of l2p_jax/ has a row of docs/library.md, and each module is named in it."""
  rows = {
    match.group(1): match.group(2)
    for match in re.finditer(
      r'^\| `l2p_jax\.([\w.]+)` \| (.*) \|$', (ROOT / 'docs' / 'library.md').read_text(), re.M
    )
  }
  library = ROOT / 'l2p_jax'
  for path in sorted(library.rglob('*.py')):
    parts = path.relative_to(library).with_suffix('').parts
    if parts[-1] == '__init__' and len(parts) == 1:
      continue
    row = rows.get(parts[0].removesuffix('.py'))
    assert row is not None, f'no docs/library.md row for l2p_jax.{parts[0]}'
    if len(parts) > 1 and parts[-1] != '__init__' and parts[0] not in ('models', 'data', 'attacks'):
      assert f'`{parts[-1]}`' in row, f'docs/library.md row of l2p_jax.{parts[0]} omits {parts[-1]}'
