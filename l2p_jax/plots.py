"""Figures a person would rather look at than numbers: the evolution of the noise
parameters over training (supplementary Figure 1) and accuracy against the attack's
radius for several checkpoints (supplementary Figures 2-3)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use('Agg')  # Files only; no display needed.
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def plot_noise_evolution(records: Sequence[dict[str, Any]], path: str,
                         title: str = '') -> bool:
  """Plots, per epoch, the mean of every layer's noise parameters (thin lines) and
  their average over layers (thick line) to `path`; False when there is no noise."""
  epochs = [r['epoch'] for r in records if r.get('noise')]
  if not epochs:
    return False
  layers = sorted(records[-1]['noise'])
  fig, ax = plt.subplots(figsize=(6, 4))
  for layer in layers:
    ax.plot(epochs, [r['noise'][layer]['mean'] for r in records if r.get('noise')],
            lw=0.7, alpha=0.5, marker='.')
  average = [sum(r['noise'][l]['mean'] for l in layers) / len(layers)
             for r in records if r.get('noise')]
  ax.plot(epochs, average, lw=2.5, color='black', marker='o',
          label='mean over layers')
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel('epoch')
  ax.set_ylabel('mean noise parameter')
  ax.set_title(title or 'Noise parameters during training')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_accuracy_vs_eps(curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
                         path: str, title: str = '') -> bool:
  """Plots one panel per attack (e.g. FGSM, PGD-7) of accuracy against eps, one line per
  checkpoint, from {attack: {checkpoint: [(eps, accuracy), ...]}} with eps in [0, 1]
  and accuracy in [0, 1] units, to `path`; False when there is nothing to plot."""
  if not curves:
    return False
  fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), sharey=True,
                           squeeze=False)
  for ax, (attack, lines) in zip(axes[0], curves.items()):
    for label, points in lines.items():
      eps, accuracy = zip(*sorted(points))
      ax.plot([e * 255 for e in eps], [100 * a for a in accuracy], marker='o',
              label=label)
    ax.set_xlabel('eps (x 1/255)')
    ax.set_title(attack)
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0][0].set_ylabel('accuracy (%)')
  axes[0][0].set_ylim(-3, 103)  # The whole range, so that panels and runs compare.
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
