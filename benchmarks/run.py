r"""Throughput, compile time and peak memory of l2p-jax's training steps and attacks,
with a PyTorch reference of the same step timed in the same process.

Every figure is the median of --repeats timed calls made after compilation and
--warmup untimed calls; each call ends when its outputs are ready
(`jax.block_until_ready`). The JAX variants of one step and its PyTorch reference are
timed in interleaved rounds, so that their ratio holds even on a machine whose load
drifts. Results, with the machine, the versions and the load average around every
measurement, go to a JSON file that benchmarks/render.py turns into the tables of
BENCHMARKS.md.

  python benchmarks/run.py --suite all --out benchmarks/results/NAME.json
  python benchmarks/run.py --suite train --methods vanilla,l2p --archs resnet18 \
      --repeats 2 --out benchmarks/results/NAME.json
  python benchmarks/run.py --quick --out /tmp/quick.json   # a minute or two on a CPU
  python benchmarks/run.py --suite train --devices 1,2,4 --out /tmp/devices.json

On a CPU, JAX starts with as many host devices as the largest of --devices asks for
(default 0: two per available core, as train.py and eval.py), and each count is a
variant timed interleaved with the others.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import itertools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script from anywhere: find benchmarks/, configs/, l2p_jax.

from benchmarks import render  # noqa: E402
from configs import cifar  # noqa: E402
from l2p_jax import attacks, data, experiment, methods, models  # noqa: E402
from l2p_jax.evaluation import judging  # noqa: E402
from l2p_jax.runtime import host_devices, sharding  # noqa: E402
from l2p_jax.training import optim, schedule  # noqa: E402
from l2p_jax.training import setup as training_setup  # noqa: E402
from l2p_jax.training import step as step_lib  # noqa: E402

try:
  import torch

  from l2p_jax.interop.parity import torch_step
except ImportError:  # torch is optional: the JAX figures stand alone.
  torch = None

SUITES = ('train', 'attacks', 'all')
# Settings that change the speed of XLA:CPU or PyTorch's OpenMP threads, kept with results.
ENV_VARS = (
  'XLA_FLAGS',
  'OMP_NUM_THREADS',
  'OMP_WAIT_POLICY',
  'GOMP_SPINCOUNT',
  'MKL_NUM_THREADS',
  'CUDA_VISIBLE_DEVICES',
  'JAX_NUM_CPU_DEVICES',
)
ATTACKS = ('pgd7', 'eot_pgd', 'apgd', 'judge')
# Where a training step's batch comes from: the split kept on the device (the default
# of the training loop) or the host, gathered and transferred ahead of the step.
INPUTS = ('device', 'host')
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
MEAN_STD = data.KNOWN_CHANNEL_STATS['cifar10']
TRAIN_EXAMPLES = 50_000  # Adv-BNN's KL weight is 1 / N_train, as on CIFAR-10.
# --quick: a small network and batch, so the whole run takes a minute or two on a CPU.
QUICK = dict(
  archs='resnet8', width=0.5, batch=16, repeats=2, apgd_steps=4, eot_draws=2, split_examples=1024
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The command line; with --quick, the QUICK settings unless given explicitly."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--suite', choices=SUITES, default='all')
  parser.add_argument(
    '--methods',
    default=','.join(methods.METHODS),
    help='comma-separated training methods (train suite)',
  )
  parser.add_argument('--archs', default='resnet20,resnet18')
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=3, help='timed calls per case')
  parser.add_argument(
    '--warmup', type=int, default=1, help='untimed calls after compiling (at least 1)'
  )
  parser.add_argument('--dtypes', default='float32', help='float32,bfloat16 (JAX only)')
  parser.add_argument(
    '--unrolls', default='0', help='0 (rolled fori_loop), 1 (unrolled) or 0,1 (JAX only)'
  )
  parser.add_argument(
    '--inputs',
    default='device',
    help='device (split kept on the device), host or device,host (JAX)',
  )
  parser.add_argument(
    '--split-examples',
    type=int,
    default=TRAIN_EXAMPLES,
    help='random uint8 training split the steps draw batches from',
  )
  parser.add_argument(
    '--alternation',
    choices=experiment.ALTERNATIONS,
    default='paper',
    help="L2P's update order (both frameworks)",
  )
  parser.add_argument(
    '--conv-input-gradient',
    choices=models.CONV_INPUT_GRADIENTS,
    default='auto',
    help='model.conv_input_gradient (JAX only): auto, transposed_kernel (conv_same) or xla',
  )
  parser.add_argument('--attacks', default=','.join(ATTACKS))
  parser.add_argument(
    '--attack-methods',
    default='l2p',
    help='methods whose (randomly initialized) networks are attacked',
  )
  parser.add_argument(
    '--eot-draws', type=int, default=20, help='EOT draws of eot_pgd and apgd (AutoAttack-rand: 20)'
  )
  parser.add_argument(
    '--judge-draws', type=int, default=30, help="noise draws of 'judge' (eval's judge.draws)"
  )
  parser.add_argument(
    '--apgd-steps', type=int, default=100, help='iterations of each of APGD-CE and APGD-DLR'
  )
  parser.add_argument(
    '--devices',
    default='0',
    help='devices on the data mesh, comma-separated variants (e.g. 1,2,4); 0: one per '
    'available core on a CPU (fewer when that does not divide --batch), all on GPU/TPU',
  )
  parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference')
  parser.add_argument(
    '--compilation-cache',
    default='',
    help="JAX's persistent compilation cache folder (default: off, so compile times are "
    'real; with a folder another process warmed, they are cache loads)',
  )
  parser.add_argument('--quick', action='store_true', help=f'defaults {QUICK}')
  parser.add_argument('--out', required=True, help='JSON file to write')
  args = parser.parse_args(argv)
  if args.quick:
    parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  for name, allowed in (
    ('methods', methods.METHODS),
    ('attack_methods', methods.METHODS),
    ('attacks', ATTACKS),
    ('dtypes', tuple(experiment.DTYPES)),
    ('inputs', INPUTS),
    ('unrolls', ('0', '1')),
  ):
    values = [v for v in getattr(args, name).split(',') if v]
    bad = [v for v in values if v not in allowed]
    if bad:
      parser.error(f'--{name.replace("_", "-")}: unknown {bad}; expected from {allowed}')
    setattr(args, name, values)
  args.archs = [a for a in args.archs.split(',') if a]
  for arch in args.archs:
    models.resnet_layout(arch)
  args.unrolls = [v == '1' for v in args.unrolls]
  if not all(v.isdigit() for v in args.devices.split(',')):
    parser.error(f'--devices {args.devices}: expected counts like 1,2,4 (0: the default)')
  args.devices = [int(v) for v in args.devices.split(',')]
  if min(args.repeats, args.batch, args.warmup) < 1:
    parser.error('--repeats, --batch and --warmup must be at least 1')
  if args.split_examples < args.batch:
    parser.error(f'--split-examples {args.split_examples} is smaller than --batch {args.batch}')
  return args


# --- the machine and the measurements --------------------------------------------


def machine_info() -> dict[str, Any]:
  """CPU model, cores, memory, accelerators and library versions of this machine."""

  def first(path: str, key: str) -> str | None:
    try:
      with open(path) as f:
        return next((line.split(':', 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
      return None

  devices = jax.devices()
  versions = {
    'python': platform.python_version(),
    'jax': jax.__version__,
    'jaxlib': importlib.metadata.version('jaxlib'),
    'flax': importlib.metadata.version('flax'),
    'optax': importlib.metadata.version('optax'),
    'torch': torch.__version__ if torch else None,
  }
  return {
    'cpu': first('/proc/cpuinfo', 'model name') or platform.processor(),
    'cpu_count': os.cpu_count(),
    'usable_cores': len(os.sched_getaffinity(0)),
    'memory_total': first('/proc/meminfo', 'MemTotal'),
    'platform': platform.platform(),
    'jax_backend': jax.default_backend(),
    'devices': [d.device_kind for d in devices],
    'gpu': devices[0].device_kind if devices[0].platform == 'gpu' else None,
    'torch_threads': torch.get_num_threads() if torch else None,
    'torch_device': torch_device() if torch else None,
    'env': {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    'versions': versions,
  }


def code_info() -> dict[str, Any]:
  """Which l2p_jax was measured: its path, the git commit and whether it was modified."""

  def git(*cmd: str) -> str | None:
    try:
      return subprocess.run(
        ['git', '-C', str(ROOT), *cmd], capture_output=True, text=True, check=True
      ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      return None

  status = git('status', '--porcelain', '--', 'l2p_jax')
  return {
    'l2p_jax': os.path.dirname(optim.__file__),
    'commit': git('rev-parse', 'HEAD'),
    'l2p_jax_modified': bool(status) if status is not None else None,
  }


def torch_device() -> str:
  """Where the PyTorch reference runs: the GPU when there is one, as JAX would."""
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def resident_bytes() -> int | None:
  """The process's resident memory now (Linux), None where /proc is unavailable."""
  try:
    with open('/proc/self/status') as f:
      line = next(line for line in f if line.startswith('VmRSS:'))
    return int(line.split()[1]) * 1024
  except (OSError, StopIteration):
    return None


def reset_peak_memory() -> bool:
  """Starts a new peak: the device's where PyTorch can, the process RSS high-water mark
  (Linux /proc/self/clear_refs) otherwise; returns whether the RSS peak was reset."""
  if torch and torch_device() == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_memory(framework: str, reset: bool, start_bytes: int | None) -> dict[str, Any]:
  """Peak memory of a case's preparation (compile and warm-up calls): device
  peak_bytes_in_use (JAX on GPU/TPU; the process lifetime's peak, JAX cannot reset
  it), torch.cuda.max_memory_allocated, or, on a CPU where memory_stats() is None,
  the process RSS peak (ru_maxrss, since the case began when `reset`) and its growth
  over the RSS at the start (what the case added to what was resident before)."""
  if framework == 'torch' and torch_device() == 'cuda':
    return {
      'source': 'torch.cuda.max_memory_allocated',
      'peak_bytes': torch.cuda.max_memory_allocated(),
    }
  stats = jax.devices()[0].memory_stats() if framework == 'jax' else None
  if stats and 'peak_bytes_in_use' in stats:
    return {
      'source': 'jax memory_stats peak_bytes_in_use (process lifetime)',
      'peak_bytes': stats['peak_bytes_in_use'],
    }
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {
    'source': 'process RSS peak (ru_maxrss'
    + (', reset before the case)' if reset else ', process lifetime)'),
    'peak_bytes': peak,
    'growth_bytes': peak - start_bytes if reset and start_bytes else None,
  }


def warm_up(call: Callable[[], Any], calls: int) -> float:
  """Makes `calls` untimed calls (at least one) and returns the first one's seconds."""
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  for _ in range(calls - 1):
    call()
  return first


def time_interleaved(calls: list[Callable[[], Any]], repeats: int) -> list[list[float]]:
  """Seconds of `repeats` rounds of calls, each round calling every entry of `calls`
  once in turn, so that cases compared with each other share the machine's load."""
  times = [[] for _ in calls]
  for _ in range(repeats):
    for call, spent in zip(calls, times):
      start = time.perf_counter()
      call()
      spent.append(time.perf_counter() - start)
  return times


def compile_jax(jitted, *args, **static) -> tuple[Any, dict[str, Any]]:
  """Lowers and compiles `jitted` for `args`, returning the executable and what XLA says
  of it: trace/compile seconds, flops (while-loop bodies counted once), buffer sizes,
  and the number of host callbacks in the program (0: no host round trip inside)."""
  start = time.perf_counter()
  lowered = jitted.lower(*args, **static)
  traced = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  return compiled, {
    'trace_s': traced - start,
    'compile_s': done - traced,
    'flops': float(cost.get('flops', 0.0)) if cost else None,
    'argument_bytes': getattr(memory, 'argument_size_in_bytes', None),
    'output_bytes': getattr(memory, 'output_size_in_bytes', None),
    'alias_bytes': getattr(memory, 'alias_size_in_bytes', None),
    'temp_bytes': getattr(memory, 'temp_size_in_bytes', None),
    'host_callbacks': lowered.as_text().count('callback'),
  }


# A case to measure: (framework, record fields, function preparing it). Preparing
# builds, compiles and warms up, and returns the call to time and what it learned.
Case = tuple[str, dict[str, Any], Callable[[], tuple[Callable[[], Any], dict[str, Any]]]]


def measure_group(cases: list[Case], args: argparse.Namespace, results: dict[str, Any]) -> None:
  """Prepares each case (with its peak memory), times all of them interleaved, appends
  their records to `results` and rewrites the JSON file (a long run keeps what it has)."""
  prepared = []
  for framework, record, prepare in cases:
    print(f'[{framework}] ' + ' '.join(f'{k}={v}' for k, v in record.items()), flush=True)
    reset, start_bytes = reset_peak_memory(), resident_bytes()
    try:
      call, info = prepare()
    except Exception as error:  # Record it (e.g. out of memory) and go on with the rest.
      print(f'  FAILED: {error!r}', flush=True)
      results['failed'].append({'framework': framework, **record, 'error': repr(error)})
      continue
    prepared.append(
      (
        call,
        {
          'framework': framework,
          **record,
          **info,
          'memory': peak_memory(framework, reset, start_bytes),
        },
      )
    )
  load_before = list(os.getloadavg())
  times = time_interleaved([call for call, _ in prepared], args.repeats)
  load_after = list(os.getloadavg())
  for (_, record), spent in zip(prepared, times):
    median = statistics.median(spent)
    results['cases'].append(
      {
        **record,
        'times_s': spent,
        'median_s': median,
        'images_per_s': args.batch / median,
        'load_before': load_before,
        'load_after': load_after,
      }
    )
    print(
      f'  {record["framework"]}: median {median:.3f} s, {args.batch / median:.1f} images/s',
      flush=True,
    )
  print(f'  load {load_before[0]:.2f} -> {load_after[0]:.2f}', flush=True)
  write_json(results, args.out)


def write_json(results: dict[str, Any], out: str) -> None:
  """Writes the results file atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=1)
  os.replace(tmp, out)


# --- what is measured ---------------------------------------------------------------


def experiment_config(
  method: str,
  arch: str,
  *,
  width: float = 1.0,
  batch: int = 128,
  alternation: str = 'paper',
  dtype: str = 'float32',
  unroll: bool = False,
  conv_input_gradient: str = 'auto',
):
  """The paper's config of `method` on `arch`, in the phase where everything is on:
  noise (from epoch 0), PGD examples (except method none), noise-parameter updates."""
  config = cifar.get_config(f'{method},{arch},cifar10')
  config.model.width = width
  config.model.dtype = dtype
  config.model.conv_input_gradient = conv_input_gradient
  config.adv.unroll = unroll
  config.batch_size = batch
  config.l2p.alternation = alternation
  config.l2p.noise_start_epoch = 0
  if methods.get(method).adversarial:
    config.adv.start_epoch = 0
  return config


def random_batch(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A uint8 NHWC image batch and labels, as the data pipeline yields them."""
  rng = np.random.default_rng(seed)
  return {
    'image': rng.integers(0, 256, (batch, *IMAGE_SHAPE), dtype=np.uint8),
    'label': rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
  }


@functools.lru_cache(maxsize=1)
def random_split(num_examples: int) -> data.HostSplit:
  """A CIFAR-sized uint8 training split of random images, as the loader returns one."""
  rng = np.random.default_rng(3)
  return data.HostSplit(
    'random',
    'train',
    num_classes=NUM_CLASSES,
    images=rng.integers(0, 256, (num_examples, *IMAGE_SHAPE), dtype=np.uint8),
    labels=rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32),
  )


def jax_model_and_state(config, mesh: jax.sharding.Mesh):
  """The model, optimizers and a fresh initial train state (replicated on `mesh`) of
  `config`; the jitted initializer is compiled once per network and reused."""
  model, optimizers, init = _initializer(
    config.method,
    config.model.arch,
    config.model.width,
    config.model.dtype,
    config.model.conv_input_gradient,
    mesh,
  )
  return model, optimizers, init(jax.random.key(config.seed))


@functools.cache
def _initializer(method: str, arch: str, width: float, dtype: str, conv_input_gradient: str, mesh):
  setup = jax_setup(
    experiment_config(
      method, arch, width=width, dtype=dtype, conv_input_gradient=conv_input_gradient
    )
  )
  init = setup.initializer(IMAGE_SHAPE, out_shardings=sharding.replicated_sharding(mesh))
  return setup.model, setup.optimizers, init


def jax_setup(config) -> training_setup.RunSetup:
  """The run setup of `config` on the benchmark's random CIFAR-shaped split, as the
  training loop builds it."""
  return training_setup.run_setup(config, NUM_CLASSES, *MEAN_STD, TRAIN_EXAMPLES)


def args_config(args: argparse.Namespace, method: str, arch: str, **kwargs):
  """experiment_config with the command line's width, batch, L2P alternation and
  convolution gradient."""
  return experiment_config(
    method,
    arch,
    width=args.width,
    batch=args.batch,
    alternation=args.alternation,
    conv_input_gradient=args.conv_input_gradient,
    **kwargs,
  )


def prepare_jax_train(
  args: argparse.Namespace,
  method: str,
  arch: str,
  dtype: str,
  unroll: bool,
  inputs: str,
  devices: int,
) -> tuple[Callable[[], None], dict[str, Any]]:
  """One training step as the training loop jits it (state donated), compiled ahead of
  time, with a check that the donated state buffers were reused. inputs='device': the
  loop's default, batches gathered inside the step from a split kept on the device,
  every call under a transfer guard that forbids any implicit host-device copy;
  'host': each call takes the next batch gathered on the host and transferred ahead
  (two in flight), as with data.on_device=False."""
  config = args_config(args, method, arch, dtype=dtype, unroll=unroll)
  mesh = sharding.make_mesh(devices)
  model, optimizers, state = jax_model_and_state(config, mesh)
  split = random_split(args.split_examples)
  lr, reg_weight, epoch_start = sharding.replicate(
    mesh, (np.float32(config.optim.learning_rate), np.float32(config.l2p.gamma), np.int32(0))
  )
  setup = jax_setup(config)
  step_kwargs = dict(model=model, settings=setup.settings, optimizers=optimizers)
  phase = schedule.phase_for_epoch(config, setup.method, 0)
  if inputs == 'device':
    step = functools.partial(
      step_lib.train_step_on_split,
      batch_size=args.batch,
      batch_sharding=sharding.data_sharding(mesh),
      **step_kwargs,
    )
    # Call k takes batch k of epoch 0 (past the epoch's end, its last batch again).
    call_inputs = itertools.repeat(
      (
        data.put_on_mesh(mesh, split),
        data.epoch_order_on_mesh(mesh, 0, 0, split.num_examples),
        epoch_start,
      )
    )
  else:
    step = functools.partial(step_lib.train_step, **step_kwargs)
    call_inputs = (
      (batch,)
      for batch in data.device_batches(
        mesh,
        itertools.chain.from_iterable(
          data.train_batches(split, seed=0, epoch=e, batch_size=args.batch)
          for e in itertools.count()
        ),
      )
    )
  step_inputs = next(call_inputs)
  guard = 'disallow' if inputs == 'device' else 'allow'
  jitted = jax.jit(step, static_argnames='phase', donate_argnums=0)
  compiled, xla = compile_jax(jitted, state, *step_inputs, lr, reg_weight, phase=phase)
  state_buffers = jax.tree.leaves(state)
  current = [state, step_inputs]

  def call() -> None:
    with jax.transfer_guard(guard):
      current[0] = compiled(current[0], *current[1], lr, reg_weight)[0]
      current[1] = next(call_inputs)
      jax.block_until_ready(current[0])

  first = warm_up(call, args.warmup)
  donated = sum(b.is_deleted() for b in state_buffers)
  return call, {
    'compile': xla,
    'first_call_s': first,
    'pgd_steps': config.adv.steps if phase.adversarial else 0,
    'checks': {
      'state_buffers': len(state_buffers),
      'donated_buffers': int(donated),
      'transfer_guard': guard,
      'host_callbacks': xla['host_callbacks'],
    },
  }


def attack_fn(name: str, args: argparse.Namespace, unroll: bool) -> tuple[Callable, int, int]:
  """(function of (logits_fn, key, x, y) returning what a call computes, EOT draws, input
  gradients per example) of a name in ATTACKS: an attack's examples, or for 'judge' the
  verdicts of --judge-draws noise draws on the inputs (evaluation's judging, forward
  passes only)."""
  loop_unroll = True if unroll else 1
  pgd = functools.partial(attacks.pgd, eps=8 / 255, steps=7, step_size=0.01, unroll=loop_unroll)
  if name == 'judge':
    judge = functools.partial(
      judging.judged_right, judged_draws=args.judge_draws, rule='single', draws=1
    )
    return lambda logits_fn, key, x, y: judge(logits_fn, key, x, y), 1, 0
  if name == 'pgd7':
    attack, draws, grads = pgd, 1, 7
  elif name == 'eot_pgd':
    attack, draws, grads = functools.partial(pgd, eot_draws=args.eot_draws), args.eot_draws, 7
    grads *= args.eot_draws
  else:
    attack = functools.partial(
      attacks.autoattack_rand,
      eps=8 / 255,
      steps=args.apgd_steps,
      eot_draws=args.eot_draws,
      unroll=loop_unroll,
    )
    draws, grads = args.eot_draws, 2 * (args.apgd_steps + 1) * args.eot_draws
  return lambda logits_fn, key, x, y: attack(logits_fn, key, x, y).x_adv, draws, grads


def prepare_jax_attack(
  args: argparse.Namespace,
  method: str,
  arch: str,
  attack: str,
  dtype: str,
  unroll: bool,
  devices: int,
) -> tuple[Callable[[], None], dict[str, Any]]:
  """One jitted attack on a batch, the network in evaluation mode with its noise on."""
  config = args_config(args, method, arch, dtype=dtype, unroll=unroll)
  mesh = sharding.make_mesh(devices)
  model, _, state = jax_model_and_state(config, mesh)
  batch = sharding.shard_batch(mesh, random_batch(args.batch, seed=1))
  fn, _, _ = attack_fn(attack, args, unroll)
  noise = schedule.phase_for_epoch(config, methods.get(method), 0).noise

  def run(variables, key, images, labels):
    def logits_fn(x, k):
      return model.apply(variables, x, train=False, noise=noise, rngs={'noise': k})

    return fn(logits_fn, key, data.to_float(images), labels)

  key = jax.device_put(jax.random.key(2), sharding.replicated_sharding(mesh))
  inputs = (state.variables, key, batch['image'], batch['label'])
  compiled, xla = compile_jax(jax.jit(run), *inputs)

  def call() -> None:
    with jax.transfer_guard('disallow'):
      jax.block_until_ready(compiled(*inputs))

  return call, {
    'compile': xla,
    'first_call_s': warm_up(call, args.warmup),
    'checks': {'transfer_guard': 'disallow', 'host_callbacks': xla['host_callbacks']},
  }


def torch_inputs(batch: int, seed: int) -> tuple[Any, Any]:
  """random_batch as NCHW torch tensors on the reference's device."""
  host = random_batch(batch, seed)
  images = torch.from_numpy(host['image'].transpose(0, 3, 1, 2).copy())
  labels = torch.from_numpy(host['label']).long()
  return images.to(torch_device()), labels.to(torch_device())


def torch_sync() -> None:
  """Waits for queued GPU work, so a timed call ends when its work does."""
  if torch_device() == 'cuda':
    torch.cuda.synchronize()


def torch_model(method: str, arch: str, args: argparse.Namespace, config):
  """The authors' network for `method` on the reference's device."""
  torch.manual_seed(0)
  return torch_step.build_model(
    method,
    arch,
    num_classes=NUM_CLASSES,
    width=args.width,
    mean=MEAN_STD[0],
    std=MEAN_STD[1],
    pni_mode=config.model.pni_mode,
    bnn_init_sigma=config.model.bnn_init_sigma,
  ).to(torch_device())


def prepare_torch_train(
  args: argparse.Namespace, method: str, arch: str
) -> tuple[Callable[[], None], dict[str, Any]]:
  """The PyTorch reference of the same training iteration (same network, batch, PGD)."""
  config = args_config(args, method, arch)
  model = torch_model(method, arch, args, config)
  adversarial = schedule.phase_for_epoch(config, methods.get(method), 0).adversarial
  step = torch_step.make_train_step_for_config(model, config, kl_weight=1.0 / TRAIN_EXAMPLES)
  images, labels = torch_inputs(args.batch, 0)

  def call() -> None:
    step(
      torch_step.augment(images),
      labels,
      lr=config.optim.learning_rate,
      reg_weight=config.l2p.gamma,
      adversarial=adversarial,
    )
    torch_sync()

  return call, {
    'first_call_s': warm_up(call, args.warmup),
    'pgd_steps': config.adv.steps if adversarial else 0,
  }


def prepare_torch_pgd(
  args: argparse.Namespace, method: str, arch: str
) -> tuple[Callable[[], None], dict[str, Any]]:
  """PyTorch PGD-7 on the authors' network in evaluation mode, noise on."""
  model = torch_model(method, arch, args, args_config(args, method, arch)).eval()
  images, labels = torch_inputs(args.batch, 1)

  def call() -> None:
    torch_step.pgd(model, images.float() / 255, labels, eps=8 / 255, steps=7, step_size=0.01)
    torch_sync()

  return call, {'first_call_s': warm_up(call, args.warmup)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the suites of `argv` with the persistent compilation cache off (so compile
  times are real) unless --compilation-cache names one, and returns the results it
  wrote."""
  args = parse_args(argv)
  args.devices = device_counts(args)
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', bool(args.compilation_cache))
  if args.compilation_cache:  # Every program is cached, however fast it compiled.
    jax.config.update('jax_compilation_cache_dir', args.compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  try:
    return run_suites(args)
  finally:
    jax.config.update('jax_enable_compilation_cache', cache)
    if torch is not None:
      torch.set_flush_denormal(False)  # PyTorch's default, for callers in this process.


def device_counts(args: argparse.Namespace) -> list[int]:
  """Starts JAX with enough CPU devices for --devices (its 0: train.py's default, two per
  available core, fewer when that does not divide --batch; every device on GPU/TPU) and returns the
  counts, exiting with a message when there are fewer devices than one asks for."""
  default = host_devices.default_count(host_devices.available_cores(), [args.batch])
  host_devices.configure({'--batch': args.batch}, max(n or default for n in args.devices))
  everything = default if jax.default_backend() == 'cpu' else jax.device_count()
  counts = list(dict.fromkeys(n or everything for n in args.devices))
  if max(counts) > jax.device_count():
    raise SystemExit(f'--devices {max(counts)}: JAX has only {jax.device_count()} devices.')
  return counts


def run_suites(args: argparse.Namespace) -> dict[str, Any]:
  """Measures every case `args` asks for; each JAX case is timed interleaved with its
  variants and its PyTorch reference, and the JSON file is rewritten after each group."""
  use_torch = torch is not None and not args.no_torch
  if use_torch:
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # The cores XLA:CPU uses.
    # XLA:CPU flushes denormals to zero; without the same, PyTorch's CPU step at random
    # initialization spends a third more time on denormal arithmetic (measured).
    torch.set_flush_denormal(True)
  notes = []
  if torch is None:
    notes.append(
      'PyTorch is not installed: no reference step was measured (pip install -e ".[torch]").'
    )
  results = {
    'schema': 1,
    'created': datetime.datetime.now().isoformat(timespec='seconds'),
    'command': ['python', 'benchmarks/run.py', *args.argv],
    'machine': {**machine_info(), 'torch_flush_denormal': use_torch},
    'code': code_info(),
    'settings': {k: v for k, v in vars(args).items() if k not in ('out', 'argv')},
    'notes': notes,
    'cases': [],
    'failed': [],
  }
  variants = [(dtype, unroll) for dtype in args.dtypes for unroll in args.unrolls]
  for arch in args.archs:
    common = dict(arch=arch, width=args.width, batch=args.batch)
    if args.suite in ('train', 'all'):
      for method in args.methods:
        info = dict(suite='train', method=method, **common)
        group = [
          (
            'jax',
            {**info, 'dtype': dtype, 'unroll': unroll, 'input': inputs, 'devices': devices},
            functools.partial(
              prepare_jax_train, args, method, arch, dtype, unroll, inputs, devices
            ),
          )
          for dtype, unroll in variants
          for inputs in args.inputs
          for devices in args.devices
        ]
        if use_torch:
          group.append(
            (
              'torch',
              {**info, 'dtype': 'float32'},
              functools.partial(prepare_torch_train, args, method, arch),
            )
          )
        measure_group(group, args, results)
    if args.suite in ('attacks', 'all'):
      for method in args.attack_methods:
        for attack in args.attacks:
          _, draws, grads = attack_fn(attack, args, False)
          info = dict(
            suite='attacks',
            method=method,
            attack=attack,
            **common,
            eot_draws=draws,
            grads_per_example=grads,
          )
          group = [
            (
              'jax',
              {**info, 'dtype': dtype, 'unroll': unroll, 'devices': devices},
              functools.partial(
                prepare_jax_attack, args, method, arch, attack, dtype, unroll, devices
              ),
            )
            for dtype, unroll in variants
            for devices in args.devices
          ]
          if use_torch and attack == 'pgd7':
            group.append(
              (
                'torch',
                {**info, 'dtype': 'float32'},
                functools.partial(prepare_torch_pgd, args, method, arch),
              )
            )
          measure_group(group, args, results)
  print(render.render_result(args.out, results))
  return results


if __name__ == '__main__':
  main()
