"""The 95% interval of an accuracy judged over images and noise draws.

A randomized model's accuracy is a mean over two random things: the test images (a
sample of the population of images) and the noise draws it was judged under. With
m_i the fraction of the K draws under which image i is classified right and a_k the
accuracy under draw k (over all n images), the accuracy p = mean_i m_i has the
variance estimate

  V = var_i(m_i) / n + var_k(a_k) / K        (population variances).

The first term is the images' share (for K draws it already holds the draws' noise
around each image's own rate); the second is the draws' share, which matters where a
draw is shared by many images (PNI's weight noise is one draw per batch) and roughly
doubles the within-image part where it is not (L2P), so V errs on the wide side. The
interval is Wilson's score interval for a proportion at the effective number of
verdicts n_eff = p (1 - p) / V (Kish's design effect; Korn and Graubard 1998), which
for one draw is exactly Wilson's interval over n images, never collapses to a point
at 0% or 100%, is never narrower than that of n K independent verdicts, and is wider
than that of n images where draws shared by many images move the accuracy.

Over training seeds, a grid's cells are means of one accuracy per seed: seed_interval
and difference_interval give Student's and Welch's intervals of those means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

Z95 = 1.959963984540054  # Standard normal quantile of 0.975.


def wilson_interval(p: float, n: float, z: float = Z95) -> tuple[float, float]:
  """Wilson's score interval of a proportion p observed over n (possibly effective,
  non-integer) Bernoulli trials."""
  if n <= 0:
    raise ValueError(f'The interval needs at least one trial, got n={n}.')
  scale = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / scale
  half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside, exactly.


def effective_trials(
  image_rates: np.ndarray, draws: int, draw_accuracies: np.ndarray | None = None
) -> float:
  """n_eff = p (1 - p) / V of the module docstring, kept between 1 and n * draws; the
  draws' term is left out when the per-draw accuracies are not known (as for a worst
  case over attacks judged under different draws)."""
  rates = np.asarray(image_rates, np.float64)
  n, p = rates.size, float(rates.mean())
  variance = rates.var() / n
  if draw_accuracies is not None and len(draw_accuracies) > 1:
    variance += float(np.var(np.asarray(draw_accuracies, np.float64))) / len(draw_accuracies)
  if p in (0.0, 1.0):
    return float(n)  # Every verdict agrees: the images are the only sample.
  if variance == 0:
    return float(n * draws)  # Every image right in the same share of draws.
  return min(max(p * (1 - p) / variance, 1.0), n * draws)


def accuracy_interval(
  image_rates: np.ndarray, draws: int, draw_accuracies: np.ndarray | None = None
) -> tuple[float, float]:
  """The 95% interval [low, high] of the mean of `image_rates` (each image's fraction of
  `draws` draws classified right), per the module docstring."""
  rates = np.asarray(image_rates, np.float64)
  if rates.size == 0:
    raise ValueError('The interval needs at least one image.')
  return wilson_interval(float(rates.mean()), effective_trials(rates, draws, draw_accuracies))


def seed_interval(values: Sequence[float]) -> tuple[float, float]:
  """The 95% interval of the mean of `values`, one accuracy per training seed, by
  Student's t with len(values) - 1 degrees of freedom. The seeds' spread holds the
  training's and the evaluation's randomness but not the sampling of the test images,
  which every method judged on the same images shares (see accuracy_interval for that)."""
  x = np.asarray(values, np.float64)
  if x.size < 2:
    raise ValueError(f'An interval over seeds needs at least 2 values, got {x.size}.')
  if np.all(x == x[0]):  # No spread: scipy would warn and agree.
    return float(x[0]), float(x[0])
  low, high = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
  return float(low), float(high)


def difference_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
  """(mean(a) - mean(b), low, high): Welch's 95% interval of the difference of two means
  over independent seeds (unequal variances, Welch-Satterthwaite degrees of freedom); a
  difference whose interval excludes 0 is one the seeds support."""
  x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if x.size < 2 or y.size < 2:
    raise ValueError(f'A difference over seeds needs 2 values a side, got {x.size} and {y.size}.')
  diff = float(x.mean() - y.mean())
  if np.all(x == x[0]) and np.all(y == y[0]):
    return diff, diff, diff
  low, high = stats.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
  return diff, float(low), float(high)
