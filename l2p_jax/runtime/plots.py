"""Figures a person would rather look at than numbers: the evolution of the noise
parameters over training (supplementary Figure 1), accuracy against the attack's
radius for several checkpoints (supplementary Figures 2-3), accuracy after each
iteration of an attack (did it converge), methods' accuracies per attack with their
intervals, and how far a run and its PyTorch counterpart part over
training steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')  # Files only; no display needed.
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from l2p_jax.runtime import files  # noqa: E402


def _save(fig: Any, path: str) -> None:
  """Writes `fig` to `path` atomically (a full disk keeps the previous file) and frees it."""
  try:
    files.save_figure(fig, path, dpi=120)
  finally:
    plt.close(fig)


def plot_noise_evolution(records: Sequence[dict[str, Any]], path: str, title: str = '') -> bool:
  """Plots, per epoch, the mean of every layer's noise parameters (thin lines, each in
  the legend) and their average over layers (thick line, its change since the first
  epoch in the legend) to `path`, on a y-axis from 0 so that a change looks as large as
  it is; False when there is no noise."""
  noisy = [r for r in records if r.get('noise')]
  if not noisy:
    return False
  epochs = [r['epoch'] for r in noisy]
  layers = sorted(noisy[-1]['noise'])
  fig, ax = plt.subplots(figsize=(8, 4))
  for layer in layers:
    means = [r['noise'][layer]['mean'] for r in noisy]
    ax.plot(epochs, means, lw=0.7, alpha=0.5, marker='.', label=layer)
  average = [sum(r['noise'][name]['mean'] for name in layers) / len(layers) for r in noisy]
  change = f'{average[0]:.4g} to {average[-1]:.4g}, {average[-1] / average[0] - 1:+.1%}'
  ax.plot(epochs, average, lw=2.5, color='black', marker='o', label=f'mean over layers ({change})')
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  top = max(r['noise'][name]['mean'] for r in noisy for name in layers)
  ax.set_ylim(0, 1.1 * top if top > 0 else 1)
  ax.set_xlabel('epoch')
  ax.set_ylabel('mean noise parameter (axis from 0)')
  ax.set_title(title or 'Noise parameters during training')
  ax.legend(fontsize=6, ncol=1 + len(layers) // 16, loc='upper left', bbox_to_anchor=(1.01, 1))
  fig.tight_layout()
  _save(fig, path)
  return True


def plot_accuracy_vs_eps(
  curves: Mapping[str, Mapping[str, Sequence[tuple[float, ...]]]], path: str, title: str = ''
) -> bool:
  """Plots one panel per attack (e.g. FGSM, PGD-7) of accuracy against eps on a log-2 axis
  (the sweep doubles eps), one line per checkpoint with its 95% interval as a band, from
  {attack: {checkpoint: [(eps, accuracy[, low, high]), ...]}} with eps in (0, 1] and
  accuracies in [0, 1] units, to `path`; False when there is nothing to plot."""
  if not curves:
    return False
  fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), sharey=True, squeeze=False)
  for ax, (attack, lines) in zip(axes[0], curves.items()):
    radii = set()
    for label, points in lines.items():
      points = sorted(points)
      eps = [255 * p[0] for p in points]
      radii.update(eps)
      (line,) = ax.plot(eps, [100 * p[1] for p in points], marker='o', label=label)
      if all(len(p) == 4 for p in points):
        low, high = ([100 * p[i] for p in points] for i in (2, 3))
        ax.fill_between(eps, low, high, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xscale('log', base=2)
    ax.set_xticks(sorted(radii), [f'{r:g}' for r in sorted(radii)])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel('eps (x 1/255, log scale)')
    ax.set_title(attack)
    ax.grid(alpha=0.3)
    ax.legend(title='shaded: 95% interval', fontsize='small', title_fontsize='small')
  axes[0][0].set_ylabel('accuracy (%)')
  axes[0][0].set_ylim(-3, 103)  # The whole range, so that panels and runs compare.
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)
  return True


def plot_convergence(curves: Mapping[str, Sequence[float]], path: str, title: str = '') -> bool:
  """Plots accuracy (%) against the attack's iteration, one line per {name: [accuracy
  at the start, after iteration 1, ...]} in [0, 1] units, to `path`, on an iteration
  axis linear up to 1 and logarithmic beyond, so that PGD's few steps and Square's
  thousands of queries both show; the last quarter of every line, which sanity.py's
  `converged` reads, is drawn thicker. False when there is nothing to plot."""
  if not curves:
    return False
  fig, ax = plt.subplots(figsize=(9, 4.5))
  for name, curve in curves.items():
    (line,) = ax.plot(range(len(curve)), [100 * a for a in curve], lw=1, label=name)
    last = (3 * (len(curve) - 1)) // 4
    ax.plot(range(last, len(curve)), [100 * a for a in curve[last:]], lw=3, color=line.get_color())
  ax.set_xscale('symlog', linthresh=1)
  last = max(len(curve) - 1 for curve in curves.values())
  ticks = {0, last} | {10**k for k in range(len(str(last)))} | {len(c) - 1 for c in curves.values()}
  ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set_xlim(0, last)
  ax.set_ylim(-3, 103)
  ax.set_xlabel('iteration (0: start; log scale beyond 1)')
  ax.set_ylabel('accuracy as the attack saw it (%)')
  ax.set_title(title or 'Accuracy after each iteration (thick: the last quarter)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))
  fig.tight_layout()
  _save(fig, path)
  return True


def plot_accuracy_intervals(
  cells: Mapping[str, Mapping[str, tuple[float, float, float, Sequence[float]]]],
  path: str,
  title: str = '',
) -> bool:
  """Plots, per column (an attack), one point per method at its mean accuracy with its
  95% interval as an error bar and every seed's accuracy as a small dot beside it, from
  {method: {column: (mean, low, high, seed values)}} in percent, to `path`; False when
  there is nothing to plot. Overlapping bars are what a table's digits hide."""
  columns = list(dict.fromkeys(c for by_column in cells.values() for c in by_column))
  if not columns:
    return False
  fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(columns) + 2), 4.5))
  width = 0.8 / max(1, len(cells))
  for i, (method, by_column) in enumerate(cells.items()):
    at = [j for j, c in enumerate(columns) if c in by_column]
    if not at:  # Nothing of this method's measured yet: no point, but its colour kept.
      ax.errorbar([], [], yerr=[[], []], fmt='o', capsize=3, label=method)
      continue
    x = [j - 0.4 + width * (i + 0.5) for j in at]
    mean, low, high, values = zip(*(by_column[columns[j]] for j in at))
    errors = [[m - lo for m, lo in zip(mean, low)], [hi - m for m, hi in zip(mean, high)]]
    line = ax.errorbar(x, mean, yerr=errors, fmt='o', capsize=3, label=method)
    for xi, seeds in zip(x, values):
      ax.plot([xi + width / 4] * len(seeds), seeds, '.', ms=3, color=line[0].get_color(), alpha=0.6)
  ax.set_xticks(range(len(columns)), columns, rotation=20, ha='right')
  ax.set_ylabel('accuracy (%)')
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize='small', ncol=min(5, len(cells)))
  if title:
    ax.set_title(title, fontsize='medium')
  fig.tight_layout()
  _save(fig, path)
  return True


def plot_divergence(report: dict[str, Any], path: str) -> None:
  """Plots a `trajectory.compare` report: the max abs difference of weights, noise
  parameters, BatchNorm statistics and loss, and the fraction of PGD gradient signs
  that differ, against the optimizer step, on a log scale (zeros drawn at 1e-12)."""
  records = report['steps']
  steps = [r['step'] for r in records]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  series = [
    ('params', 'weights'),
    ('perturb', 'noise parameters'),
    ('batch_stats', 'BatchNorm statistics'),
    ('loss', 'loss'),
  ]
  for key, label in series:
    if key in records[0]:
      ax.plot(
        steps,
        [max(r[key]['max_abs'], 1e-12) for r in records],
        marker='.',
        label=f'{label} (max abs)',
      )
  adversarial = [r for r in records if 'pgd' in r]
  if adversarial:
    ax.plot(
      [r['step'] for r in adversarial],
      [max(r['pgd']['sign_flip_fraction'], 1e-12) for r in adversarial],
      marker='x',
      ls='--',
      color='black',
      label='PGD signs differing (fraction)',
    )
  ax.set_yscale('log')
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel('optimizer step')
  ax.set_ylabel('JAX vs PyTorch')
  alternation = report['alternation']  # L2P's (None for the other methods).
  name = report['method'] + (f' ({alternation})' if alternation else '')
  ax.set_title(f'{name}, {report["arch"]} x{report["width"]}, BatchNorm {report["batch_norm"]}')
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)
