"""The reproduction's report: every table of a plan (see paper_grid.py) in the paper's
layout from the eval.py results its jobs left, each measured cell (the mean over seeds
with its 95% interval: Student's over two or more seeds, the evaluation's own over
images and judged draws for one) beside the published number or "not published"; over
several seeds, every pair of methods' differences with Welch's intervals; the sanity
checks of every evaluation; written as report.json, REPORT.md (report_markdown.py) and
the figures (noise evolution, accuracies with their intervals, accuracy against eps)
as PNG."""

from __future__ import annotations

import collections
import os
import statistics
from collections.abc import Sequence
from typing import Any

from l2p_jax import methods
from l2p_jax.evaluation import eval_config, intervals, plan_attacks, results_files, results_report
from l2p_jax.evaluation.attack_registry import attack_title
from l2p_jax.reproduction import report_markdown
from l2p_jax.reproduction.grid_runner import is_done
from l2p_jax.reproduction.paper_grid import Cell, Plan, table_evaluation
from l2p_jax.reproduction.paper_tables import TABLES, arch_name
from l2p_jax.reproduction.published_numbers import (
  PUBLISHED_FEW_PIXEL,
  PUBLISHED_MAIN,
  PUBLISHED_TRANSFER,
)
from l2p_jax.reproduction.scales import Scale
from l2p_jax.runtime import files, plots
from l2p_jax.runtime.metrics import read_metrics


def _load(path: str) -> tuple[list[dict[str, Any]], float]:
  """The records of a results.json ([] if not there yet) with its per-image worst cases
  as records (results_report.table_records) and its headline eps; a file that does not
  read is one ResultsFileError naming it."""
  results = results_files.read_previous(os.path.dirname(path)) if path else None
  if results is None:
    return [], 0.0
  return results_report.table_records(results), results['config']['eps']


def _summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The seeds' accuracies (records' `accuracy`, in [0, 1]) as percent: each, their mean,
  sample std (None for one) and 95% interval: Student's over the seeds for two or
  more, the record's own over images and judged draws (`accuracy_ci95`) for one."""
  percent = [100 * r['accuracy'] for r in records]
  if len(percent) > 1:
    low, high = intervals.seed_interval(percent)
    interval = [max(0.0, low), min(100.0, high)]
  else:
    own = records[0].get('accuracy_ci95')
    interval = [100 * own[0], 100 * own[1]] if own else None
  return {
    'values': percent,
    'mean': statistics.fmean(percent),
    'std': statistics.stdev(percent) if len(percent) > 1 else None,
    'ci95': interval,
  }


def _collect(cells: Sequence[Cell], key, sizes: set[int]) -> dict[tuple, list[dict]]:
  """{key(cell, labels, record, eps): [record per seed]} over the cells' records
  (labels: run name -> method; eps: the file's headline eps), where `key` returns None
  for records that do not belong in the table; adds the example counts to `sizes`."""
  found: dict[tuple, list[dict]] = {}
  for cell in cells:
    labels = {run.name: method for method, run in cell.runs.items()}
    records, eps = _load(cell.results)
    for record in records:
      k = key(cell, labels, record, eps)
      if k is not None:
        found.setdefault(k, []).append(record)
        sizes.add(record['n'])
  return found


def _differences(rows: Sequence[dict[str, Any]], titles: Sequence[str]) -> list[dict[str, Any]]:
  """For every setting and pair of its methods (the later minus the earlier of
  methods.METHODS), per column: the difference of the seed means and its Welch interval
  (None where either side has fewer than two seeds)."""
  found = []
  for i, a in enumerate(rows):
    for b in rows[:i]:
      if a['setting'] != b['setting']:
        continue
      cells = {}
      for title in titles:
        x, y = a['cells'][title]['measured'], b['cells'][title]['measured']
        both = x and y and len(x['values']) > 1 and len(y['values']) > 1
        cells[title] = (
          list(intervals.difference_interval(x['values'], y['values'])) if both else None
        )
      found.append({'setting': a['setting'], 'methods': [a['method'], b['method']], 'cells': cells})
  return found


def randomized_columns(scale: Scale, table_name: str) -> dict[str, str]:
  """{a randomized model's column: a deterministic model's} for each attack planned for
  the table whose two versions have different titles (EOT-PGD and PGD, Square with and
  without EOT, C&W in expectation, AutoAttack's rand and standard versions), computed
  from the specs that eval.py plans under the table's settings at `scale`. Only where
  the deterministic title is no randomized model's own column and no other attack's
  pair, so that a cell never holds two records of one seed (a table with PGD-7 and
  EOT-PGD-7 keeps them apart)."""
  attacks, fields = table_evaluation(scale, table_name)
  config = eval_config.get_config(scale.eval_config.partition(':')[2])
  config.update_from_flattened_dict(fields)
  title = lambda spec: attack_title({'attack': spec.attack, 'params': spec.describe()})
  versions = [
    tuple(title(spec.for_model(config, r)) for r in (True, False))
    for spec in plan_attacks(config, attacks)[0]
  ]
  own = {randomized for randomized, _ in versions}
  pairs = collections.Counter(d for r, d in versions if r != d)
  return {r: d for r, d in versions if r != d and d not in own and pairs[d] == 1}


def _white_box_table(
  cells: Sequence[Cell], published: dict, paired: dict[str, str]
) -> dict[str, Any]:
  """Rows (setting, method), columns the attacks at the headline eps, a randomized
  model's version of a planned attack in the deterministic one's column (`paired`, from
  randomized_columns; the result's `randomized_columns` gives each such column's other
  title); C&W cells also
  hold the mean L2 of the perturbations that fooled the model."""
  columns: dict[str, tuple] = {}
  randomized: dict[str, str] = {}
  extra: dict[tuple, list[float]] = {}
  sizes: set[int] = set()

  def key(cell, labels, record, eps):
    column = results_report.table_column(record, eps)
    if column is None or record['label'] not in labels:
      return None
    order, title = column
    if title in paired:
      randomized[paired[title]] = title
      title = paired[title]
    columns[title] = min(order, columns.get(title, order))
    method = labels[record['label']]
    if results_report.shows_mean_l2(record) and record.get('mean_l2') is not None:
      extra.setdefault((cell.setting, method, title), []).append(record['mean_l2'])
    return cell.setting, method, title

  found = _collect(cells, key, sizes)
  titles = sorted(columns, key=columns.get)
  rows = []
  for setting in dict.fromkeys(c.setting for c in cells):
    for method in methods.METHODS:
      if not any(method in c.runs for c in cells if c.setting == setting):
        continue
      row = {'setting': list(setting), 'method': method, 'cells': {}}
      for title in titles:
        measured = found.get((setting, method, title))
        l2 = extra.get((setting, method, title))
        row['cells'][title] = {
          'measured': _summary(measured) if measured else None,
          'mean_l2': statistics.fmean(l2) if l2 else None,
          'published': published.get((*setting, method, title)),
        }
      rows.append(row)
  return {
    'columns': titles,
    'randomized_columns': {t: randomized[t] for t in titles if t in randomized},
    'rows': rows,
    'differences': _differences(rows, titles),
    'examples': sorted(sizes),
  }


def _transfer_table(cells: Sequence[Cell]) -> dict[str, Any]:
  """Rows (setting, source method), columns (target method, FGSM | PGD)."""

  def key(cell, labels, record, eps):
    source = record['source'] and labels.get(record['source']['label'])
    if source is None or record['label'] not in labels:
      return None
    kind = 'FGSM' if record['attack'] == 'fgsm' else 'PGD'
    return cell.setting, source, labels[record['label']], kind

  sizes: set[int] = set()
  found = _collect(cells, key, sizes)
  rows = []
  for setting in dict.fromkeys(c.setting for c in cells):
    trained = [
      m for m in methods.METHODS if any(m in c.runs for c in cells if c.setting == setting)
    ]
    for source in trained:
      rows.append(
        {
          'setting': list(setting),
          'source': source,
          'cells': {
            f'{target} {kind}': {
              'measured': _summary(found[setting, source, target, kind])
              if (setting, source, target, kind) in found
              else None,
              'published': PUBLISHED_TRANSFER.get((*setting, source, target, kind)),
            }
            for target in trained
            for kind in ('FGSM', 'PGD')
          },
        }
      )
  return {
    'targets': [m for m in methods.METHODS if any(m in c.runs for c in cells)],
    'rows': rows,
    'examples': sorted(sizes),
  }


def _eps_curves(cells: Sequence[Cell]) -> dict[str, Any]:
  """{attack: {method: [[eps_255, mean accuracy %, std, interval], ...]}} over seeds
  (_summary)."""

  def key(cell, labels, record, eps):
    name = results_report.curve_name(record)
    if name is None or record['label'] not in labels:
      return None
    return name, labels[record['label']], round(record['params']['eps'] * 255, 6)

  sizes: set[int] = set()
  found = _collect(cells, key, sizes)
  curves: dict[str, dict[str, list]] = {}
  for (name, method, eps), values in sorted(
    found.items(), key=lambda item: (item[0][0], methods.METHODS.index(item[0][1]), item[0][2])
  ):
    s = _summary(values)
    curves.setdefault(name, {}).setdefault(method, []).append([eps, s['mean'], s['std'], s['ci95']])
  return {'curves': curves, 'examples': sorted(sizes)}


def _noise(cells: Sequence[Cell], plan: Plan) -> dict[str, Any]:
  """Per run: the mean over layers of the mean noise parameter, per epoch."""
  found = {}
  for cell in cells:
    for run in cell.runs.values():
      path = os.path.join(plan.workdir, 'runs', run.name, 'metrics.jsonl')
      if not os.path.exists(path):
        continue
      found[run.name] = {
        'method': run.method,
        'seed': run.seed,
        'epochs': [
          [r['epoch'], statistics.fmean(v['mean'] for v in r['noise'].values())]
          for r in read_metrics(path)
          if r.get('noise')
        ],
      }
  return found


def _sanity(plan: Plan) -> list[dict[str, Any]]:
  """Every evaluation's sanity checks (sanity.py), each naming its results.json relative
  to the grid's folder (not its checkpoint's path: the report reads the same wherever
  the grid is)."""
  found = []
  for path in dict.fromkeys(c.results for c in plan.cells if c.results):
    results = results_files.read_previous(os.path.dirname(path))
    for entry in (results or {}).get('sanity', []):
      kept = {k: v for k, v in entry.items() if k != 'checkpoint'}
      found.append({**kept, 'results': os.path.relpath(path, plan.workdir)})
  return found


def assemble(plan: Plan) -> dict[str, Any]:
  """The report's content: the plan's scale and progress, and every table it holds."""
  done = sum(all(is_done(s) for s in job.steps) for job in plan.jobs)
  scale = plan.scale
  result: dict[str, Any] = {
    'scale': scale.name,
    'seeds': plan.seeds,
    'tables': list(plan.tables),
    'jobs': len(plan.jobs),
    'jobs_done': done,
    'sections': {},
    'sanity': _sanity(plan),
  }
  for name in plan.tables:
    cells = [c for c in plan.cells if c.table == name]
    if name in ('main', 'few_pixel'):
      published = PUBLISHED_MAIN if name == 'main' else PUBLISHED_FEW_PIXEL
      body = _white_box_table(cells, published, randomized_columns(scale, name))
    elif name == 'transfer':
      body = _transfer_table(cells)
    elif name == 'figure1':
      body = {'runs': _noise(cells, plan)}
    else:
      body = _eps_curves(cells)
    models = {arch_name(*(scale.model or c.setting)) for c in cells}
    datasets = {r.dataset for c in cells for r in c.runs.values()}
    result['sections'][name] = {
      'title': TABLES[name].title,
      'models': sorted(models),
      'datasets': sorted(datasets),
      **body,
    }
  return result


def _figures(content: dict[str, Any], plan: Plan, folder: str) -> dict[str, list[str]]:
  """Draws Figure 1 (one PNG per run), the main and few-pixel tables' accuracies with
  their intervals (one PNG each) and Figures 2-3 (one PNG, all methods) into `folder`;
  returns {section: [paths relative to the grid folder]}."""
  os.makedirs(folder, exist_ok=True)
  drawn: dict[str, list[str]] = {}
  sections = content['sections']
  for name in sections.get('figure1', {}).get('runs', {}):
    path = os.path.join(folder, f'noise_evolution_{name}.png')  # Names are [\w.-].
    records = read_metrics(os.path.join(plan.workdir, 'runs', name, 'metrics.jsonl'))
    if plots.plot_noise_evolution(records, path, title=name):
      drawn.setdefault('figure1', []).append(os.path.relpath(path, plan.workdir))
  for name in ('main', 'few_pixel'):
    rows = sections.get(name, {}).get('rows', [])
    for setting in dict.fromkeys(tuple(r['setting']) for r in rows):
      cells = {
        methods.get(row['method']).title: {
          column: (m['mean'], *(m['ci95'] or (m['mean'], m['mean'])), m['values'])
          for column, cell in row['cells'].items()
          if (m := cell['measured'])
        }
        for row in rows
        if tuple(row['setting']) == setting
      }
      path = os.path.join(folder, f'accuracy_{name}_{arch_name(*setting)}.png')
      spread = f'mean, 95% interval over {plan.seeds} seeds' if plan.seeds > 1 else '95% interval'
      title = f'{report_markdown.setting_name(plan, setting)}: accuracy ({spread})'
      if plots.plot_accuracy_intervals(cells, path, title=title):
        drawn.setdefault(name, []).append(os.path.relpath(path, plan.workdir))
  curves = sections.get('figures23', {}).get('curves')
  if curves:
    path = os.path.join(folder, 'accuracy_vs_eps.png')
    lines = {
      attack: {
        methods.get(m).title: [_curve_point(*point) for point in points]
        for m, points in by_method.items()
      }
      for attack, by_method in curves.items()
    }
    if plots.plot_accuracy_vs_eps(lines, path):
      drawn['figures23'] = [os.path.relpath(path, plan.workdir)]
  return drawn


def _curve_point(
  eps_255: float, mean: float, std: float | None, ci95: list[float] | None
) -> tuple[float, float, float, float]:
  """A figures23 point (_eps_curves, percent) as plots.plot_accuracy_vs_eps takes it:
  (eps, accuracy, low, high) in [0, 1] units, the band the mean alone without an interval."""
  low, high = ci95 or (mean, mean)
  return eps_255 / 255, mean / 100, low / 100, high / 100


def write(plan: Plan) -> list[str]:
  """Writes report.json, REPORT.md and figures/ into the plan's folder; returns the
  paths of the two files."""
  content = assemble(plan)
  figures = _figures(content, plan, os.path.join(plan.workdir, 'figures'))
  paths = [os.path.join(plan.workdir, 'report.json'), os.path.join(plan.workdir, 'REPORT.md')]
  files.write_json(paths[0], content)  # Atomically: a full disk keeps the old report.
  files.write_text(paths[1], report_markdown.markdown(content, plan, figures))
  return paths
