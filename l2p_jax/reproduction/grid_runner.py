"""Runs a plan of experiments (see paper_grid.py) through train.py and eval.py as
subprocesses in the plan's `root` (the checkout that reproduce.py named): skips every
step whose marker says it finished with the same command, resumes the rest (train.py
continues from its workdir's checkpoint), and shows one progress bar over the jobs; or
writes the plan as a SLURM array script instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

from l2p_jax import data
from l2p_jax.errors import UserError
from l2p_jax.reproduction.paper_grid import Job, Plan, Step, marker_text
from l2p_jax.runtime import files

Launcher = Callable[[Sequence[str], str], None]
_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.


class ReproduceError(UserError, RuntimeError):
  """A command of the grid failed; the message names it and its log."""


def is_done(step: Step) -> bool:
  """Whether `step` finished: its marker exists and records this very command."""
  try:
    with open(step.marker) as f:
      return f.read().strip() == marker_text(step)
  except FileNotFoundError:
    return False


def mark_done(step: Step) -> None:
  """Writes `step`'s marker (atomically, so a kill never leaves half of one)."""
  os.makedirs(os.path.dirname(step.marker), exist_ok=True)
  files.write_text(step.marker, marker_text(step) + '\n')


def log_path(step: Step) -> str:
  """Where a step's output goes: its marker's name ending in .log."""
  return os.path.splitext(step.marker)[0] + '.log'


def _die_with_parent(prctl: Callable[..., int], parent: int) -> None:
  """In a child before it runs its program (Linux): asks the kernel to send it SIGTERM
  when its parent dies, even by SIGKILL, so that no train.py outlives reproduce.py.
  `prctl` is looked up before the fork: a forked child of threads must not dlopen."""
  prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  if os.getppid() != parent:  # The parent died before the request was made.
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def _forwarding_signals(process: subprocess.Popen) -> Iterator[None]:
  """While the block (waiting for `process`) runs, SIGTERM and SIGINT sent to this
  process go to `process` (train.py then stops as it would alone: Ctrl-C lets its
  checkpoint finish); after the block, this process meets the signal as it would have
  without a child."""
  received = []

  def forward(signum: int, frame: Any) -> None:
    process.send_signal(signum)
    received.append(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  if received:
    signal.raise_signal(received[0])


def launch_subprocess(command: Sequence[str], log: str, root: str) -> None:
  """Runs `command` ('python PROGRAM ...') with this interpreter in the repository's
  checkout `root`, its output appended to `log`; raises ReproduceError if it fails. The child dies
  with this process (see _die_with_parent, _forwarding_signals)."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, 'a') as f:
    f.write(f'$ {shlex.join(command)}\n')
    f.flush()
    process = subprocess.Popen(
      [sys.executable, *command[1:]],
      cwd=root,
      stdout=f,
      stderr=subprocess.STDOUT,
      preexec_fn=functools.partial(_die_with_parent, ctypes.CDLL(None).prctl, os.getpid())
      if sys.platform.startswith('linux')
      else None,
    )
    with _forwarding_signals(process):
      code = process.wait()
  if code:
    with open(log) as f:
      tail = ''.join(f.readlines()[-5:])
    raise ReproduceError(
      f'{command[1]} exited with status {code}; its output is in '
      f'{log}, ending:\n{tail}Rerun the same reproduce.py command to '
      'continue from there.'
    )


def check_local_data(plan: Plan, local_dir: str | None) -> None:
  """Raises ReproduceError, naming --local_dir, unless the folder the plan's trainings
  read (--local_dir, else the scale's default; '' is TFDS, not checked here) holds
  every split of their datasets: a missing file stops the grid before its first job."""
  folder = plan.scale.local_dir if local_dir is None else local_dir
  if not folder:
    return
  for dataset in sorted({job.run.dataset for job in plan.jobs if job.run is not None}):
    try:
      for split in data.LOCAL_SPLITS:
        data.load_split(dataset, split, source='local', local_dir=folder)
    except (data.DatasetNotFoundError, data.DatasetFileError) as error:
      cause = error.__cause__
      reason = (
        f'{cause.filename} is missing'
        if isinstance(cause, FileNotFoundError)
        else str(error).splitlines()[0]
      )
      raise ReproduceError(
        f'--local_dir={folder} does not hold {dataset} ({reason}); pass --local_dir=DIR, '
        f'where DIR holds {data.LOCAL_FORMATS[dataset].expected}, or --local_dir= to read TFDS.'
      ) from None


def run_plan(plan: Plan, launch: Launcher | None = None, progress_bar: bool = True) -> int:
  """Runs every unfinished step of the plan's jobs in order with `launch` (default:
  launch_subprocess in plan.root), writing each step's marker after it succeeds, with a
  progress bar (rate and ETA) over the jobs; returns the number of steps run. A failure
  stops the grid with ReproduceError; rerunning continues with the failed step."""
  launch = launch or functools.partial(launch_subprocess, root=plan.root)
  for name in os.path.join(plan.root, 'train.py'), os.path.join(plan.root, 'eval.py'):
    if not os.path.exists(name):
      raise ReproduceError(
        f'{name} is missing; reproduce.py runs from a checkout of the repository.'
      )
  todo = [job for job in plan.jobs if not all(is_done(s) for s in job.steps)]
  ran = 0
  with tqdm(
    total=len(plan.jobs),
    initial=len(plan.jobs) - len(todo),
    unit='run',
    desc='reproduce',
    dynamic_ncols=True,
    disable=not progress_bar,
  ) as bar:
    for job in todo:
      bar.set_postfix_str(job.name)
      ran += _run_job(job, launch)
      bar.update()
  return ran


def _run_job(job: Job, launch: Launcher) -> int:
  ran = 0
  for step in job.steps:
    if is_done(step):
      continue
    started = time.time()
    launch(step.command, log_path(step))
    mark_done(step)
    tqdm.write(f'{job.name}: {step.command[1]} done in {time.time() - started:.0f} s')
    ran += 1
  return ran


def slurm_options(defaults: Sequence[str], overrides: str) -> list[str]:
  """The sbatch options of every task: the scale's `defaults` ('--time=2:00:00', ...)
  with each option that `overrides` ('--time=6:00:00 --gpus=2') names replaced, and the
  others it names added."""
  options: dict[str, str] = {}
  for word in [*defaults, *shlex.split(overrides)]:
    if not word.startswith('-'):
      raise ReproduceError(
        f'--slurm_args takes sbatch options such as --time=6:00:00 --gpus=1, got {word!r}.'
      )
    options[word.split('=', 1)[0]] = word
  return list(options.values())


def environment_lines(python: str) -> list[str]:
  """Shell lines that make `python` the one that planned the grid: its virtual
  environment activated when it has one, else its folder first on PATH."""
  activate = os.path.join(os.path.dirname(python), 'activate')
  if os.path.exists(activate):
    return [f'source {shlex.quote(activate)}']
  return [f'export PATH={shlex.quote(os.path.dirname(python))}:"$PATH"']


def slurm_script(
  plan: Plan, assemble_command: str, slurm_args: str = '', python: str = sys.executable
) -> str:
  """A SLURM array script with one task per job: the job's commands, each followed by
  writing its marker, so that `reproduce.py` afterwards skips them and only assembles.
  Every task gets the scale's sbatch options (time, GPUs, CPUs, memory) as `slurm_args`
  overrides them, and runs in the environment of `python` (the planning interpreter).
  Transfer jobs need the trainings first; the header says how to submit both parts."""
  first = [i for i, job in enumerate(plan.jobs) if not job.needs]
  later = [i for i, job in enumerate(plan.jobs) if job.needs]
  lines = [
    '#!/bin/bash',
    '#SBATCH --job-name=l2p-reproduce',
    f'#SBATCH --array=0-{len(plan.jobs) - 1}',
    f'#SBATCH --output={os.path.join(plan.workdir, "slurm", "%A_%a.out")}',
    *(f'#SBATCH {option}' for option in slurm_options(plan.scale.slurm, slurm_args)),
    f'# {len(plan.jobs)} tasks, one per job of the grid in {plan.workdir}.',
  ]
  if later:
    lines += [
      (
        f'# Tasks {later[0]}-{later[-1]} evaluate models that tasks '
        f'{first[0]}-{first[-1]} train; submit them in two parts:'
      ),
      f'#   jobid=$(sbatch --parsable --array={first[0]}-{first[-1]} THIS_FILE)',
      (f'#   sbatch --array={later[0]}-{later[-1]} --dependency=afterok:$jobid THIS_FILE'),
    ]
  lines += [
    f'# Then assemble the report: {assemble_command}',
    'set -euo pipefail',
    *environment_lines(python),
    f'cd {shlex.quote(plan.root)}',
    'case "$SLURM_ARRAY_TASK_ID" in',
  ]
  for i, job in enumerate(plan.jobs):
    body = []
    for step in job.steps:
      folder = shlex.quote(os.path.dirname(step.marker))
      marker = f'{shlex.quote(marker_text(step))} > {shlex.quote(step.marker)}'
      body += [f'    mkdir -p {folder}', f'    {step.line}', f'    printf "%s\\n" {marker}']
    lines += [f'  {i})  # {job.name}', *body, '    ;;']
  lines += ['  *) echo "no task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', 'esac']
  return '\n'.join(lines) + '\n'
