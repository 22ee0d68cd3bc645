"""The library works installed (`pip install .`, not editable), where no repository lies
beside it: no module finds a repository file by its path. configs/ and the checkout
come from the entry points (reproduce.py passes them to the grid)."""

import pathlib

LIBRARY = pathlib.Path(__file__).resolve().parent.parent / 'l2p_jax'


def test_library_reads_no_repository_file_by_path():
  readers = [
    str(path.relative_to(LIBRARY.parent))
    for path in sorted(LIBRARY.rglob('*.py'))
    if any(word in path.read_text() for word in ('parents[', 'spec_from_file_location'))
  ]
  assert not readers, 'Modules that find repository files by path: ' + ', '.join(readers)
