"""Where a training step's time goes on XLA:CPU, on 1 and on several host devices: a few
traced calls of benchmarks/run.py's step per method and device count, their profile's
events grouped by kind (convolutions, all-reduces, waiting for the other devices, other
ops) and summed over the threads that run them.

  python benchmarks/profile_step.py --methods vanilla,l2p --devices 1,2 \
      --out benchmarks/profile_step_issue27.json

Figures are per call, over --calls traced calls. Thread-seconds: the time each thread
spent in an event of that kind, its nested events' time excluded, summed over the
threads; "idle" is the time the intra-op pool's threads (one per core, shared by all
devices) spent within the step's span outside any event. The JSON keeps, per case, the
15 ops of most self time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script from anywhere: find benchmarks/ and l2p_jax.

from benchmarks import run as bench  # noqa: E402

# Event names of the XLA:CPU runtime that are not ops: (prefix, kind).
RUNTIME_EVENTS = (
  ('Rendezvous', 'waiting for the other devices'),
  ('Wait:', 'waiting for the other devices'),
  ('ThunkExecutor::Execute (wait', 'client thread waiting for the program'),
  ('ThunkExecutor', 'runtime'),
)
WORKERS = 'tf_XLAEigen'  # The intra-op thread pool's threads (one per core), shared by devices.


def kind(name: str) -> str:
  """The kind of a profile event: a runtime event's, or an op's by its HLO name."""
  for prefix, what in RUNTIME_EVENTS:
    if name.startswith(prefix):
      return what
  if name.startswith('all-reduce'):
    return 'all-reduce'
  # XLA names its convolutions 'convolution.N' (or '-base-dilated', in a fusion's name);
  # 'convert' fusions (the random numbers' bits to floats) are not convolutions.
  if 'convolution' in name or name.startswith('ynn_fusion'):  # XNNPACK runs most convolutions.
    return 'convolution'
  return 'other ops'


def self_times(events: list) -> tuple[dict[str, float], dict[str, int]]:
  """Seconds of each event name on one thread, the events nested in it excluded, and
  how many events of each name there were."""
  spent, counts = collections.Counter(), collections.Counter()
  stack = []  # (end_ns, name) of the events that contain the current one.
  for event in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
    while stack and stack[-1][0] <= event.start_ns:
      stack.pop()
    if stack:
      spent[stack[-1][1]] -= event.duration_ns / 1e9
    spent[event.name] += event.duration_ns / 1e9
    counts[event.name] += 1
    stack.append((event.end_ns, event.name))
  return spent, counts


def profile(call, calls: int) -> dict:
  """`calls` traced calls, per call: seconds, the XLA threads' time by kind and by op,
  the events of each kind, and the time the intra-op pool's threads spent outside any
  event (idle)."""
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder):
    start = time.perf_counter()
    for _ in range(calls):
      call()
    seconds = (time.perf_counter() - start) / calls
  [path] = glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True)
  plane = jax.profiler.ProfileData.from_file(path).find_plane_with_name('/host:CPU')
  lines = {line.name: list(line.events) for line in plane.lines if line.name.startswith('tf_XLA')}
  lines = {name: events for name, events in lines.items() if events}
  start = min(e.start_ns for events in lines.values() for e in events)
  span = (max(e.end_ns for events in lines.values() for e in events) - start) / 1e9
  by_op, counts, idle = collections.Counter(), collections.Counter(), 0.0
  for name, events in lines.items():
    spent, seen = self_times(events)
    by_op.update(spent)
    counts.update(seen)
    if name.startswith(WORKERS):
      idle += span - sum(spent.values())
  by_kind, events_by_kind = collections.Counter(), collections.Counter()
  for name, spent in by_op.items():
    by_kind[kind(name)] += spent / calls
    events_by_kind[kind(name)] += counts[name] / calls
  return {
    'step_s': seconds,
    'span_s': span / calls,
    'worker_threads': sum(name.startswith(WORKERS) for name in lines),
    'idle_worker_thread_s': idle / calls,
    'thread_s_by_kind': dict(by_kind.most_common()),
    'events_by_kind': dict(events_by_kind.most_common()),
    'top_ops': {name: spent / calls for name, spent in by_op.most_common(15)},
  }


def main(argv: list[str] | None = None) -> None:
  """Profiles every (method, device count) and writes the JSON."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--methods', default='vanilla,l2p')
  parser.add_argument('--arch', default='resnet20')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--devices', default='1,2')
  parser.add_argument('--calls', type=int, default=3, help='traced calls per case')
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  bench_args = bench.parse_args(
    ['--batch', str(args.batch), '--devices', args.devices, '--out', os.devnull]
  )
  counts = bench.device_counts(bench_args)
  results = {'command': ['python', 'benchmarks/profile_step.py', *(argv or sys.argv[1:])]}
  results['load_before'] = list(os.getloadavg())
  for method in args.methods.split(','):
    for devices in counts:
      call, _ = bench.prepare_jax_train(
        bench_args, method, args.arch, 'float32', False, 'device', devices
      )
      case = profile(call, args.calls)
      results[f'{method}, {devices} devices'] = case
      print(method, devices, json.dumps({k: case[k] for k in list(case)[:6]}, indent=1))
  results['load_after'] = list(os.getloadavg())
  pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
