"""Training steps with and without `layers.materialized`, the kernel gradients' input read
from a buffer (on) or recomputed inside XLA:CPU's transposed copy (off: the identity in
its place, the program of before), compiled side by side and timed interleaved in one
process, rounds alternating in order, so that both share the machine's load.

  python benchmarks/materialized_ab.py --methods none,vanilla,pni,adv_bnn,l2p --devices 4 \
      --repeats 8 --out benchmarks/materialized_ab_issue36.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script from anywhere: find benchmarks/ and l2p_jax.

from benchmarks import run as bench  # noqa: E402
from l2p_jax.models import layers  # noqa: E402

VARIANTS = {'on': layers.materialized, 'off': lambda x, like: x}


def prepare(bench_args: argparse.Namespace, method: str, arch: str, devices: int, variant: str):
  """The step of `method` compiled with `variant` of `layers.materialized`."""
  layers.materialized = VARIANTS[variant]
  try:
    call, _ = bench.prepare_jax_train(bench_args, method, arch, 'float32', False, 'device', devices)
  finally:
    layers.materialized = VARIANTS['on']
  return call


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--methods', default='vanilla,l2p')
  parser.add_argument('--arch', default='resnet20')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--devices', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=8, help='interleaved rounds')
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  bench_args = bench.parse_args(
    ['--batch', str(args.batch), '--devices', str(args.devices), '--out', os.devnull]
  )
  [devices] = bench.device_counts(bench_args)
  cases = [(m, v) for m in args.methods.split(',') for v in VARIANTS]
  calls = [prepare(bench_args, m, args.arch, devices, v) for m, v in cases]
  load_before = os.getloadavg()[0]
  times = [[] for _ in calls]
  for round_ in range(args.repeats):
    order = range(len(calls)) if round_ % 2 == 0 else reversed(range(len(calls)))
    for i in order:
      start = time.perf_counter()
      calls[i]()
      times[i].append(time.perf_counter() - start)
  medians = {f'{m}/{v}': statistics.median(t) for (m, v), t in zip(cases, times)}
  result = {
    'command': ['python', 'benchmarks/materialized_ab.py', *(argv or sys.argv[1:])],
    'machine': bench.machine_info(),
    'code': bench.code_info(),
    'load_1min': [load_before, os.getloadavg()[0]],
    'times_s': {f'{m}/{v}': t for (m, v), t in zip(cases, times)},
    'median_s': medians,
  }
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  print('| method | materialized on s | off s | on / off |\n|---|---|---|---|')
  for method in args.methods.split(','):
    on, off = medians[f'{method}/on'], medians[f'{method}/off']
    print(f'| {method} | {on:.3f} | {off:.3f} | {on / off:.3f} |')


if __name__ == '__main__':
  main()
