"""REPORT.md from the reproduction report's content (paper_report.assemble): the tables
in the paper's layouts, measured cells with their intervals beside the published
numbers, the differences between methods, the noise statistics, the sanity checks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from l2p_jax import methods
from l2p_jax.reproduction.paper_grid import Plan
from l2p_jax.reproduction.paper_tables import arch_name
from l2p_jax.reproduction.scales import Scale
from l2p_jax.runtime.markdown import markdown_table


def paper_arch(setting: tuple[str, float]) -> str:
  """The paper's name of a network: ResNet-V1(20), ResNet-V1(20) x1.5, ResNet-V2(18)."""
  arch, width = setting
  depth = arch.removeprefix('resnet')
  name = 'ResNet-V2(18)' if arch == 'resnet18' else f'ResNet-V1({depth})'
  return name if width == 1 else f'{name} x{width:g}'


def _value(summary: dict[str, Any] | None, digits: int = 2) -> str:
  """A measured cell: the mean and its 95% interval, `52.34 [43.70, 60.80]`."""
  if summary is None:
    return 'not run'
  text = f'{summary["mean"]:.{digits}f}'
  if summary['ci95'] is None:
    return text
  low, high = summary['ci95']
  return f'{text} [{low:.{digits}f}, {high:.{digits}f}]'


def _published(value) -> str:
  if value is None:
    return 'not published'
  if isinstance(value, tuple):
    return f'paper {value[0]:.2f} +- {value[1]:.2f}'
  return f'paper {value:g}'


def _cell(cell: dict[str, Any]) -> str:
  text = _value(cell['measured'])
  if cell.get('mean_l2') is not None:
    text += f' / L2 {cell["mean_l2"]:.3f}'
  return f'{text} ({_published(cell["published"])})'


def setting_name(plan: Plan, setting: Sequence) -> str:
  paper = paper_arch(tuple(setting))
  if plan.scale.model is None:
    return paper
  return f'{arch_name(*plan.scale.model)} (for {paper})'


def _noise_markdown(runs: dict[str, Any]) -> str:
  rows = []
  for name, run in runs.items():
    if not run['epochs']:
      rows.append([name, 'no noise parameters', '-', '-'])
      continue
    first, last = run['epochs'][0], run['epochs'][-1]
    peak = max(run['epochs'], key=lambda e: e[1])
    rows.append([name] + [f'{mean:.4f} (epoch {epoch + 1})' for epoch, mean in (first, peak, last)])
  return markdown_table(['run', 'first epoch', 'largest', 'last epoch'], rows)


def markdown(content: dict[str, Any], plan: Plan, figures: dict[str, list[str]]) -> str:
  """REPORT.md from `assemble`'s content and the figure files (relative paths)."""
  lines = _introduction(content, plan.scale)
  for name, section in content['sections'].items():
    lines += _section_heading(section)
    lines += _section_body(name, section, plan)
    lines += [f'\n![{os.path.basename(f)}]({f})' for f in figures.get(name, [])]
  lines += _sanity_markdown(content['sanity'])
  return '\n'.join(lines) + '\n'


def _differences_markdown(section: dict[str, Any], plan: Plan) -> list[str]:
  """The pairs of methods' differences as a table, those whose interval excludes 0 in
  bold; nothing where no column has two seeds a side."""
  rows = []
  for pair in section.get('differences', []):
    if not any(pair['cells'].values()):
      continue
    a, b = (methods.get(m).title for m in pair['methods'])
    texts = []
    for title in section['columns']:
      cell = pair['cells'][title]
      if cell is None:
        texts.append('-')
        continue
      diff, low, high = cell
      text = f'{diff:+.2f} [{low:+.2f}, {high:+.2f}]'
      texts.append(f'**{text}**' if low > 0 or high < 0 else text)
    rows.append([setting_name(plan, pair['setting']), f'{a} - {b}'] + texts)
  if not rows:
    return []
  return [
    '',
    'Differences between methods (accuracy points, the difference of the seed means with '
    "Welch's 95% interval; **bold**: the interval excludes 0, a difference the seeds support):",
    '',
    markdown_table(['network', 'methods'] + column_headers(section), rows),
  ]


def column_headers(section: dict[str, Any]) -> list[str]:
  """A table's column titles, each naming the randomized models' version of its attack
  where that has another title (`randomized_columns`)."""
  randomized = section.get('randomized_columns', {})
  return [
    f'{title} (randomized: {randomized[title]})' if title in randomized else title
    for title in section['columns']
  ]


RESULTS = (True, False, None)  # A sanity check's `passed`: passed, failed, not applicable.


def _sanity_markdown(entries: Sequence[dict[str, Any]]) -> list[str]:
  """Every evaluation's sanity checks: how many of each passed, failed or did not apply
  (passed None), and each failure."""
  if not entries:
    return []
  failed = [e for e in entries if e['passed'] is False]
  names = list(dict.fromkeys(e['name'] for e in entries))
  counts = [
    [n] + [str(sum(e['passed'] is result for e in entries if e['name'] == n)) for result in RESULTS]
    for n in names
  ]
  inapplicable = sum(e['passed'] is None for e in entries)
  lines = [
    '',
    f'## Sanity checks ({len(failed)} of {len(entries)} failed'
    + (f', {inapplicable} not applicable)' if inapplicable else ')'),
    '',
    markdown_table(['check', 'passed', 'failed', 'not applicable'], counts),
  ]
  if failed:
    lines += ['', 'Failed:', '']
    lines += [f'- {e["label"]} {e["name"]} ({e["results"]}): {e["detail"]}' for e in failed]
  return lines


def _introduction(content: dict[str, Any], scale: Scale) -> list[str]:
  """The report's title and opening lines: jobs done, seeds, and (at a reduced scale) the
  network and data that stand in for the paper's."""
  lines = [
    f'# Reproduction report ({content["scale"]} scale)',
    '',
    f'{content["jobs_done"]} of {content["jobs"]} jobs finished; '
    f'{content["seeds"]} seed(s) per run; cells are accuracy (%) '
    + (
      "with the 95% interval of the mean over seeds (Student's t; it holds the "
      "training's and the evaluation's randomness, not the test images' sampling, "
      "which every method judged on the same images shares: see each run's "
      'results.md for the interval over its images and judged draws).'
      if content['seeds'] > 1
      else 'with its 95% interval over the test images and judged draws.'
    ),
  ]
  if scale.model is not None:
    lines += [
      '',
      (
        f'At this scale every network is {arch_name(*scale.model)} and the data '
        f'{scale.dataset}; the published numbers beside the cells are the '
        "paper's (CIFAR, the network in parentheses), for orientation only."
      ),
    ]
  return lines


def _section_heading(section: dict[str, Any]) -> list[str]:
  """A section's title and the line naming its data, networks and test examples."""
  examples = ', '.join(map(str, section.get('examples', [])))
  return [
    '',
    f'## {section["title"]}',
    '',
    f'Data: {", ".join(section["datasets"])}; networks: '
    f'{", ".join(section["models"])}'
    + (f'; test examples per cell: {examples}' if examples else '')
    + '.',
    '',
  ]


def _section_body(name: str, section: dict[str, Any], plan: Plan) -> list[str]:
  """A section's table (or note), by its kind: accuracy per attack, transfer matrix,
  noise statistics, or accuracy against the radius."""
  if name in ('main', 'few_pixel'):
    header = ['network', 'method'] + column_headers(section)
    rows = [
      [setting_name(plan, r['setting']), methods.get(r['method']).title]
      + [_cell(r['cells'][c]) for c in section['columns']]
      for r in section['rows']
    ]
    if not section['columns']:
      return ['Nothing measured yet.']
    return [markdown_table(header, rows)] + _differences_markdown(section, plan)
  if name == 'transfer':
    return [_transfer_markdown(section, plan)]
  if name == 'figure1':
    return [_noise_markdown(section['runs']) if section['runs'] else 'Nothing measured yet.']
  return [
    _curves_markdown(section),
    '\nNot published as numbers (the paper shows Figures 2-3 only).',
  ]


def _transfer_markdown(section: dict[str, Any], plan: Plan) -> str:
  """Supplementary Table 2 as Markdown: per network and source, every target's FGSM and
  PGD accuracy."""
  keys = [f'{t} {k}' for t in section['targets'] for k in ('FGSM', 'PGD')]
  header = ['network', 'source \\ target'] + [
    f'{methods.get(t).title} {k}' for t in section['targets'] for k in ('FGSM', 'PGD')
  ]
  rows = [
    [setting_name(plan, r['setting']), methods.get(r['source']).title]
    + [_cell(r['cells'][k]) for k in keys]
    for r in section['rows']
  ]
  return markdown_table(header, rows)


def _curves_markdown(section: dict[str, Any]) -> str:
  """Figures 2-3's curves as a Markdown table: per method and attack, the accuracy at
  every radius measured ('not run' where that curve lacks it)."""
  curves = section['curves']
  radii = sorted({p[0] for lines_ in curves.values() for pts in lines_.values() for p in pts})
  rows = []
  for attack, by_method in curves.items():
    for method, points in by_method.items():
      at = {p[0]: p for p in points}
      rows.append(
        [methods.get(method).title, attack]
        + [_value({'mean': at[e][1], 'ci95': at[e][3]}) if e in at else 'not run' for e in radii]
      )
  return (
    markdown_table(['method', 'attack'] + [f'{e:g}/255' for e in radii], rows)
    if rows
    else 'Nothing measured yet.'
  )
