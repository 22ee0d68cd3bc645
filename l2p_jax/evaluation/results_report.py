"""results.md and the plots of an evaluation's results (as results_files reads and
writes them, summary completes them): tables in the paper's layout (attacks as columns
with their 95% intervals and the worst case, checkpoints as rows; accuracy against eps;
the transfer matrix of supplementary Table 2; the sanity checks), the accuracy-vs-eps
plot, the attacks' accuracy after each iteration and the noise evolution of every
checkpoint. Columns, their titles and order come
from the attacks' registry entries (attack_registry)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

from l2p_jax.evaluation import intervals, sanity
from l2p_jax.evaluation.attack_registry import (
  ITERATIVE,
  L2,
  SINGLE_STEP,
  Attack,
  attack_entry,
  attack_title,
  registered_attacks,
)
from l2p_jax.runtime import files, plots
from l2p_jax.runtime.markdown import markdown_table
from l2p_jax.runtime.metrics import read_metrics

WORST_CASE = 'worst_case'  # The 'attack' of the worst cases as table records.
WORST_CASE_COLUMN = 'Worst case'
CONVERGENCE_PLOT = 'convergence.png'  # Accuracy after each iteration, beside results.md.


def table_records(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The records of `results` and, as records of the attack 'worst_case' (column Worst
  case), its per-image worst cases, for the tables that show both."""
  eps = results['config']['eps']
  worst = [
    {**w, 'attack': WORST_CASE, 'params': {'eps': eps}, 'source': None, 'mean_l2': None}
    for w in results.get('worst_case', [])
  ]
  return list(results['records']) + worst


def _entry(record: dict[str, Any]) -> Attack | None:
  """The registry entry of a record's attack; None for a worst case."""
  return None if record['attack'] == WORST_CASE else attack_entry(record['attack'])


def shows_mean_l2(record: dict[str, Any]) -> bool:
  """Whether a table record's cell adds the mean L2 of what fooled the model (the
  attacks of the L2 minimum-norm threat model)."""
  entry = _entry(record)
  return entry is not None and entry.threat_model == L2


def column_title(record: dict[str, Any]) -> str:
  """A table record's column title: its attack's (attack_registry.attack_title), or
  Worst case."""
  return WORST_CASE_COLUMN if _entry(record) is None else attack_title(record)


def table_column(record: dict[str, Any], eps: float) -> tuple[tuple, str] | None:
  """(sort key, title) of the main table's column for a white-box record at the
  headline eps; None for transfer records, other radii and the eps sweep's PGD (its step
  a fraction of eps), which the table against eps shows."""
  p = record['params']
  if record['source'] is not None or p['eps'] not in (None, eps) or 'step_fraction' in p:
    return None
  entry = _entry(record)
  order = (
    math.inf if entry is None else entry.column,
    not p.get('attack_noise', True),
    p.get('eot_draws', 1),
    0 if entry is None else p.get(entry.budget, 0),
  )
  return order, column_title(record)


def curve_name(record: dict[str, Any]) -> str | None:
  """The accuracy-vs-eps curve a white-box record is a point of: the title of a
  single-step or iterative attack (FGSM, 'PGD-<steps>' or, for the eps sweep's PGD,
  'PGD-<steps> (step eps/<1/fraction>)') without EOT, the noise on, so that PGD with a
  fixed step and PGD with a step in proportion to eps are two curves even at equal
  steps; None otherwise."""
  p, entry = record['params'], _entry(record)
  if (
    record['source'] is None
    and entry is not None
    and entry.role in (ITERATIVE, SINGLE_STEP)
    and p.get('eot_draws', 1) == 1
    and p.get('attack_noise', True)
  ):
    return attack_title(record)
  return None


def eps_curves(
  records: Sequence[dict[str, Any]],
) -> dict[str, dict[str, list[tuple[float, float, float, float]]]]:
  """{curve: {checkpoint label: [(eps, accuracy, low, high), ...]}}, low and high the 95%
  interval (the accuracy twice for records without one), for the curves measured at two
  radii or more."""
  curves: dict[str, dict[str, list[tuple[float, float, float, float]]]] = {}
  for r in records:
    name = curve_name(r)
    if name:
      low, high = r.get('accuracy_ci95') or (r['accuracy'],) * 2
      curves.setdefault(name, {}).setdefault(r['label'], []).append(
        (r['params']['eps'], r['accuracy'], low, high)
      )
  return {
    name: {label: sorted(points) for label, points in lines.items()}
    for name, lines in curves.items()
    if len({point[0] for points in lines.values() for point in points}) > 1
  }


def convergence_curves(records: Sequence[dict[str, Any]], eps: float) -> dict[str, list[float]]:
  """{'<checkpoint label>: <column title>[ at <eps>/255]': curve} of the white-box
  records that keep their accuracy after each of several iterations (records.Record's
  `curve`), the radius named where it is not the headline eps."""
  return {_curve_label(r, eps): r['curve'] for r in records if _keeps_curve(r)}


def _keeps_curve(record: dict[str, Any]) -> bool:
  """A white-box record with a curve of more than one iteration (FGSM's has one)."""
  return len(record.get('curve') or []) > 2 and record['source'] is None


def _curve_label(record: dict[str, Any], eps: float) -> str:
  radius = record['params']['eps']
  at = '' if radius in (None, eps) else f' at {radius * 255:g}/255'
  return f'{record["label"]}: {column_title(record)}{at}'


def _percent(value: float) -> str:
  return f'{100 * value:.2f}'


def _with_interval(entry: dict[str, Any]) -> str:
  """An accuracy (%) with its 95% interval, e.g. '60.94 [52.3, 68.9]' (the accuracy
  alone for records written before intervals)."""
  if not entry.get('accuracy_ci95'):
    return _percent(entry['accuracy'])
  low, high = entry['accuracy_ci95']
  return f'{_percent(entry["accuracy"])} [{100 * low:.1f}, {100 * high:.1f}]'


def _row_label(checkpoint: dict[str, Any]) -> str:
  width = '' if checkpoint['width'] == 1 else f' x{checkpoint["width"]:g}'
  return (
    f'{checkpoint["label"]} ({checkpoint["method"]} {checkpoint["arch"]}{width}, '
    f'step {checkpoint["step"]})'
  )


def _summary(records: Sequence[dict[str, Any]], eps: float) -> str:
  """The sentence above the tables: data, example counts, eps, prediction rule."""
  first, attacks = records[0], {r['attack'] for r in records}
  sizes = sorted({(r['attack'], r['n']) for r in records}, key=lambda a: -a[1])
  fewer = ', '.join(f'{attack}: {n}' for attack, n in sizes if n != sizes[0][1])
  rules = {
    r['label']: f'{r["rule"]} over {r["draws"]} noise draw(s), judged under '
    f'{r.get("judged_draws", 1)} draw(s)'
    for r in records
  }
  rule = (
    next(iter(rules.values()))
    if len(set(rules.values())) == 1
    else '; '.join(f'{label}: {text}' for label, text in rules.items())
  )
  return (
    f'Accuracy (%) on {first["dataset"]}/{first["split"]}, {sizes[0][1]} examples'
    f'{f" ({fewer})" if fewer else ""}; eps = {eps * 255:g}/255; prediction rule '
    f'{rule}, noise {"on" if first["noise"] else "off"}.'
    + ''.join(f' {e.note}' for e in registered_attacks() if e.note and e.name in attacks)
  )


WIDE_INTERVAL = 0.20  # Wider 95% intervals of a 50% accuracy than this separate little.


def _key() -> str:
  """What the brackets, the worst case, 'right under every draw' and the sanity checks'
  results mean, in a few lines."""
  return '\n'.join(
    [
      'Key:',
      '- *[low, high]*: the 95% interval of the accuracy over the images and the judged noise '
      'draws (intervals.py); two numbers whose intervals overlap are not told apart.',
      '- *Worst case*: the images right under every L-inf attack at the headline eps '
      '(clean included): *per image*, its smallest share of draws right over the attacks; '
      '*per draw*, right under draw k only if right under draw k for every attack (the '
      'attacks share their judged draws), so never above the per-image one.',
      '- *right under every draw*: the images classified right under each judged draw, '
      'stricter than the mean over draws.',
      '- *Sanity check FAILED*: the column may measure a weak attack, not a strong defense; '
      '*not applicable*: the check needs a setting this evaluation did not run.',
    ]
  )


def small_n_warning(records: Sequence[dict[str, Any]]) -> str | None:
  """A warning when the most records' example count is too small for the intervals to
  separate anything: the 95% interval of a 50% accuracy over that many images (one
  draw) is wider than WIDE_INTERVAL."""
  if not records:
    return None
  n = max(r['n'] for r in records)
  low, high = intervals.wilson_interval(0.5, n)
  if high - low <= WIDE_INTERVAL:
    return None
  return (
    f'Warning: {n} examples are too few to separate attacks or models: at {n} images the '
    f'95% interval of a 50% accuracy is {100 * (high - low):.0f} points wide, so '
    f'differences smaller than that are noise (more examples: --config.data.examples).'
  )


def console_lines(results: dict[str, Any]) -> list[str]:
  """What the console says after an evaluation: every sanity check with its result and
  the small-n warning, with a one-line key."""
  lines = [
    f'sanity {c["label"]} {c["name"]} {sanity.verdict(c)}: {c["detail"]}'
    for c in results.get('sanity', [])
  ]
  if lines:
    lines.append(
      'A FAILED sanity check: the column may measure a weak attack, not a strong defense; '
      'not applicable: the check needs a setting this evaluation did not run.'
    )
  warning = small_n_warning(results['records'])
  return lines + ([warning] if warning else [])


def _attack_table(results: dict[str, Any]) -> str | None:
  """Rows: checkpoints; columns: the attacks at the headline eps (the paper's layout)."""
  records, eps = table_records(results), results['config']['eps']
  cells: dict[tuple[str, str], str] = {}
  columns = set()
  for r in records:
    column = table_column(r, eps)
    if column:
      columns.add(column)
      cells[r['label'], column[1]] = (
        f'{_with_interval(r)} / {"-" if r["mean_l2"] is None else format(r["mean_l2"], ".3f")}'
        if shows_mean_l2(r)
        else _with_interval(r)
      )
  if not columns:
    return None
  # One column per title: a deterministic model's one-draw APGD-rand beside a randomized one's.
  titles = list(dict.fromkeys(title for _, title in sorted(columns)))
  rows = [c for c in results['checkpoints'] if any(label == c['label'] for label, _ in cells)]
  return '## Accuracy under attack\n\n' + markdown_table(
    ['checkpoint'] + titles,
    [[_row_label(c)] + [cells.get((c['label'], t), '-') for t in titles] for c in rows],
  )


def _eps_table(records: Sequence[dict[str, Any]]) -> str | None:
  """Rows: (checkpoint, attack); columns: the radii of the eps sweep."""
  curves = eps_curves(records)
  if not curves:
    return None
  radii = sorted({p[0] for lines in curves.values() for line in lines.values() for p in line})
  points = {
    (name, label, p[0]): p[1]
    for name, lines in curves.items()
    for label, line in lines.items()
    for p in line
  }
  return '## Accuracy against eps\n\n' + markdown_table(
    ['checkpoint', 'attack'] + [f'{e * 255:g}/255' for e in radii],
    [
      [label, name]
      + [_percent(points[name, label, e]) if (name, label, e) in points else '-' for e in radii]
      for name, lines in curves.items()
      for label in lines
    ],
  )


def _transfer_table(records: Sequence[dict[str, Any]]) -> str | None:
  """Supplementary Table 2: rows source, columns target with FGSM and PGD sub-columns."""
  transfer = [r for r in records if r['source'] is not None]
  if not transfer:
    return None
  targets = list(dict.fromkeys(r['label'] for r in transfer))
  sources = list(dict.fromkeys(r['source']['label'] for r in transfer))
  kinds = list(dict.fromkeys(column_title(r) for r in transfer))
  value = {(r['source']['label'], r['label'], column_title(r)): _with_interval(r) for r in transfer}
  return '## Transfer (rows: source model, columns: target model)\n\n' + markdown_table(
    ['source \\ target'] + [f'{t} {k}' for t in targets for k in kinds],
    [[s] + [value.get((s, t, k), '-') for t in targets for k in kinds] for s in sources],
  )


def markdown(results: dict[str, Any]) -> str:
  """results.md: a summary line, then accuracy (%) per checkpoint and attack at the
  headline eps, accuracy against eps, the transfer matrix, the sanity checks and where
  the accuracy after each iteration is drawn, each when its records are there."""
  records = results['records']
  if not records:
    return 'No results.\n'
  sections = [
    _summary(records, results['config']['eps']),
    small_n_warning(records),
    _key(),
    _attack_table(results),
    _worst_case_table(results.get('worst_case', [])),
    _eps_table(records),
    _transfer_table(records),
    _sanity_table(results.get('sanity', [])),
    _convergence_note(records),
  ]
  return '\n\n'.join(s for s in sections if s) + '\n'


def _convergence_note(records: Sequence[dict[str, Any]]) -> str | None:
  """Where the accuracy after each iteration is drawn, when a record keeps it."""
  if not any(_keeps_curve(r) for r in records):
    return None
  return (
    f'## Convergence\n\n[{CONVERGENCE_PLOT}]({CONVERGENCE_PLOT}): the accuracy of every '
    'white-box PGD, APGD and Square record after each of its iterations, as the attack '
    'itself saw it; the sanity check *converged* fails an attack whose last quarter of '
    'iterations still took off more than its interval is wide.'
  )


def _per_draw(entry: dict[str, Any]) -> str:
  """A worst case's per-draw accuracy with its interval, '-' where it has none."""
  if 'accuracy_per_draw' not in entry:
    return '-'
  per_draw = {
    'accuracy': entry['accuracy_per_draw'],
    'accuracy_ci95': entry['accuracy_per_draw_ci95'],
  }
  return _with_interval(per_draw)


def _worst_case_table(entries: Sequence[dict[str, Any]]) -> str | None:
  """Per checkpoint: the images that survive every L-inf attack run at the headline eps
  (verdicts.worst_cases), per image and per draw ('-' where an attack's draws were not
  shared: records judged before they were)."""
  if not entries:
    return None
  return (
    '## Worst case per image over the attacks (L-inf, headline eps, clean included)\n\n'
    + markdown_table(
      [
        'checkpoint',
        'attacks',
        'judged draws',
        'accuracy [95% interval]',
        'per draw [95% interval]',
        'right under every draw',
      ],
      [
        [
          w['label'],
          str(len(w['attacks'])),
          str(w['judged_draws']),
          _with_interval(w),
          _per_draw(w),
          _percent(w['accuracy_all_draws']),
        ]
        for w in entries
      ],
    )
  )


def _sanity_table(entries: Sequence[dict[str, Any]]) -> str | None:
  """The sanity checks of every checkpoint (sanity.py), failed ones first."""
  if not entries:
    return None
  failed = sum(e['passed'] is False for e in entries)
  inapplicable = sum(e['passed'] is None for e in entries)
  ordered = sorted(entries, key=lambda e: {False: 0, None: 1, True: 2}[e['passed']])
  counts = f'{failed} of {len(entries)} failed' + (
    f', {inapplicable} not applicable' if inapplicable else ''
  )
  return f'## Sanity checks ({counts})\n\n' + markdown_table(
    ['checkpoint', 'check', 'result', 'detail'],
    [[e['label'], e['name'], sanity.verdict(e), e['detail']] for e in ordered],
  )


def write_report(results: dict[str, Any], output_dir: str) -> list[str]:
  """Writes results.md, accuracy_vs_eps.png (when an eps sweep was run), convergence.png
  (when a record keeps its accuracy after each iteration) and
  noise_evolution_<label>.png (for every checkpoint whose run left metrics.jsonl with
  noise statistics) into `output_dir`; returns the paths written. Every file is
  written atomically: a full disk keeps the old one."""
  os.makedirs(output_dir, exist_ok=True)
  paths = [os.path.join(output_dir, 'results.md')]
  files.write_text(paths[0], markdown(results))
  plot = os.path.join(output_dir, 'accuracy_vs_eps.png')
  if plots.plot_accuracy_vs_eps(eps_curves(results['records']), plot):
    paths.append(plot)
  plot = os.path.join(output_dir, CONVERGENCE_PLOT)
  if plots.plot_convergence(convergence_curves(results['records'], results['config']['eps']), plot):
    paths.append(plot)
  for c in results['checkpoints']:
    metrics = os.path.join(c['workdir'], 'metrics.jsonl')
    name = re.sub(r'[^\w.-]+', '_', c['label'])
    plot = os.path.join(output_dir, f'noise_evolution_{name}.png')
    if os.path.exists(metrics) and plots.plot_noise_evolution(
      read_metrics(metrics), plot, title=f'{c["label"]}: {c["method"]} {c["arch"]}'
    ):
      paths.append(plot)
  return paths
