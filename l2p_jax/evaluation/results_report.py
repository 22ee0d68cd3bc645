"""An evaluation's results as files: results.json (every record, the per-image worst
case of every checkpoint and the sanity checks), verdicts.npz (the per-image verdicts,
see verdicts.py), results.md (tables in the paper's layout: attacks as columns with
their 95% intervals and the worst case, checkpoints as rows; accuracy against eps; the
transfer matrix of supplementary Table 2; the sanity checks) and the plots.

A record (one per checkpoint, attack and parameters) has the fields RECORD_FIELDS:
label, checkpoint, step, workdir, method, arch, width, dataset, split (what was
evaluated); attack, name, params (the attack: ATTACK_FUNCTIONS key, readable name,
parameters with eps and examples); source (None for white-box, else the checkpoint the examples
were made on); accuracy, correct, n, fooled, mean_l2 (the outcome; fooled counts the
examples predicted right on the clean input and wrong on the attack's, mean_l2 is the
mean L2 norm of their perturbations, None if there are none; with K judged draws,
correct and fooled count (image, draw) verdicts, out of n x K); seconds (wall
clock, compilation included); rule, draws, rule_from, noise, randomized (how
predictions were made; rule_from is 'authors' when the rule is the method authors'
default, 'config' when config.predict set it); key, batch_size (what reproduces the
record: see evaluation.KEY_LAYOUT); judged_draws (K, the noise draws the attack's
inputs were judged under), accuracy_ci95 ([low, high], intervals.accuracy_interval),
accuracy_all_draws (the share of images right under every judged draw), judge_seconds
(of `seconds`, those spent judging) and verdicts (the record's name in verdicts.npz).

A rerun into the same folder keeps the earlier records it does not redo (see
`merge_previous`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from l2p_jax.errors import UserError
from l2p_jax.evaluation import records as records_lib
from l2p_jax.evaluation import sanity, verdicts
from l2p_jax.evaluation.attack_registry import PNI_CW
from l2p_jax.runtime import files, plots
from l2p_jax.runtime.metrics import read_metrics

RECORD_FIELDS = (
  'label',
  'checkpoint',
  'step',
  'workdir',
  'method',
  'arch',
  'width',
  'dataset',
  'split',
  'attack',
  'name',
  'params',
  'source',
  'accuracy',
  'correct',
  'n',
  'fooled',
  'mean_l2',
  'seconds',
  'rule',
  'draws',
  'rule_from',
  'noise',
  'randomized',
  'key',
  'batch_size',
  'judged_draws',
  'accuracy_ci95',
  'accuracy_all_draws',
  'judge_seconds',
  'verdicts',
)
CW_COLUMN = 'C&W acc / L2'
CW_PNI_COLUMN = 'C&W (PNI) acc / L2'  # The `cw_pni` preset: PNI's settings.
WORST_CASE_COLUMN = 'Worst case'


ATTACK_ORDER = ('clean', 'fgsm', 'pgd', 'cw', 'apgd_rand', 'few_pixel', 'worst_case')


def table_records(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The records of `results` and, as records of the attack 'worst_case' (column Worst
  case), its per-image worst cases, for the tables that show both."""
  eps = results['config']['eps']
  worst = [
    {**w, 'attack': 'worst_case', 'params': {'eps': eps}, 'source': None, 'mean_l2': None}
    for w in results.get('worst_case', [])
  ]
  return list(results['records']) + worst


def attack_title(record: dict[str, Any]) -> str:
  """A short column title: Clean, FGSM, PGD-7, PGD-20 noise-off, EOT-PGD-7 (30 draws),
  PGD-10 (step eps/4) (a step in proportion to eps, as the eps sweep's), C&W, C&W (PNI),
  APGD-rand, APGD noise-off, 1 px, Worst case."""
  p, attack = record['params'], record['attack']
  noise_off = '' if p.get('attack_noise', True) else ' noise-off'
  if attack == 'pgd':
    title = (
      f'PGD-{p["steps"]}{noise_off}'
      if p['eot_draws'] == 1
      else f'EOT-PGD-{p["steps"]} ({p["eot_draws"]} draws)'
    )
    fraction = p.get('step_fraction')
    return title if fraction is None else f'{title} (step eps/{1 / fraction:.3g})'
  if attack == 'few_pixel':
    return f'{p["n_pixels"]} px'
  if attack == 'cw':
    return CW_PNI_COLUMN if all(p.get(k) == v for k, v in PNI_CW.items()) else CW_COLUMN
  if attack == 'apgd_rand' and noise_off:
    return 'APGD noise-off'
  titles = {'clean': 'Clean', 'fgsm': 'FGSM', 'apgd_rand': 'APGD-rand'}
  return {**titles, 'worst_case': WORST_CASE_COLUMN}[attack]


def table_column(record: dict[str, Any], eps: float) -> tuple[tuple, str] | None:
  """(sort key, title) of the main table's column for a white-box record at the
  headline eps; None for transfer records, other radii and the eps sweep's PGD (its step
  a fraction of eps), which the table against eps shows."""
  p = record['params']
  if record['source'] is not None or p['eps'] not in (None, eps) or 'step_fraction' in p:
    return None
  order = (
    ATTACK_ORDER.index(record['attack']),
    not p.get('attack_noise', True),
    p.get('eot_draws', 1),
    p.get('n_pixels', p.get('steps', 0)),
  )
  return order, attack_title(record)


def curve_name(record: dict[str, Any]) -> str | None:
  """The accuracy-vs-eps curve a white-box record is a point of: 'FGSM', 'PGD-<steps>'
  or, for the eps sweep's PGD, 'PGD-<steps> (step eps/<1/fraction>)' (without EOT, the
  noise on), so that PGD with a fixed step and PGD with a step in proportion to eps are
  two curves even at equal steps; None otherwise."""
  p = record['params']
  if record['source'] is None and (
    record['attack'] == 'fgsm'
    or (record['attack'] == 'pgd' and p['eot_draws'] == 1 and p.get('attack_noise', True))
  ):
    return attack_title(record)
  return None


def eps_curves(
  records: Sequence[dict[str, Any]],
) -> dict[str, dict[str, list[tuple[float, float]]]]:
  """{curve: {checkpoint label: [(eps, accuracy), ...]}} for the curves measured at two
  radii or more."""
  curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
  for r in records:
    name = curve_name(r)
    if name:
      curves.setdefault(name, {}).setdefault(r['label'], []).append(
        (r['params']['eps'], r['accuracy'])
      )
  return {
    name: {label: sorted(points) for label, points in lines.items()}
    for name, lines in curves.items()
    if len({eps for points in lines.values() for eps, _ in points}) > 1
  }


def _percent(value: float) -> str:
  return f'{100 * value:.2f}'


def _with_interval(entry: dict[str, Any]) -> str:
  """An accuracy (%) with its 95% interval, e.g. '60.94 [52.3, 68.9]' (the accuracy
  alone for records written before intervals)."""
  if not entry.get('accuracy_ci95'):
    return _percent(entry['accuracy'])
  low, high = entry['accuracy_ci95']
  return f'{_percent(entry["accuracy"])} [{100 * low:.1f}, {100 * high:.1f}]'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def _row_label(checkpoint: dict[str, Any]) -> str:
  width = '' if checkpoint['width'] == 1 else f' x{checkpoint["width"]:g}'
  return (
    f'{checkpoint["label"]} ({checkpoint["method"]} {checkpoint["arch"]}{width}, '
    f'step {checkpoint["step"]})'
  )


def _summary(records: Sequence[dict[str, Any]], eps: float) -> str:
  """The sentence above the tables: data, example counts, eps, prediction rule."""
  first = records[0]
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
    + ' Brackets: 95% interval over images and judged draws (intervals.py).'
    + (
      ' C&W: accuracy / mean L2 of the perturbations that fooled the model.'
      if any(r['attack'] == 'cw' for r in records)
      else ''
    )
  )


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
        if r['attack'] == 'cw'
        else _with_interval(r)
      )
  if not columns:
    return None
  titles = [title for _, title in sorted(columns)]
  rows = [c for c in results['checkpoints'] if any(label == c['label'] for label, _ in cells)]
  return '## Accuracy under attack\n\n' + _table(
    ['checkpoint'] + titles,
    [[_row_label(c)] + [cells.get((c['label'], t), '-') for t in titles] for c in rows],
  )


def _eps_table(records: Sequence[dict[str, Any]]) -> str | None:
  """Rows: (checkpoint, attack); columns: the radii of the eps sweep."""
  curves = eps_curves(records)
  if not curves:
    return None
  radii = sorted({e for lines in curves.values() for line in lines.values() for e, _ in line})
  points = {
    (name, label, e): a
    for name, lines in curves.items()
    for label, line in lines.items()
    for e, a in line
  }
  return '## Accuracy against eps\n\n' + _table(
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
  kinds = list(dict.fromkeys(attack_title(r) for r in transfer))
  value = {(r['source']['label'], r['label'], attack_title(r)): _with_interval(r) for r in transfer}
  return '## Transfer (rows: source model, columns: target model)\n\n' + _table(
    ['source \\ target'] + [f'{t} {k}' for t in targets for k in kinds],
    [[s] + [value.get((s, t, k), '-') for t in targets for k in kinds] for s in sources],
  )


def markdown(results: dict[str, Any]) -> str:
  """results.md: a summary line, then accuracy (%) per checkpoint and attack at the
  headline eps, accuracy against eps, and the transfer matrix, each when its records
  are there."""
  records = results['records']
  if not records:
    return 'No results.\n'
  sections = [
    _summary(records, results['config']['eps']),
    _attack_table(results),
    _worst_case_table(results.get('worst_case', [])),
    _eps_table(records),
    _transfer_table(records),
    _sanity_table(results.get('sanity', [])),
  ]
  return '\n\n'.join(s for s in sections if s) + '\n'


def _worst_case_table(entries: Sequence[dict[str, Any]]) -> str | None:
  """Per checkpoint: the images that survive every L-inf attack run at the headline eps
  (verdicts.worst_cases)."""
  if not entries:
    return None
  return (
    '## Worst case per image over the attacks (L-inf, headline eps, clean included)\n\n'
    + _table(
      [
        'checkpoint',
        'attacks',
        'judged draws',
        'accuracy [95% interval]',
        'right under every draw',
      ],
      [
        [
          w['label'],
          str(len(w['attacks'])),
          str(w['judged_draws']),
          _with_interval(w),
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
  failed = sum(not e['passed'] for e in entries)
  ordered = sorted(entries, key=lambda e: e['passed'])
  return f'## Sanity checks ({failed} of {len(entries)} failed)\n\n' + _table(
    ['checkpoint', 'check', 'result', 'detail'],
    [[e['label'], e['name'], 'passed' if e['passed'] else 'FAILED', e['detail']] for e in ordered],
  )


def summarize(results: dict[str, Any], verdicts_by_name: dict[str, Any]) -> dict[str, Any]:
  """`results` with its per-image worst cases (verdicts.worst_cases) and its sanity
  checks (sanity.sanity_checks) computed over all its records."""
  eps = results['config']['eps']
  results = {
    **results,
    'worst_case': verdicts.worst_cases(results['records'], verdicts_by_name, eps),
  }
  return {**results, 'sanity': sanity.sanity_checks(results)}


class ResultsFileError(UserError, ValueError):
  """An earlier results.json that cannot be read, so its records cannot be kept."""


def read_previous(output_dir: str) -> dict[str, Any] | None:
  """The results of an earlier output_dir/results.json, None when there is none; raises
  ResultsFileError, naming the file and what to do, when it does not read."""
  path = os.path.join(output_dir, 'results.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      previous = json.load(f)
    if not (isinstance(previous, dict) and {'checkpoints', 'records'} <= set(previous)):
      raise ValueError('it has no checkpoints and records')
  except (OSError, ValueError, TypeError) as error:
    raise ResultsFileError(
      f'{path} does not read ({type(error).__name__}: {error}), so its earlier records '
      'cannot be kept; move it aside and rerun, or write elsewhere with '
      '--config.output_dir=DIR.'
    ) from None
  return previous


def merge_previous(
  results: dict[str, Any], new_verdicts: dict[str, Any], output_dir: str
) -> tuple[dict[str, Any], dict[str, Any]]:
  """`results` with the records and checkpoints of an earlier output_dir/results.json
  that it does not redo kept in front of its own, and the verdicts of all its records
  (the earlier verdicts.npz's and `new_verdicts`)."""
  previous = read_previous(output_dir)
  if previous is not None:
    redone = {records_lib.identity(r) for r in results['records']}
    listed = {c['checkpoint'] for c in results['checkpoints']}
    results = {
      **results,
      'checkpoints': [c for c in previous['checkpoints'] if c['checkpoint'] not in listed]
      + results['checkpoints'],
      'records': [r for r in previous['records'] if records_lib.identity(r) not in redone]
      + results['records'],
    }
  merged = {**verdicts.read(output_dir), **new_verdicts}
  return results, verdicts.kept(merged, results['records'])


def write_report(
  results: dict[str, Any], verdicts_by_name: dict[str, Any], output_dir: str
) -> list[str]:
  """Writes results.json, verdicts.npz, results.md, accuracy_vs_eps.png (when an eps
  sweep was run) and noise_evolution_<label>.png (for every checkpoint whose run left
  metrics.jsonl with noise statistics) into `output_dir`; returns the paths written.
  Every file is written atomically: a full disk keeps the old one."""
  os.makedirs(output_dir, exist_ok=True)
  paths = [os.path.join(output_dir, 'results.json')]
  files.write_json(paths[0], results)  # First: the verdicts only add to its records.
  paths += [verdicts.write(output_dir, verdicts_by_name), os.path.join(output_dir, 'results.md')]
  files.write_text(paths[2], markdown(results))
  plot = os.path.join(output_dir, 'accuracy_vs_eps.png')
  if plots.plot_accuracy_vs_eps(eps_curves(results['records']), plot):
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
