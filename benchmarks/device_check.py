r"""One command that checks l2p-jax on a lent GPU and times it against the PyTorch
reference in about 8 minutes of one H100, writing one JSON that benchmarks/render.py
turns into BENCHMARKS.md's GPU section (benchmarks/README.md: how to run it there).

  python benchmarks/device_check.py --wheels benchmarks/device_wheels \
      --out $OUT/device_check.json
  python benchmarks/device_check.py --dry-run --out /tmp/device_check.json  # CPU, tiny

Phases, each in processes of its own with its own time limit; a phase past its limit is
stopped and the JSON, rewritten after every phase, keeps what finished:
1. checks, side by side: the suite's fast GPU-relevant test files; one training step of
   every method and a PGD run, each twice from one key and once from another, in two
   processes under --xla_gpu_deterministic_ops=true (the same bits within and across
   processes?); and benchmarks/run.py's cases compiled into a shared compilation cache,
   so that the timed phases load rather than compile (their cold compile times are kept).
2. timings, one at a time on the otherwise idle device: the training steps (vanilla,
   PNI, L2P; ResNet-20 and ResNet-18; float32 and bfloat16; batch 128 on the device)
   against the PyTorch reference; two epochs of L2P ResNet-20 through the training loop
   on 50,000 synthetic images (the 350-epoch time follows; its step, compiled alone on
   the device, is a control for the executables compiled beside the checks); PGD-7,
   EOT-PGD, APGD-rand and the judging over 30 draws (the default evaluation of 10,000
   images follows); and a profile of the L2P step.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import IO, Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Run as a script from anywhere: find benchmarks/, configs/, l2p_jax.

from benchmarks import render  # noqa: E402

DETERMINISTIC = '--xla_gpu_deterministic_ops=true'
TEST_FILES = (
  'tests/test_models.py',
  'tests/test_attacks.py',
  'tests/test_methods.py',
  'tests/test_judging.py',
)
ATTACKS = 'pgd7,eot_pgd,apgd,judge'
EPOCHS_OF_A_RUN = 350  # The paper's CIFAR-10 schedule.
# Sizes and per-phase seconds: 'gpu' fits about 8 minutes of one H100; 'dry' runs the
# same code paths on a CPU with tiny networks (tests/test_device_check.py).
SIZES = {
  'gpu': dict(
    test_filter='',
    test_workers=4,
    det_methods='none,vanilla,pni,adv_bnn,l2p',
    det_arch='resnet8',
    det_width=1.0,
    det_batch=64,
    methods='l2p,vanilla,pni',
    archs='resnet20,resnet18',
    width=1.0,
    batch=128,
    dtypes='float32,bfloat16',
    split_examples=50_000,
    train_repeats=20,
    train_warmup=3,
    attack_arch='resnet20',
    warm_attack_groups=ATTACKS.split(','),  # One process each: their compiles overlap.
    eot_draws=20,
    apgd_steps=20,
    judge_draws=30,
    attack_repeats=3,
    epoch_method='l2p',
    epoch_arch='resnet20',
    epoch_width=1.0,
    train_images=50_000,
    test_images=10_000,
    profile_calls=5,
    budgets=dict(checks=150, train=110, epoch=100, attacks=60, profile=30),
  ),
  'dry': dict(
    test_filter='unknown',
    test_workers=0,
    det_methods='none',
    det_arch='resnet8',
    det_width=0.25,
    det_batch=4,
    methods='l2p',
    archs='resnet8',
    width=0.25,
    batch=4,
    dtypes='float32',
    split_examples=64,
    train_repeats=1,
    train_warmup=1,
    attack_arch='resnet8',
    warm_attack_groups=[ATTACKS],  # One process: fewer start-ups on few cores.
    eot_draws=2,
    apgd_steps=2,
    judge_draws=2,
    attack_repeats=1,
    epoch_method='none',
    epoch_arch='resnet8',
    epoch_width=0.25,
    train_images=32,
    test_images=16,
    profile_calls=2,
    budgets=dict(checks=400, train=200, epoch=200, attacks=300, profile=200),
  ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The command line."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='JSON file to write (its log beside it)')
  parser.add_argument('--dry-run', action='store_true', help='tiny sizes, for a CPU')
  parser.add_argument(
    '--wheels', default='', help='folder of wheels to install first (into a temporary folder)'
  )
  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  return args


def install_wheels(folder: str, work: str) -> str:
  """Installs the wheels of `folder` (without their dependencies, no index) into a
  folder of `work` and returns that folder."""
  site = os.path.join(work, 'site')
  wheels = sorted(glob.glob(os.path.join(folder, '*.whl')))
  if not wheels:
    raise SystemExit(f'--wheels {folder}: no wheels there; run benchmarks/build_device_wheels.sh.')
  pip = [sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile']
  subprocess.run([*pip, '--target', site, *wheels], check=True)
  return site


def device_info() -> dict[str, Any]:
  """The GPU as nvidia-smi names it, else the CPU (a dry run)."""
  query = 'name,driver_version,memory.total,clocks.max.sm'
  try:
    line = subprocess.run(
      ['nvidia-smi', f'--query-gpu={query}', '--format=csv,noheader'],
      capture_output=True,
      text=True,
      check=True,
    ).stdout.splitlines()[0]
    return dict(zip(('name', 'driver', 'memory', 'max_sm_clock'), line.split(', ')))
  except (OSError, subprocess.CalledProcessError, IndexError):
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
    return {'name': f'CPU {cpu or "unknown"} (dry run, no GPU)'}


class Phases:
  """Runs each phase's commands side by side in sessions of their own, stops what is
  still running at the phase's limit, appends their output to the log and keeps their
  exit codes and seconds."""

  def __init__(self, work: str, log: str, env: dict[str, str], deadline: float):
    self.work, self.log, self.env, self.deadline = work, log, env, deadline
    self.records: dict[str, Any] = {}

  def run(self, phase: str, commands: dict[str, tuple[list[str], dict[str, str]]], budget: float):
    """Runs `commands` (name: (argv, extra environment)) for at most `budget` seconds
    (and not past the overall deadline)."""
    started = time.monotonic()
    limit = min(started + budget, self.deadline)
    running = {}
    for name, (argv, extra) in commands.items():
      out = open(os.path.join(self.work, f'{name}.log'), 'w')
      env = {**self.env, **extra}
      running[name] = (
        subprocess.Popen(
          argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        ),
        out,
      )
    while running:
      time.sleep(0.2)
      for name, (process, out) in list(running.items()):
        timed_out = process.poll() is None and time.monotonic() > limit
        if timed_out:
          os.killpg(process.pid, signal.SIGKILL)  # This command's own session.
          process.wait()
        if process.returncode is not None:
          del running[name]
          self._finish(phase, name, process.returncode, timed_out, started, out)

  def _finish(
    self, phase: str, name: str, code: int, timed_out: bool, started: float, out: IO[str]
  ) -> None:
    """Keeps a command's record and appends its output to the log."""
    out.close()
    record = {'phase': phase, 'returncode': code, 'timed_out': timed_out}
    self.records[name] = {**record, 'seconds': time.monotonic() - started}
    with open(self.log, 'a') as log, open(out.name) as text:
      log.write(f'===== {phase}: {name} ({self.records[name]}) =====\n{text.read()}\n')
    print(f'[{phase}] {name}: {self.records[name]}', flush=True)

  def path(self, name: str) -> str:
    """The JSON file command `name` writes."""
    return os.path.join(self.work, f'{name}.json')

  def load(self, name: str) -> dict[str, Any] | None:
    """What command `name` wrote, None when it wrote nothing."""
    try:
      with open(self.path(name)) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError):
      return None


def python(script: str, *args: Any) -> list[str]:
  """The command running `script` of benchmarks/ with `args`."""
  return [sys.executable, str(ROOT / 'benchmarks' / script), *map(str, args)]


def bench_args(s: dict[str, Any], cache: str) -> list[Any]:
  """benchmarks/run.py's arguments shared by the warm-up and the timed runs."""
  return [
    '--width',
    s['width'],
    '--batch',
    s['batch'],
    '--split-examples',
    s['split_examples'],
    '--inputs',
    'device',
    '--devices',
    1,
    '--compilation-cache',
    cache,
  ]


def attack_args(s: dict[str, Any], attacks: str = ATTACKS) -> list[Any]:
  """benchmarks/run.py's arguments of the attack suite."""
  return [
    '--suite',
    'attacks',
    '--attacks',
    attacks,
    '--attack-methods',
    'l2p',
    '--archs',
    s['attack_arch'],
    '--eot-draws',
    s['eot_draws'],
    '--apgd-steps',
    s['apgd_steps'],
    '--judge-draws',
    s['judge_draws'],
  ]


def check_commands(s: dict[str, Any], phases: Phases, cache: str) -> dict[str, Any]:
  """Phase 1: the tests, the two determinism processes and the compilation warm-up."""
  shared = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}  # Processes share the device.
  tests = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *TEST_FILES]
  tests += ['--junitxml', phases.path('tests').replace('.json', '.xml')]
  tests += ['-n', str(s['test_workers'])] + (['-k', s['test_filter']] if s['test_filter'] else [])
  commands = {'tests': (tests, shared)}
  flags = f'{os.environ.get("XLA_FLAGS", "")} {DETERMINISTIC}'.strip()
  for run in ('determinism_a', 'determinism_b'):  # Compiled and autotuned separately.
    det = python(
      'device_jobs.py',
      'determinism',
      '--methods',
      s['det_methods'],
      '--arch',
      s['det_arch'],
      '--width',
      s['det_width'],
      '--batch',
      s['det_batch'],
      '--out',
      phases.path(run),
    )
    commands[run] = (det, {**shared, 'XLA_FLAGS': flags})
  warm = ['--repeats', 1, '--warmup', 1, '--no-torch', *bench_args(s, cache)]
  for arch in s['archs'].split(','):
    for method in s['methods'].split(','):
      name = f'warm_train_{arch}_{method}'
      argv = ['--suite', 'train', '--methods', method, '--archs', arch, '--dtypes', s['dtypes']]
      commands[name] = (python('run.py', *argv, *warm, '--out', phases.path(name)), shared)
  for i, attacks in enumerate(s['warm_attack_groups']):
    name = f'warm_attacks_{i}'
    argv = [*attack_args(s, attacks), *warm, '--out', phases.path(name)]
    commands[name] = (python('run.py', *argv), shared)
  return commands


def timed_commands(s: dict[str, Any], phases: Phases, cache: str) -> dict[str, Any]:
  """Phase 2, one command at a time: training steps, epochs, attacks, profile."""
  timed = ['--warmup', s['train_warmup'], *bench_args(s, cache)]
  train = ['--suite', 'train', '--methods', s['methods'], '--archs', s['archs']]
  train += ['--dtypes', s['dtypes'], '--repeats', s['train_repeats'], *timed]
  attacks = [*attack_args(s), '--repeats', s['attack_repeats'], *timed]
  epoch = ['epoch', '--method', s['epoch_method'], '--arch', s['epoch_arch']]
  epoch += ['--width', s['epoch_width'], '--batch', s['batch']]
  epoch += ['--train-images', s['train_images'], '--test-images', s['test_images']]
  profile = ['profile', '--arch', s['epoch_arch'], '--width', s['width'], '--batch', s['batch']]
  profile += ['--split-examples', s['split_examples'], '--calls', s['profile_calls']]
  return {
    'train': python('run.py', *train, '--out', phases.path('train')),
    'epoch': python(
      'device_jobs.py', *epoch, '--compilation-cache', cache, '--out', phases.path('epoch')
    ),
    'attacks': python('run.py', *attacks, '--out', phases.path('attacks')),
    'profile': python(
      'device_jobs.py', *profile, '--compilation-cache', cache, '--out', phases.path('profile')
    ),
  }


def junit_results(path: str) -> dict[str, Any] | None:
  """Counts and failures of the pytest run's JUnit XML, None when it wrote none."""
  try:
    root = ET.parse(path).getroot()
  except (OSError, ET.ParseError):
    return None
  failed = []
  for case in root.iter('testcase'):
    problem = case.find('failure') if case.find('failure') is not None else case.find('error')
    if problem is not None:
      message = (problem.get('message') or '')[:300]
      failed.append(f'{case.get("classname")}::{case.get("name")}: {message}')
  suites = [root] if root.tag == 'testsuite' else list(root.iter('testsuite'))
  count = {k: sum(int(x.get(k, 0)) for x in suites) for k in ('tests', 'skipped')}
  return {
    'files': list(TEST_FILES),
    **count,
    'failed': len(failed),
    'passed': count['tests'] - count['skipped'] - len(failed),
    'failures': failed,
  }


def determinism_results(runs: list[dict[str, Any] | None]) -> dict[str, Any] | None:
  """Per method (and PGD): finite, the same bits from one key in each process and
  across the two, and other bits from another key."""
  runs = [r for r in runs if r]
  if not runs:
    return None
  items = {**runs[0]['methods'], **({'pgd': runs[0]['pgd']} if 'pgd' in runs[0] else {})}
  result = {'xla_flags': runs[0]['xla_flags'], 'arch': runs[0]['arch'], 'processes': len(runs)}
  for name, first in items.items():
    others = [r['methods'].get(name) if name != 'pgd' else r.get('pgd') for r in runs]
    result[name] = {
      'finite': first.get('finite', True),
      'same_bits': all(o and o['same_bits'] for o in others),
      'same_bits_across_processes': len(runs) == 2
      and all(o for o in others)
      and others[0]['digest'] == others[1]['digest'],
      'other_key_differs': all(o and o['other_key_differs'] for o in others),
    }
  return result


def epoch_results(epoch: dict[str, Any] | None) -> dict[str, Any] | None:
  """The epoch job's figures and the 350-epoch time they project: every epoch at the
  steady epoch's cost (seconds between two epochs' records: training, evaluation and
  checkpoint), else at its training seconds."""
  if not epoch:
    return None
  steady = (epoch['between_records_s'] or epoch['epoch_train_s'])[-1]
  return {**epoch, 'epoch_s': steady, 'projected_run_h': EPOCHS_OF_A_RUN * steady / 3600}


def cold_compiles(phases: Phases, s: dict[str, Any]) -> list[dict[str, Any]]:
  """Trace + compile seconds of every case the warm-up compiled (an empty cache, the
  checks running beside it)."""
  names = [f'warm_train_{a}_{m}' for a in s['archs'].split(',') for m in s['methods'].split(',')]
  names += [f'warm_attacks_{i}' for i in range(len(s['warm_attack_groups']))]
  return [
    {
      **{k: c.get(k) for k in ('suite', 'arch', 'method', 'attack', 'dtype')},
      'compile_s': c['compile']['trace_s'] + c['compile']['compile_s'],
    }
    for name in names
    for c in (phases.load(name) or {}).get('cases', [])
  ]


def evaluation_results(
  attacks: dict[str, Any] | None, s: dict[str, Any], projection
) -> dict[str, Any] | None:
  """eval_projection's time of the default evaluation of 10,000 images from the
  measured JAX float32 rates: gradient-images/s of each attack, forward-images/s and
  seconds per image of the judging (two predictions per draw, scaled to the config's
  draws); None unless every attack was timed."""
  cases = {
    c['attack']: c
    for c in (attacks or {}).get('cases', [])
    if c['framework'] == 'jax' and c['dtype'] == 'float32'
  }
  if set(cases) != set(ATTACKS.split(',')):
    return None
  rates = {a: cases[a]['images_per_s'] * cases[a]['grads_per_example'] for a in cases}
  judge = cases.pop('judge')['images_per_s']
  rates['forward'] = judge * 2 * s['judge_draws']
  _, draws = projection.default_plan()
  result = projection.project(rates, draws / s['judge_draws'] / judge)
  return {**result, 'rates': rates, 'arch': s['attack_arch'], 'batch': s['batch']}


def reading(profile: dict[str, Any] | None) -> str:
  """What the L2P step's profile says of where its time goes."""
  if not profile:
    return 'no profile (its phase did not finish)'
  p = profile['profile']
  if 'busy_fraction' not in p:  # A CPU's profile (dry run).
    kind, seconds = next(iter(p['thread_s_by_kind'].items()))
    return f'most thread time in {kind} ({seconds * 1e3:.1f} ms per step)'
  kinds = p['kernel_s_by_kind']
  kind = max(kinds, key=kinds.get) if kinds else 'none'
  share = kinds[kind] / p['kernel_s'] if kinds else 0.0
  bound = 'launch- and host-bound' if p['busy_fraction'] < 0.7 else 'the kernels themselves'
  return (
    f'the GPU is busy {p["busy_fraction"]:.0%} of the L2P step ({p["kernels_per_call"]:.0f} '
    f'kernels; {bound}), {share:.0%} of kernel time in {kind}'
  )


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
  """The issue's targets with what was measured: JAX/PyTorch of every adversarial
  float32 training step (at least 1.0, aim 1.5) and the 350-epoch time (under an hour),
  and for a target missed, why (the profile's reading)."""
  rows = []
  cases = (result.get('train') or {}).get('cases', [])
  ratios = {
    f'{c["method"]} {c["arch"]}': render.ratio(c, cases)
    for c in cases
    if c['framework'] == 'jax' and c['dtype'] == 'float32'
  }
  ratios = {k: v for k, v in ratios.items() if v is not None}
  if ratios:
    rows.append(
      {
        'target': 'PGD-7 training step at least as fast as PyTorch on the same GPU (aim 1.5x)',
        'measured': ', '.join(f'{k} {v:.2f}x' for k, v in ratios.items()),
        'met': min(ratios.values()) >= 1.0,
        'why': reading(result.get('profile')),
      }
    )
  epoch = result.get('epoch')
  if epoch:
    rows.append(
      {
        'target': f'{EPOCHS_OF_A_RUN} epochs of {epoch["method"]} {epoch["arch"]} under 1 hour',
        'measured': f'{epoch["projected_run_h"]:.2f} h ({epoch["epoch_s"]:.1f} s per epoch)',
        'met': epoch['projected_run_h'] < 1.0,
        'why': f'training {epoch["epoch_train_s"][-1]:.1f} s of the {epoch["epoch_s"]:.1f} s '
        f'per epoch (the rest: evaluation and checkpoint); {reading(result.get("profile"))}',
      }
    )
  return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the phases and returns the results it wrote to --out."""
  args = parse_args(argv)
  s = SIZES['dry' if args.dry_run else 'gpu']
  started = time.monotonic()
  work = tempfile.mkdtemp(prefix='device_check_')
  log = os.path.splitext(args.out)[0] + '.log'
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  open(log, 'w').close()
  paths = [str(ROOT)]
  if args.wheels:
    paths.insert(0, install_wheels(args.wheels, work))
    sys.path.insert(0, paths[0])
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  env['PYTHONPATH'] = os.pathsep.join(paths + [p for p in [env.get('PYTHONPATH')] if p])
  os.environ['JAX_PLATFORMS'] = 'cpu'  # This process's JAX (the projection) leaves the GPU be.
  # Imported once the wheels are in (l2p_jax needs what they hold) and JAX kept on the CPU.
  from benchmarks import eval_projection
  from benchmarks import run as bench

  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # Every process compiles afresh...
  cache = os.path.join(work, 'xla_cache')  # ...but those handed the warmed cache.
  phases = Phases(work, log, env, started + sum(s['budgets'].values()))
  result = {
    'schema': 'device_check/1',
    'created': datetime.datetime.now().isoformat(timespec='seconds'),
    'command': ['python', 'benchmarks/device_check.py', *args.argv],
    'dry_run': args.dry_run,
    'device': device_info(),
    'sizes': s,
    'phases': phases.records,
  }
  phases.run('checks', check_commands(s, phases, cache), s['budgets']['checks'])
  result['tests'] = junit_results(phases.path('tests').replace('.json', '.xml'))
  result['determinism'] = determinism_results(
    [phases.load('determinism_a'), phases.load('determinism_b')]
  )
  result['compile_cold'] = cold_compiles(phases, s)
  bench.write_json(result, args.out)
  for name, argv in timed_commands(s, phases, cache).items():
    phases.run(name, {name: (argv, {})}, s['budgets'][name])
    result[name] = phases.load(name)
    bench.write_json(result, args.out)
  result['epoch'] = epoch_results(result['epoch'])
  result['evaluation'] = evaluation_results(result['attacks'], s, eval_projection)
  result['targets'] = targets(result)
  result['seconds'] = time.monotonic() - started
  bench.write_json(result, args.out)
  print(render.render_device(args.out, result), flush=True)
  shutil.rmtree(work, ignore_errors=True)
  return result


if __name__ == '__main__':
  main()
