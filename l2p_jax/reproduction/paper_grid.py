"""The plan of the paper's experiments at one of the scales of scales.py: the
train.py/eval.py commands (one job per trained model, plus one per transfer matrix)
that measure the tables of paper_tables.py.

The library reads no file of the repository: the commands run from the checkout that
holds train.py, eval.py and configs/, and the entry point (reproduce.py) passes that
folder (`root`) and configs/cifar.py's `get_config` into `make_plan`. So a library
installed with `pip install .` (not editable) plans and runs the grid of whichever
checkout's reproduce.py calls it, and nothing here depends on where it is installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from l2p_jax.methods import METHODS
from l2p_jax.reproduction.paper_tables import TABLES, Setting, arch_name
from l2p_jax.reproduction.scales import SCALES, Scale, scaled_schedule

GetConfig = Callable[[str], ml_collections.ConfigDict]  # configs/cifar.py's get_config.


@dataclasses.dataclass(frozen=True)
class Run:
  """One trained model: method, network and data at the scale, and seed."""

  method: str
  arch: str
  width: float
  dataset: str
  seed: int

  @property
  def name(self) -> str:
    return f'{self.method}-{arch_name(self.arch, self.width)}-{self.dataset}-s{self.seed}'


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of a job and the marker file written when it succeeds."""

  command: tuple[str, ...]
  marker: str

  @property
  def line(self) -> str:
    return shlex.join(self.command)


@dataclasses.dataclass(frozen=True)
class Job:
  """A unit of the grid: a run's training and its evaluations, or (run None) one
  transfer matrix over runs that other jobs train."""

  name: str
  steps: tuple[Step, ...]
  run: Run | None = None
  needs: tuple[str, ...] = ()  # Jobs that must finish first.


@dataclasses.dataclass(frozen=True)
class Cell:
  """Where a table's measurement lands: the table, the paper's setting, the seed, the
  results.json of the evaluation, and the run of every method in it."""

  table: str
  setting: Setting
  seed: int
  results: str
  runs: dict[str, Run]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The grid: its jobs in an order that trains before the jobs needing it, where each
  table's numbers will be, the scale, the tables, the grid's folder and the folder its
  commands run in (`root`: the repository's checkout, with train.py, eval.py, configs/)."""

  jobs: tuple[Job, ...]
  cells: tuple[Cell, ...]
  scale: Scale
  tables: tuple[str, ...]
  workdir: str
  seeds: int
  root: str


@dataclasses.dataclass(frozen=True)
class _Folder:
  """The grid's folder as this process opens its files (`path`, absolute) and as the
  commands name it (`arg`): relative to the checkout they run in when the folder is
  inside it, so that the markers, which hold the commands, stay valid in any clone."""

  path: str
  arg: str

  def file(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  def argument(self, *parts: str) -> str:
    return os.path.join(self.arg, *parts)


def _folder(workdir: str, root: str) -> _Folder:
  path, root = os.path.abspath(workdir), os.path.abspath(root)
  inside = os.path.commonpath([path, root]) == root
  return _Folder(path, os.path.relpath(path, root) if inside else path)


def _choose(kind: str, picked: Sequence[str], accepted: Sequence[str]) -> list[str]:
  bad = [p for p in picked if p not in accepted]
  if bad:
    raise ValueError(
      f'Unknown {kind} {", ".join(map(repr, bad))}; accepted: {", ".join(accepted)}.'
    )
  return list(picked)


def _overrides(fields: dict[str, Any]) -> list[str]:
  def text(value: Any) -> str:
    return ','.join(map(str, value)) if isinstance(value, tuple) else str(value)

  return [f'--config.{field}={text(value)}' for field, value in fields.items()]


def _data_flags(scale: Scale, local_dir: str | None) -> list[str]:
  folder = scale.local_dir if local_dir is None else local_dir
  return ['--config.data.source=local', f'--config.data.local_dir={folder}'] if folder else []


def make_plan(
  workdir: str,
  *,
  root: str,
  get_config: GetConfig,
  scale: str = 'full',
  tables: Sequence[str] = (),
  methods: Sequence[str] = (),
  archs: Sequence[str] = (),
  seeds: int | None = None,
  local_dir: str | None = None,
) -> Plan:
  """The jobs that measure `tables` (default: the scale's) at `scale`, narrowed to
  `methods` and to the paper's `archs` (resnet20, resnet20x2, resnet18, ...), over
  seeds 0..seeds-1 (None: the scale's), in folders under `workdir`; `local_dir` (None: the scale's
  default) is where the original dataset files are ('' reads TFDS). `root` is the
  checkout the commands run in and `get_config` its configs/cifar.py's (whose schedules
  the small scale shrinks); see the module docstring."""
  if scale not in SCALES:
    raise ValueError(f'Unknown scale {scale!r}; accepted: {", ".join(SCALES)}.')
  s = SCALES[scale]
  seeds = s.seeds if seeds is None else seeds
  if seeds < 1:
    raise ValueError(f'--seeds must be at least 1, got {seeds}.')
  tables = _choose('table', tables, list(TABLES)) or list(s.default_tables)
  tables = [t for t in TABLES if t in tables]  # The paper's order.
  methods = _choose('method', methods, METHODS) or list(METHODS)
  paper_archs = sorted({arch_name(*st) for t in TABLES.values() for st in t.settings})
  archs = _choose('arch', archs, paper_archs)
  grid = _folder(workdir, root)
  data = _data_flags(s, local_dir)
  jobs: dict[str, Job] = {}
  cells = []
  for table_name in tables:
    table = TABLES[table_name]
    settings = [
      st
      for st in s.settings.get(table_name, table.settings)
      if not archs or arch_name(*st) in archs
    ]
    attacks, eval_fields = table_evaluation(s, table_name)
    for setting in settings:
      arch, width = s.model or setting
      dataset = s.dataset or table.dataset
      for seed in range(seeds):
        runs = {m: Run(m, arch, width, dataset, seed) for m in table.methods if m in methods}
        if not runs:
          continue
        for run in runs.values():
          _add_training(jobs, run, s, grid, data, get_config)
        if attacks == 'transfer':
          results = _add_transfer(jobs, runs, s, grid, eval_fields)
          cells.append(Cell(table_name, setting, seed, results, runs))
          continue
        for run in runs.values():
          results = _add_evaluation(jobs, run, s, grid, table_name, attacks, eval_fields)
          cells.append(Cell(table_name, setting, seed, results, {run.method: run}))
  if not jobs:
    raise ValueError(
      f'No run of the tables {", ".join(tables)} has a method of '
      f'{", ".join(methods)} and a network of {", ".join(archs)}.'
    )
  ordered = sorted(jobs.values(), key=lambda j: j.run is None)  # Trainings first.
  return Plan(tuple(ordered), tuple(cells), s, tuple(tables), grid.path, seeds, root)


def table_evaluation(scale: Scale, table_name: str) -> tuple[str, dict[str, Any]]:
  """The eval.py attacks that measure a table at `scale`, and the config fields every
  run of it sets (a method's own, scale.eval_methods, aside)."""
  attacks = scale.attacks.get(table_name, TABLES[table_name].attacks)
  return attacks, {**scale.eval, **scale.eval_tables.get(table_name, {})}


def _add_transfer(
  jobs: dict[str, Job],
  runs: dict[str, Run],
  scale: Scale,
  grid: _Folder,
  eval_fields: dict[str, Any],
) -> str:
  """Adds (once) the job of the transfer matrix between `runs`, all of one network,
  dataset and seed, after their trainings; returns where its results.json will be."""
  run = next(iter(runs.values()))
  name = f'transfer-{arch_name(run.arch, run.width)}-{run.dataset}-s{run.seed}'
  out = ('transfer', name)
  folders = [grid.argument('runs', r.name) for r in runs.values()]
  step = _eval_step(scale, grid, folders, 'transfer', out, run.seed, eval_fields)
  jobs.setdefault(name, Job(name, (step,), needs=tuple(r.name for r in runs.values())))
  return grid.file(*out, 'results.json')


def _add_evaluation(
  jobs: dict[str, Job],
  run: Run,
  scale: Scale,
  grid: _Folder,
  table_name: str,
  attacks: str,
  eval_fields: dict[str, Any],
) -> str:
  """Appends to run's job the evaluation of `table_name`'s `attacks` (none if empty;
  once, however many tables share it); returns where its results.json will be ('' for
  no attacks)."""
  if not attacks:
    return ''
  out = ('runs', run.name, 'eval', table_name)
  job = jobs[run.name]
  fields = {**eval_fields, **scale.eval_methods.get(run.method, {})}
  step = _eval_step(scale, grid, [grid.argument('runs', run.name)], attacks, out, run.seed, fields)
  if step not in job.steps:
    jobs[run.name] = dataclasses.replace(job, steps=job.steps + (step,))
  return grid.file(*out, 'results.json')


def _eval_step(
  scale: Scale,
  grid: _Folder,
  folders: Sequence[str],
  attacks: str,
  out: tuple[str, ...],
  seed: int,
  fields: dict[str, Any],
) -> Step:
  """eval.py of `attacks` on the models in `folders` (as the command names them),
  results into the grid's folder `out`."""
  command = (
    'python',
    'eval.py',
    '--config',
    scale.eval_config,
    '--workdir',
    ','.join(folders),
    f'--config.attacks={attacks}',
    f'--config.output_dir={grid.argument(*out)}',
    f'--config.seed={seed}',
    *_overrides(fields),
  )
  return Step(command, grid.file(*out, 'done.json'))


def _add_training(
  jobs: dict[str, Job],
  run: Run,
  scale: Scale,
  grid: _Folder,
  data: list[str],
  get_config: GetConfig,
) -> None:
  """Adds `run`'s job with its train.py command, unless another table added it."""
  if run.name in jobs:
    return
  fields = dict(scale.train)
  paper_config = f'{run.method},{run.arch},{run.dataset}'
  if scale.epochs:
    fields.update(scaled_schedule(get_config(paper_config), scale.epochs))
  if run.width != 1:
    fields['model.width'] = run.width
  fields['seed'] = run.seed
  config = f'configs/cifar.py:{paper_config}{scale.train_config_suffix}'
  command = (
    'python',
    'train.py',
    '--config',
    config,
    '--workdir',
    grid.argument('runs', run.name),
    *data,
    *_overrides(fields),
  )
  marker = grid.file('runs', run.name, 'train_done.json')
  jobs[run.name] = Job(run.name, (Step(command, marker),), run=run)


def plan_lines(plan: Plan) -> list[str]:
  """Every job as one shell line (its commands joined by &&), each after a comment
  naming it, to run from the repository's root."""
  lines = []
  for i, job in enumerate(plan.jobs):
    after = f' (after {", ".join(job.needs)})' if job.needs else ''
    lines += [f'# job {i}: {job.name}{after}', ' && '.join(s.line for s in job.steps)]
  return lines


def marker_text(step: Step) -> str:
  """What a step's marker holds: its command, so a changed command is not skipped."""
  return json.dumps({'command': list(step.command)}, sort_keys=True)
