"""Runs a plan of experiments (see paper_grid.py) through train.py and eval.py as
subprocesses in the plan's `root` (the checkout that reproduce.py named): skips every
step whose marker says it finished with the same command, resumes the rest (train.py
continues from its workdir's checkpoint), and shows one progress bar over the jobs; or
writes the plan as a SLURM array script instead.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from l2p_jax.errors import UserError
from l2p_jax.reproduction.paper_grid import Job, Plan, Step, marker_text

Launcher = Callable[[Sequence[str], str], None]


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
  partial = f'{step.marker}.partial'
  with open(partial, 'w') as f:
    f.write(marker_text(step) + '\n')
  os.replace(partial, step.marker)


def log_path(step: Step) -> str:
  """Where a step's output goes: its marker's name ending in .log."""
  return os.path.splitext(step.marker)[0] + '.log'


def launch_subprocess(command: Sequence[str], log: str, root: str) -> None:
  """Runs `command` ('python PROGRAM ...') with this interpreter in the repository's
  checkout `root`, its output appended to `log`; raises ReproduceError if it fails."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, 'a') as f:
    f.write(f'$ {shlex.join(command)}\n')
    f.flush()
    code = subprocess.run(
      [sys.executable, *command[1:]], cwd=root, stdout=f, stderr=subprocess.STDOUT, check=False
    ).returncode
  if code:
    with open(log) as f:
      tail = ''.join(f.readlines()[-5:])
    raise ReproduceError(
      f'{command[1]} exited with status {code}; its output is in '
      f'{log}, ending:\n{tail}Rerun the same reproduce.py command to '
      'continue from there.'
    )


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


def slurm_script(plan: Plan, assemble_command: str) -> str:
  """A SLURM array script with one task per job: the job's commands, each followed by
  writing its marker, so that `reproduce.py` afterwards skips them and only assembles.
  Transfer jobs need the trainings first; the header says how to submit both parts."""
  first = [i for i, job in enumerate(plan.jobs) if not job.needs]
  later = [i for i, job in enumerate(plan.jobs) if job.needs]
  lines = [
    '#!/bin/bash',
    '#SBATCH --job-name=l2p-reproduce',
    f'#SBATCH --array=0-{len(plan.jobs) - 1}',
    f'#SBATCH --output={os.path.join(plan.workdir, "slurm", "%A_%a.out")}',
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
