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
"""

from __future__ import annotations

import math

import numpy as np

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
