"""What a compiled training step runs, read from its optimized HLO with every loop
counted as many times as it turns: convolutions by pass and kind (forward, input
gradient, kernel gradient) with their FLOPs, the cross-device sums, the random-number
loops (XLA:CPU lowers each threefry hash to a 5-turn loop) and the ops run (issue 36).

  python benchmarks/step_passes.py --methods vanilla,l2p --arch resnet20 --batch 128 \
      --devices 4 --out /tmp/step_passes.json

XLA's own `cost_analysis` counts a loop's body once, so a rolled PGD-7 weighs as one
iteration there; here it weighs seven. The step is compiled as benchmarks/run.py
compiles it (batch gathered on the device, state replicated, batch split over the
devices), not run. Passes are told apart by the op names: the PGD loop ('pgd'), the
named scopes of L2P's paper alternation ('theta pass', 'W pass'), and the rest ('step').
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import pathlib
import re
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script from anywhere: find benchmarks/ and l2p_jax.

# Opcodes that run no work of their own on XLA:CPU.
FREE = ('parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast')
INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$')
SHAPE = re.compile(r'^[a-z0-9]+\[([\d,]*)\]')
RANDOM = re.compile(r'threefry|random_bits|_normal|_uniform|fold_in|random_split')
CALLED = re.compile(r'(?:calls|to_apply|body|condition)=%([\w.\-]+)')


def computations(text: str) -> dict[str, list[str]]:
  """The HLO module's computations by name ('ENTRY' for the entry), as instruction lines."""
  found, current = {}, None
  for line in text.split('\n'):
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      current = 'ENTRY' if line.startswith('ENTRY') else line.split()[0].lstrip('%')
      found[current] = []
    elif line.startswith('  ') and current:
      found[current].append(line)
  return found


def pass_of(op_name: str) -> str:
  """The pass an op belongs to, by its name."""
  if 'theta_pass' in op_name:
    scope = 'theta pass'
  elif 'w_pass' in op_name:
    scope = 'W pass'
  else:
    scope = 'step'
  return f'{scope}: pgd' if re.search(r'/while/body/closed_call/.*ResNet', op_name) else scope


def conv_kind(op_name: str, out_shape: list[int]) -> str:
  """forward, input gradient or kernel gradient: an op whose output is a kernel (3x3 or
  1x1 in its spatial dimensions, which no feature map of these networks is; XLA leaves
  such ops unnamed) is a kernel gradient, a transposed op otherwise an input gradient."""
  if tuple(out_shape[1:3]) in ((3, 3), (1, 1)):
    return 'kernel gradient'
  return 'input gradient' if 'transpose(' in op_name else 'forward'


def conv_flops(line: str, shapes: dict[str, list[int]], out_shape: list[int]) -> float:
  """2 x output elements x window x contracted input features of a convolution."""
  rhs = re.search(r'convolution\(%[\w.\-]+, %([\w.\-]+)\)', line).group(1)
  labels = re.search(r'dim_labels=\w+_(\w+)->', line).group(1)
  kernel = shapes[rhs]
  window = math.prod(int(v) for v in re.search(r'size=([\dx]+)', line).group(1).split('x'))
  return 2.0 * math.prod(out_shape) * window * kernel[labels.index('i')]


def profile_hlo(text: str) -> dict:
  """Per step: convolutions and their GFLOPs by pass and kind, all-reduces by pass,
  random-number loops and ops run by pass, every loop counted by its trip count."""
  comps = computations(text)
  convs, gflops = collections.Counter(), collections.Counter()
  sums, rng_loops, ops = collections.Counter(), collections.Counter(), collections.Counter()

  def walk(name: str, times: int, fused: bool, caller: str, in_rng: bool) -> None:
    """Counts computation `name`, run `times` times; unnamed ops are the caller's."""
    shapes = {}
    for line in comps[name]:
      match = INSTRUCTION.match(line)
      if not match:
        continue
      result, shape_text, opcode, rest = match.groups()
      shape = SHAPE.match(shape_text)
      shapes[result] = [int(v) for v in shape.group(1).split(',') if v] if shape else []
      named = re.search(r'op_name="([^"]*)"', line)
      op_name = named.group(1) if named else ''
      where = pass_of(op_name) if op_name else caller
      if opcode == 'convolution':
        kind = conv_kind(op_name, shapes[result])
        convs[(where, kind)] += times
        gflops[(where, kind)] += times * conv_flops(line, shapes, shapes[result]) / 1e9
      elif opcode == 'all-reduce':
        sums[where] += times
      random = in_rng or bool(RANDOM.search(op_name))
      if not fused and opcode not in FREE:
        ops[(where, 'random numbers' if random else 'other')] += times
      trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
      for called in CALLED.findall(rest):
        body = 'body=%' + called in rest
        turns = int(trips.group(1)) if trips and body else 1
        rng_loop = opcode == 'while' and bool(RANDOM.search(op_name))
        rng_loops[where] += times if rng_loop and body else 0
        inner = fused or opcode not in ('while', 'call', 'conditional')
        walk(called, times * turns, inner, where, in_rng or rng_loop)

  walk('ENTRY', 1, False, 'step', False)
  join = lambda counter: {
    ' / '.join(k) if isinstance(k, tuple) else k: v for k, v in counter.items()
  }  # noqa: E731
  return {
    'convolutions': join(convs),
    'conv_gflops': {k: round(v, 3) for k, v in join(gflops).items()},
    'conv_gflops_total': round(sum(gflops.values()), 3),
    'all_reduces': dict(sums),
    'all_reduces_total': sum(sums.values()),
    'rng_loops': dict(rng_loops),
    'rng_loops_total': sum(rng_loops.values()),
    'ops_run': join(ops),
    'ops_run_total': sum(ops.values()),
  }


def compile_step(method: str, arch: str, batch: int, devices: int, alternation: str):
  """benchmarks/run.py's training step (batch gathered on the device), compiled."""
  import jax  # pylint: disable=import-outside-toplevel

  from benchmarks import run as bench  # pylint: disable=import-outside-toplevel
  from l2p_jax import data  # pylint: disable=import-outside-toplevel
  from l2p_jax.runtime import sharding  # pylint: disable=import-outside-toplevel
  from l2p_jax.training import schedule  # pylint: disable=import-outside-toplevel
  from l2p_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel

  args = bench.parse_args(
    ['--batch', str(batch), '--alternation', alternation, '--out', os.devnull]
  )
  config = bench.args_config(args, method, arch, dtype='float32', unroll=False)
  mesh = sharding.make_mesh(devices)
  model, optimizers, state = bench.jax_model_and_state(config, mesh)
  setup = bench.jax_setup(config)
  split = bench.random_split(args.split_examples)
  scalars = sharding.replicate(mesh, (np.float32(0.1), np.float32(0.01), np.int32(0)))
  step = functools.partial(
    step_lib.train_step_on_split,
    batch_size=batch,
    batch_sharding=sharding.data_sharding(mesh),
    model=model,
    settings=setup.settings,
    optimizers=optimizers,
  )
  return (
    jax.jit(step, static_argnames='phase', donate_argnums=0)
    .lower(
      state,
      data.put_on_mesh(mesh, split),
      data.epoch_order_on_mesh(mesh, 0, 0, split.num_examples),
      scalars[2],
      scalars[0],
      scalars[1],
      phase=schedule.phase_for_epoch(config, setup.method, 0),
    )
    .compile()
  )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--methods', default='vanilla,l2p')
  parser.add_argument('--arch', default='resnet20')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--devices', type=int, default=4)
  parser.add_argument('--alternation', default='paper', help="L2P's: paper | authors_code")
  parser.add_argument('--hlo', nargs='+', metavar='HLO', help='Only read saved HLO dumps.')
  parser.add_argument('--out', required=True, help='JSON file (and METHOD.hlo beside it).')
  args = parser.parse_args(argv)
  results = {'command': ['python', 'benchmarks/step_passes.py', *(argv or sys.argv[1:])]}
  if args.hlo:
    for path in args.hlo:
      results[path] = profile_hlo(pathlib.Path(path).read_text())
  else:
    from benchmarks import run as bench  # pylint: disable=import-outside-toplevel

    bench.device_counts(bench.parse_args(['--devices', str(args.devices), '--out', os.devnull]))
    for method in args.methods.split(','):
      compiled = compile_step(method, args.arch, args.batch, args.devices, args.alternation)
      text = compiled.as_text()
      pathlib.Path(args.out).with_name(f'{method}.hlo').write_text(text)
      results[method] = {
        'xla_flops_loops_once': float(compiled.cost_analysis().get('flops', 0.0)),
        **profile_hlo(text),
      }
  for name, case in results.items():
    if name != 'command':
      print(name, json.dumps(case, indent=1))
  pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
