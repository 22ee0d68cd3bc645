r"""The jobs benchmarks/device_check.py runs in processes of their own: one training step
of every method and a PGD run, each twice from the same key (same bits?) and once from
another; one training run of L2P through the training loop on synthetic CIFAR-shaped
images; and a profile of benchmarks/run.py's training step.

  python benchmarks/device_jobs.py determinism --arch resnet8 --batch 64 --out det.json
  python benchmarks/device_jobs.py epoch --train-images 50000 --test-images 10000 --out e.json
  python benchmarks/device_jobs.py profile --arch resnet20 --batch 128 --out profile.json

Each job rewrites its JSON file as it goes, so a job stopped at its time limit leaves
what it finished.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import hashlib
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script from anywhere: find benchmarks/, configs/, l2p_jax.
sys.path.insert(0, str(ROOT / 'tests'))  # fake_datasets, the synthetic CIFAR-10 archives.

import fake_datasets  # noqa: E402

from benchmarks import profile_step  # noqa: E402
from benchmarks import run as bench  # noqa: E402
from l2p_jax import attacks, data, methods  # noqa: E402
from l2p_jax.runtime import sharding  # noqa: E402
from l2p_jax.runtime.metrics import read_metrics  # noqa: E402
from l2p_jax.training import loop, schedule  # noqa: E402
from l2p_jax.training import step as step_lib  # noqa: E402

JOBS = ('determinism', 'epoch', 'profile')


def write(results: dict[str, Any], out: str) -> None:
  """Rewrites the job's JSON file atomically."""
  bench.write_json(results, out)


def digest(tree: Any) -> str:
  """SHA-256 of every array of `tree`, in order: equal digests mean equal bits."""
  sha = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    sha.update(np.asarray(leaf).tobytes())
  return sha.hexdigest()


def step_bits(method: str, args: argparse.Namespace) -> dict[str, Any]:
  """One training step of `method` (everything on: noise, PGD, noise updates) from one
  state, twice, and once more as step 1 (other keys): its loss and the states' digests."""
  config = bench.experiment_config(method, args.arch, width=args.width, batch=args.batch)
  mesh = sharding.make_mesh(1)
  model, optimizers, state = bench.jax_model_and_state(config, mesh)
  setup = bench.jax_setup(config)
  method_record, settings = setup.method, setup.settings
  step = jax.jit(
    functools.partial(step_lib.train_step, model=model, settings=settings, optimizers=optimizers),
    static_argnames='phase',
  )
  batch = sharding.shard_batch(mesh, bench.random_batch(args.batch))
  lr, reg = np.float32(config.optim.learning_rate), np.float32(config.l2p.gamma)
  phase = schedule.phase_for_epoch(config, method_record, 0)
  runs = [
    step(s, batch, lr, reg, phase=phase) for s in (state, state, state.replace(step=state.step + 1))
  ]
  first, again, other = (digest(new) for new, _ in runs)
  loss = float(runs[0][1]['loss'])
  return {
    'loss': loss,
    'finite': bool(runs[0][1]['finite']) and bool(np.isfinite(loss)),
    'digest': first,
    'same_bits': first == again,
    'other_key_differs': first != other,
  }


def pgd_bits(method: str, args: argparse.Namespace) -> dict[str, Any]:
  """PGD-7 against `method`'s network (noise on) from one key twice and from another."""
  config = bench.experiment_config(method, args.arch, width=args.width, batch=args.batch)
  model, _, state = bench.jax_model_and_state(config, sharding.make_mesh(1))
  batch = bench.random_batch(args.batch, seed=1)
  x = data.to_float(jax.numpy.asarray(batch['image']))

  @jax.jit
  def run(key):
    def logits_fn(images, k):
      return model.apply(state.variables, images, train=False, noise=True, rngs={'noise': k})

    return attacks.pgd(logits_fn, key, x, batch['label'], eps=8 / 255, steps=7, step_size=0.01)

  first, again, other = (digest(run(jax.random.key(k))) for k in (0, 0, 1))
  return {'digest': first, 'same_bits': first == again, 'other_key_differs': first != other}


def determinism(args: argparse.Namespace) -> dict[str, Any]:
  """step_bits of every method of --methods and pgd_bits against the last, with the XLA
  flags they ran under."""
  results = {'xla_flags': os.environ.get('XLA_FLAGS', ''), 'arch': args.arch, 'methods': {}}
  for method in args.methods.split(','):
    results['methods'][method] = step_bits(method, args)
    write(results, args.out)
  results['pgd'] = pgd_bits(method, args)
  return results


def watch_records(path: str, seen: list[float], stop: threading.Event) -> None:
  """Appends the time at which each new line of the metrics file `path` appeared."""
  while not stop.wait(0.05):
    if os.path.exists(path):
      with open(path) as f:
        lines = sum(1 for line in f if line.strip())
      seen.extend([time.perf_counter()] * (lines - len(seen)))


def epoch(args: argparse.Namespace) -> dict[str, Any]:
  """--epochs epochs of --method (noise and PGD on from the first) through the training loop,
  on synthetic CIFAR-10 archives of --train-images and --test-images images: each
  epoch's training seconds (the loop's record; the first includes compilation) and the
  seconds between consecutive epochs' records (training, evaluation on the test images,
  the noise statistics and the checkpoint: what every further epoch costs)."""
  folder = tempfile.mkdtemp(prefix='device_epoch_')
  fake_datasets.write_cifar10(pathlib.Path(folder), args.train_images, args.test_images)
  config = bench.experiment_config(args.method, args.arch, width=args.width, batch=args.batch)
  config.data.source, config.data.local_dir = 'local', folder
  config.num_epochs, config.progress_bar = args.epochs, False
  config.eval_batch_size = min(config.eval_batch_size, args.test_images)
  workdir = os.path.join(folder, 'workdir')
  seen, stop = [], threading.Event()
  watcher = threading.Thread(
    target=watch_records, args=(os.path.join(workdir, 'metrics.jsonl'), seen, stop)
  )
  watcher.start()
  start = time.perf_counter()
  try:
    loop.train_and_evaluate(config, workdir)
  finally:
    stop.set()
    watcher.join()
  wall = time.perf_counter() - start
  records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return {
    'method': args.method,
    'arch': args.arch,
    'width': args.width,
    'batch': args.batch,
    'train_images': args.train_images,
    'test_images': args.test_images,
    'steps_per_epoch': data.steps_per_epoch(args.train_images, args.batch),
    'epoch_train_s': [r['epoch_seconds'] for r in records],
    'between_records_s': [b - a for a, b in zip(seen, seen[1:])],
    'wall_s': wall,
    'final_loss': records[-1]['train_loss'],
  }


def kernel_kind(name: str) -> str:
  """The kind of a GPU kernel by its name."""
  lowered = name.lower()
  if any(k in lowered for k in ('conv', 'cudnn', 'implicit_gemm', 'wgrad', 'dgrad', 'fprop')):
    return 'convolution'
  if any(k in lowered for k in ('gemm', 'cublas', 'xmma', 'cutlass')):
    return 'matrix product'
  if any(k in lowered for k in ('memcpy', 'memset', 'copy')):
    return 'copy'
  if 'reduce' in lowered:
    return 'reduction'
  return 'fusion (elementwise)'


def gpu_profile(call: Callable[[], None], calls: int) -> dict[str, Any]:
  """`calls` traced calls on the GPU, per call: wall seconds, kernels, their seconds
  summed and as the union of their intervals (the GPU busy), by kind and the 15 kernels
  of most time; the GPU idles for the rest of the wall time (launches, host work)."""
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder):
    start = time.perf_counter()
    for _ in range(calls):
      call()
    wall = (time.perf_counter() - start) / calls
  [path] = glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True)
  profile = jax.profiler.ProfileData.from_file(path)
  events = [
    event
    for plane in profile.planes
    if plane.name.startswith('/device:GPU')
    for line in plane.lines
    if line.name.startswith('Stream')
    for event in line.events
  ]
  by_name, by_kind = collections.Counter(), collections.Counter()
  for event in events:
    by_name[event.name] += event.duration_ns / 1e9 / calls
    by_kind[kernel_kind(event.name)] += event.duration_ns / 1e9 / calls
  busy, end = 0, 0
  for event in sorted(events, key=lambda e: e.start_ns):
    busy += max(0, event.end_ns - max(event.start_ns, end))
    end = max(end, event.end_ns)
  return {
    'step_s': wall,
    'kernels_per_call': len(events) / calls,
    'kernel_s': sum(by_name.values()),
    'busy_s': busy / 1e9 / calls,
    'busy_fraction': busy / 1e9 / calls / wall,
    'kernel_s_by_kind': dict(by_kind.most_common()),
    'top_kernels': {name[:120]: s for name, s in by_name.most_common(15)},
  }


def profile(args: argparse.Namespace) -> dict[str, Any]:
  """benchmarks/run.py's L2P step (float32, batch on the device): the median of --calls
  timed calls, then their profile, on a GPU gpu_profile's, on a CPU profile_step's."""
  bench_args = bench.parse_args(
    ['--batch', str(args.batch), '--width', str(args.width), '--devices', '1']
    + ['--split-examples', str(args.split_examples), '--out', os.devnull]
  )
  call, info = bench.prepare_jax_train(bench_args, 'l2p', args.arch, 'float32', False, 'device', 1)
  times = bench.time_interleaved([call], args.calls)[0]
  traced = gpu_profile if jax.default_backend() == 'gpu' else profile_step.profile
  return {
    'method': 'l2p',
    'arch': args.arch,
    'batch': args.batch,
    'compile_s': info['compile']['trace_s'] + info['compile']['compile_s'],
    'median_s': statistics.median(times),
    'profile': traced(call, args.calls),
  }


def main(argv: list[str] | None = None) -> None:
  """Runs one job and writes its JSON."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('job', choices=JOBS)
  parser.add_argument('--arch', default='resnet20')
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--train-images', type=int, default=50_000)
  parser.add_argument('--test-images', type=int, default=10_000)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--split-examples', type=int, default=bench.TRAIN_EXAMPLES)
  parser.add_argument('--calls', type=int, default=5)
  parser.add_argument('--methods', default=','.join(methods.METHODS), help='determinism')
  parser.add_argument('--method', default='l2p', help='epoch')
  parser.add_argument(
    '--compilation-cache', default='', help="JAX's persistent compilation cache folder"
  )
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  if args.compilation_cache:  # Every program is cached, however fast it compiled.
    jax.config.update('jax_compilation_cache_dir', args.compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  job = {'determinism': determinism, 'epoch': epoch, 'profile': profile}[args.job]
  write({'job': args.job, 'backend': jax.default_backend(), **job(args)}, args.out)


if __name__ == '__main__':
  main()
