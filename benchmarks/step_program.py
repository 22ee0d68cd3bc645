"""The compiled training step as a program: its optimized HLO without debug information,
a hash of that text and XLA's FLOP count, per method, so that a refactor can show it
compiles the same program (same hash) rather than only a similar speed.

  python benchmarks/step_program.py --out /tmp/step_program            # vanilla, l2p
  python benchmarks/step_program.py --out /tmp/step_program --methods pni,adv_bnn
  python benchmarks/step_program.py --strip OLD.hlo NEW.hlo  # hashes of saved dumps

The step is ResNet-20 at width 0.25 on a batch of 8 (everything on: noise, PGD-7, the
noise parameters' updates), small enough to compile in seconds on a CPU. What differs
between two versions of the code in file names and line numbers only (the HLO's
metadata and its FileNames ... StackFrames tables) is removed before hashing, and the
ops' and computations' names are renumbered in order of appearance: XLA names some
values after the Python function that first traced them, so a renamed helper, or L2P
compiled before vanilla in one process, changed vanilla's hash before they were; the
names say nothing about the program.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pathlib
import re
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script from anywhere: find benchmarks/ and l2p_jax.

DEBUG_TABLES = ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames')


def strip_debug_information(text: str) -> str:
  """The HLO text without op metadata and without the tables of source locations."""
  text = re.sub(r', metadata=\{[^}]*\}', '', text)
  kept, skipping = [], False
  for line in text.split('\n'):
    if line in DEBUG_TABLES:
      skipping = True
      continue
    if skipping and line.startswith(('%', 'ENTRY', 'HloModule')):
      skipping = False
    if not skipping:
      kept.append(line)
  return '\n'.join(kept)


def canonical_names(text: str) -> str:
  """The HLO text with every `%name` replaced by `%N`, N its order of first appearance."""
  numbers: dict[str, str] = {}
  return re.sub(r'%[\w.\-]+', lambda m: numbers.setdefault(m.group(), f'%{len(numbers)}'), text)


def digest(text: str) -> str:
  """sha256 of the stripped HLO text with canonical names."""
  return hashlib.sha256(canonical_names(strip_debug_information(text)).encode()).hexdigest()


def compile_step(method: str) -> tuple[str, float]:
  """(optimized HLO text, XLA FLOPs) of `method`'s jitted training step."""
  import jax  # pylint: disable=import-outside-toplevel

  from benchmarks import run as bench  # pylint: disable=import-outside-toplevel
  from l2p_jax.runtime import sharding  # pylint: disable=import-outside-toplevel
  from l2p_jax.training import schedule  # pylint: disable=import-outside-toplevel
  from l2p_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel

  args = bench.parse_args(['--batch', '8', '--width', '0.25', '--out', os.devnull])
  config = bench.args_config(args, method, 'resnet20', dtype='float32', unroll=False)
  model, optimizers, state = bench.jax_model_and_state(config, sharding.make_mesh(1))
  setup = bench.jax_setup(config)
  step = functools.partial(
    step_lib.train_step, model=model, settings=setup.settings, optimizers=optimizers
  )
  compiled = (
    jax.jit(step, static_argnames='phase', donate_argnums=0)
    .lower(
      state,
      bench.random_batch(8),
      np.float32(0.1),
      np.float32(0.01),
      phase=schedule.phase_for_epoch(config, setup.method, 0),
    )
    .compile()
  )
  return compiled.as_text(), float(compiled.cost_analysis().get('flops', 0.0))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', help='Folder for METHOD.hlo (stripped) and step_program.json.')
  parser.add_argument('--methods', default='vanilla,l2p')
  parser.add_argument('--strip', nargs='+', metavar='HLO', help='Only hash saved HLO dumps.')
  args = parser.parse_args(argv)
  if args.strip:
    for path in args.strip:
      print(digest(pathlib.Path(path).read_text()), path)
    return
  if not args.out:
    parser.error('--out is required unless --strip is given')
  os.makedirs(args.out, exist_ok=True)
  summary = {}
  for method in args.methods.split(','):
    text, flops = compile_step(method)
    pathlib.Path(args.out, f'{method}.hlo').write_text(strip_debug_information(text))
    summary[method] = {'flops': flops, 'hlo_sha256': digest(text)}
    print(method, summary[method])
  pathlib.Path(args.out, 'step_program.json').write_text(json.dumps(summary, indent=1))


if __name__ == '__main__':
  main()
