"""The paper's experiments as data: its tables and figures, the scales they run at
(full: as published; small: Fashion-MNIST on a reduced ResNet-V1 for a 2-core CPU;
tiny: for tests), the numbers published for them, and the plan of train.py/eval.py
commands (one job per trained model, plus one per transfer matrix) that measures them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import shlex
from collections.abc import Sequence
from typing import Any

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[2]  # Holds train.py, eval.py, configs/.
METHODS = ('none', 'vanilla', 'pni', 'adv_bnn', 'l2p')
METHOD_TITLES = {
  'none': 'No defence',
  'vanilla': 'Vanilla',
  'pni': 'PNI-W',
  'adv_bnn': 'Adv-BNN',
  'l2p': 'Learn2Perturb',
}
Setting = tuple[str, float]  # (arch, width) of the paper's network.

_V1_20, _V2_18 = ('resnet20', 1.0), ('resnet18', 1.0)
_MAIN_SETTINGS = (
  _V1_20,
  ('resnet32', 1.0),
  ('resnet44', 1.0),
  ('resnet56', 1.0),
  ('resnet20', 1.5),
  ('resnet20', 2.0),
  ('resnet20', 4.0),
  _V2_18,
)


@dataclasses.dataclass(frozen=True)
class Table:
  """One table or figure of the paper: on which data and networks, which methods, and
  the eval.py attacks run on each trained model ('' none; 'transfer' is one eval.py
  over all of a setting's models)."""

  name: str
  title: str
  dataset: str
  settings: tuple[Setting, ...]
  methods: tuple[str, ...]
  attacks: str


TABLES = {
  t.name: t
  for t in (
    Table(
      'main',
      'Accuracy under attack (main table; PNI Table 3)',
      'cifar10',
      _MAIN_SETTINGS,
      METHODS,
      'clean,fgsm,pgd,pgd20,pgd100,eot_pgd,apgd,cw',
    ),
    Table(
      'few_pixel',
      'Few-pixel attack (supplementary Table 1)',
      'cifar10',
      (_V1_20, _V2_18),
      METHODS,
      'few_pixel',
    ),
    Table(
      'transfer',
      'Transferability (supplementary Table 2)',
      'cifar10',
      (_V1_20, _V2_18),
      ('vanilla', 'pni', 'adv_bnn', 'l2p'),
      'transfer',
    ),
    Table(
      'figure1',
      'Noise parameters during training (supplementary Figure 1)',
      'cifar10',
      (_V2_18,),
      ('pni', 'l2p'),
      '',
    ),
    Table(
      'figures23',
      'FGSM and PGD accuracy against eps (supplementary Figures 2-3)',
      'cifar100',
      (_V2_18,),
      METHODS,
      'eps_sweep',
    ),
  )
}

# Published accuracies (%), CIFAR-10, eps 8/255. PNI Table 3 (He et al. 2019): PNI-W
# with adversarial training and plain PGD training (vanilla), noise on at test time.
PUBLISHED_MAIN: dict[tuple[str, float, str, str], float] = {}
for _arch, _width, _method, _clean, _pgd, _fgsm in (
  ('resnet20', 1.0, 'pni', 84.9, 45.9, 54.5),
  ('resnet32', 1.0, 'pni', 85.9, 43.5, 51.5),
  ('resnet44', 1.0, 'pni', 84.7, 48.5, 55.8),
  ('resnet56', 1.0, 'pni', 86.8, 46.3, 53.9),
  ('resnet20', 4.0, 'pni', 87.7, 49.1, 57.0),
  ('resnet20', 1.0, 'vanilla', 83.8, 39.1, 46.6),
):
  PUBLISHED_MAIN.update(
    {
      (_arch, _width, _method, 'Clean'): _clean,
      (_arch, _width, _method, 'PGD-7'): _pgd,
      (_arch, _width, _method, 'FGSM'): _fgsm,
    }
  )

# Supplementary Table 1: accuracy under the 1-, 2- and 3-pixel attack.
PUBLISHED_FEW_PIXEL = {
  (arch, 1.0, method, f'{pixels} px'): value
  for arch, rows in (
    (
      'resnet20',
      (
        (21.45, 65.20, 67.40, 58.40, 70.15),
        (2.55, 48.35, 61.75, 56.20, 63.90),
        (1.10, 36.40, 58.10, 55.70, 61.85),
      ),
    ),
    (
      'resnet18',
      (
        (23.44, 56.10, 50.90, 68.60, 64.45),
        (3.20, 33.20, 39.00, 64.55, 60.05),
        (0.95, 23.95, 35.40, 59.70, 53.90),
      ),
    ),
  )
  for pixels, row in enumerate(rows, 1)
  for method, value in zip(METHODS, row)
}

# Supplementary Table 2: (arch, width, source, target, FGSM|PGD) -> (mean, std).
_TRANSFER_ROWS = {
  'resnet20': {
    'vanilla': {
      'pni': (60.32, 0.05, 58.27, 0.01),
      'adv_bnn': (49.22, 0.90, 48.63, 3.10),
      'l2p': (58.86, 0.03, 56.75, 0.01),
    },
    'pni': {
      'vanilla': (66.31, 0.02, 63.04, 0.01),
      'adv_bnn': (51.12, 1.22, 49.59, 0.83),
      'l2p': (63.26, 0.10, 59.31, 0.06),
    },
    'adv_bnn': {
      'vanilla': (74.38, 0.16, 72.02, 0.02),
      'pni': (73.05, 0.12, 70.26, 0.05),
      'l2p': (72.48, 0.05, 69.25, 0.06),
    },
    'l2p': {
      'vanilla': (70.66, 0.01, 67.32, 0.01),
      'pni': (68.46, 0.03, 64.77, 0.01),
      'adv_bnn': (54.16, 2.36, 52.23, 1.52),
    },
  },
  'resnet18': {
    'vanilla': {
      'pni': (69.52, 0.02, 68.01, 0.02),
      'adv_bnn': (67.20, 0.04, 65.88, 0.03),
      'l2p': (67.32, 0.04, 65.58, 0.04),
    },
    'pni': {
      'vanilla': (69.56, 0.01, 67.09, 0.02),
      'adv_bnn': (67.63, 0.03, 64.87, 0.04),
      'l2p': (67.63, 0.05, 64.61, 0.01),
    },
    'adv_bnn': {
      'vanilla': (73.66, 0.01, 71.23, 0.01),
      'pni': (74.02, 0.03, 71.51, 0.02),
      'l2p': (71.67, 0.09, 68.75, 0.04),
    },
    'l2p': {
      'vanilla': (73.49, 0.01, 70.44, 0.00),
      'pni': (73.89, 0.04, 70.61, 0.01),
      'adv_bnn': (70.22, 0.04, 67.33, 0.04),
    },
  },
}
PUBLISHED_TRANSFER = {
  (arch, 1.0, source, target, kind): values[2 * i : 2 * i + 2]
  for arch, sources in _TRANSFER_ROWS.items()
  for source, targets in sources.items()
  for target, values in targets.items()
  for i, kind in enumerate(('FGSM', 'PGD'))
}


@dataclasses.dataclass(frozen=True)
class Scale:
  """How big the experiments run: the data and network standing in for the paper's
  (None: the paper's own), which of a table's settings it keeps, and the config
  changes for train.py (`train`, plus the schedule scaled to `epochs` when > 0) and
  eval.py (`eval` for every table, `eval_tables` per table, `attacks` replacing a
  table's list)."""

  name: str
  dataset: str | None
  model: Setting | None
  settings: dict[str, tuple[Setting, ...]]
  default_tables: tuple[str, ...]
  train_config_suffix: str = ''
  eval_config: str = 'configs/eval.py'
  epochs: int = 0
  train: dict[str, Any] = dataclasses.field(default_factory=dict)
  eval: dict[str, Any] = dataclasses.field(default_factory=dict)
  eval_tables: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  attacks: dict[str, str] = dataclasses.field(default_factory=dict)
  data_dir: str = ''  # Default --data_dir: '' reads TFDS, else the original archives.


_QUIET = {'progress_bar': False}  # The runner's bar is the one shown; logs go to files.
_ONE_SETTING = {
  'main': (_V1_20,),
  'few_pixel': (_V1_20,),
  'transfer': (_V1_20,),
  'figure1': (_V2_18,),
  'figures23': (_V2_18,),
}
SCALES = {
  s.name: s
  for s in (
    Scale('full', None, None, {}, tuple(TABLES), train=_QUIET, eval=_QUIET),
    # The paper's structure at 8 epochs on 1,536 images (see scaled_schedule), and
    # attacks on the first 128 test images (few-pixel: 200) with fewer EOT draws, APGD
    # iterations and DE candidates: 31 minutes on 2 cores (measured; README, RESULTS.md).
    Scale(
      'small',
      'fashion_mnist',
      ('resnet8', 0.5),
      _ONE_SETTING,
      ('main', 'few_pixel', 'transfer', 'figure1'),
      epochs=8,
      train={
        **_QUIET,
        'data.train_examples': 1536,
        'data.eval_examples': 256,
        'eval.every_epochs': 2,
      },
      eval={**_QUIET, 'data.examples': 128},
      eval_tables={
        'main': {'eot.draws': 5, 'apgd.steps': 20, 'apgd.eot_draws': 3},
        # data.examples caps few_pixel.examples, so both are raised.
        'few_pixel': {
          'data.examples': 200,
          'few_pixel.examples': 200,
          'few_pixel.population': 20,
          'few_pixel.iterations': 5,
        },
      },
      data_dir='/usr/share/datasets/fashion-mnist',
    ),
    Scale(
      'tiny',
      'cifar10',
      ('resnet8', 0.5),
      _ONE_SETTING,
      ('main', 'transfer'),
      train_config_suffix=',tiny',
      eval_config='configs/eval.py:tiny',
      train={**_QUIET, 'num_epochs': 1, 'data.train_examples': 64, 'data.eval_examples': 16},
      eval={**_QUIET, 'data.examples': 8},
      attacks={'main': 'clean,fgsm,pgd'},
    ),
  )
}


@functools.cache
def _cifar_configs():
  spec = importlib.util.spec_from_file_location('cifar_config', ROOT / 'configs' / 'cifar.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def train_config(method: str, arch: str, dataset: str) -> ml_collections.ConfigDict:
  """configs/cifar.py's config of `method` on `arch` and `dataset`."""
  return _cifar_configs().get_config(f'{method},{arch},{dataset}')


def scaled_schedule(config: ml_collections.ConfigDict, epochs: int) -> dict[str, Any]:
  """The config's schedule shrunk to `epochs` epochs: learning-rate boundaries and the
  starts of the noise and adversarial phases at the same fractions of training
  (rounded), a phase that starts after epoch 0 still starting after it and after the
  phases before it, so the paper's clean, noise and adversarial phases all remain."""
  if epochs < 2:
    raise ValueError(f'A scaled schedule needs at least 2 epochs, got {epochs}.')
  fraction = epochs / config.num_epochs

  def at(epoch: int) -> int:
    return epoch if epoch <= 0 else min(epochs - 1, max(1, round(epoch * fraction)))

  noise, adv = at(config.l2p.noise_start_epoch), at(config.adv.start_epoch)
  if config.adv.start_epoch > config.l2p.noise_start_epoch:
    adv = min(epochs - 1, max(adv, noise + 1))
  boundaries = tuple(sorted({at(b) for b in config.optim.lr_boundaries}))
  return {
    'num_epochs': epochs,
    'optim.lr_boundaries': boundaries,
    'l2p.noise_start_epoch': noise,
    'adv.start_epoch': adv,
  }


def arch_name(arch: str, width: float) -> str:
  """A network's short name: resnet20, resnet20x1.5, resnet8x0.5."""
  return arch if width == 1 else f'{arch}x{width:g}'


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
  table's numbers will be, the scale, the tables and the grid's folder."""

  jobs: tuple[Job, ...]
  cells: tuple[Cell, ...]
  scale: Scale
  tables: tuple[str, ...]
  workdir: str
  seeds: int


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


def _data_flags(scale: Scale, data_dir: str | None) -> list[str]:
  folder = scale.data_dir if data_dir is None else data_dir
  return ['--config.data.source=local', f'--config.data.local_dir={folder}'] if folder else []


def make_plan(
  workdir: str,
  *,
  scale: str = 'full',
  tables: Sequence[str] = (),
  methods: Sequence[str] = (),
  archs: Sequence[str] = (),
  seeds: int = 1,
  data_dir: str | None = None,
) -> Plan:
  """The jobs that measure `tables` (default: the scale's) at `scale`, narrowed to
  `methods` and to the paper's `archs` (resnet20, resnet20x2, resnet18, ...), over
  seeds 0..seeds-1, in folders under `workdir`; `data_dir` (None: the scale's
  default) is where the original dataset files are ('' reads TFDS)."""
  if scale not in SCALES:
    raise ValueError(f'Unknown scale {scale!r}; accepted: {", ".join(SCALES)}.')
  if seeds < 1:
    raise ValueError(f'--seeds must be at least 1, got {seeds}.')
  s = SCALES[scale]
  tables = _choose('table', tables, list(TABLES)) or list(s.default_tables)
  tables = [t for t in TABLES if t in tables]  # The paper's order.
  methods = _choose('method', methods, METHODS) or list(METHODS)
  paper_archs = sorted({arch_name(*st) for t in TABLES.values() for st in t.settings})
  archs = _choose('arch', archs, paper_archs)
  workdir = os.path.abspath(workdir)
  data = _data_flags(s, data_dir)
  jobs: dict[str, Job] = {}
  cells = []
  for table_name in tables:
    table = TABLES[table_name]
    settings = [
      st
      for st in s.settings.get(table_name, table.settings)
      if not archs or arch_name(*st) in archs
    ]
    attacks = s.attacks.get(table_name, table.attacks)
    eval_fields = {**s.eval, **s.eval_tables.get(table_name, {})}
    for setting in settings:
      arch, width = s.model or setting
      dataset = s.dataset or table.dataset
      for seed in range(seeds):
        runs = {m: Run(m, arch, width, dataset, seed) for m in table.methods if m in methods}
        if not runs:
          continue
        for run in runs.values():
          _add_training(jobs, run, s, workdir, data)
        if attacks == 'transfer':
          results = _add_transfer(jobs, runs, s, workdir, eval_fields)
          cells.append(Cell(table_name, setting, seed, results, runs))
          continue
        for run in runs.values():
          results = _add_evaluation(jobs, run, s, workdir, table_name, attacks, eval_fields)
          cells.append(Cell(table_name, setting, seed, results, {run.method: run}))
  if not jobs:
    raise ValueError(
      f'No run of the tables {", ".join(tables)} has a method of '
      f'{", ".join(methods)} and a network of {", ".join(archs)}.'
    )
  ordered = sorted(jobs.values(), key=lambda j: j.run is None)  # Trainings first.
  return Plan(tuple(ordered), tuple(cells), s, tuple(tables), workdir, seeds)


def _add_transfer(
  jobs: dict[str, Job],
  runs: dict[str, Run],
  scale: Scale,
  workdir: str,
  eval_fields: dict[str, Any],
) -> str:
  """Adds (once) the job of the transfer matrix between `runs`, all of one network,
  dataset and seed, after their trainings; returns where its results.json will be."""
  run = next(iter(runs.values()))
  name = f'transfer-{arch_name(run.arch, run.width)}-{run.dataset}-s{run.seed}'
  out = os.path.join(workdir, 'transfer', name)
  folders = [os.path.join(workdir, 'runs', r.name) for r in runs.values()]
  step = _eval_step(scale, folders, 'transfer', out, run.seed, eval_fields)
  jobs.setdefault(name, Job(name, (step,), needs=tuple(r.name for r in runs.values())))
  return os.path.join(out, 'results.json')


def _add_evaluation(
  jobs: dict[str, Job],
  run: Run,
  scale: Scale,
  workdir: str,
  table_name: str,
  attacks: str,
  eval_fields: dict[str, Any],
) -> str:
  """Appends to run's job the evaluation of `table_name`'s `attacks` (none if empty;
  once, however many tables share it); returns where its results.json will be ('' for
  no attacks)."""
  if not attacks:
    return ''
  folder = os.path.join(workdir, 'runs', run.name)
  out = os.path.join(folder, 'eval', table_name)
  job = jobs[run.name]
  step = _eval_step(scale, [folder], attacks, out, run.seed, eval_fields)
  if step not in job.steps:
    jobs[run.name] = dataclasses.replace(job, steps=job.steps + (step,))
  return os.path.join(out, 'results.json')


def _eval_step(
  scale: Scale, folders: Sequence[str], attacks: str, out: str, seed: int, fields: dict[str, Any]
) -> Step:
  """eval.py of `attacks` on the models in `folders`, results into `out`."""
  command = (
    'python',
    'eval.py',
    '--config',
    scale.eval_config,
    '--workdir',
    ','.join(folders),
    f'--config.attacks={attacks}',
    f'--config.output_dir={out}',
    f'--config.seed={seed}',
    *_overrides(fields),
  )
  return Step(command, os.path.join(out, 'done.json'))


def _add_training(
  jobs: dict[str, Job], run: Run, scale: Scale, workdir: str, data: list[str]
) -> None:
  """Adds `run`'s job with its train.py command, unless another table added it."""
  if run.name in jobs:
    return
  folder = os.path.join(workdir, 'runs', run.name)
  fields = dict(scale.train)
  if scale.epochs:
    fields.update(scaled_schedule(train_config(run.method, run.arch, run.dataset), scale.epochs))
  if run.width != 1:
    fields['model.width'] = run.width
  fields['seed'] = run.seed
  config = f'configs/cifar.py:{run.method},{run.arch},{run.dataset}{scale.train_config_suffix}'
  command = (
    'python',
    'train.py',
    '--config',
    config,
    '--workdir',
    folder,
    *data,
    *_overrides(fields),
  )
  jobs[run.name] = Job(run.name, (Step(command, os.path.join(folder, 'train_done.json')),), run=run)


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
