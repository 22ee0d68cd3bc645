"""The accuracies the paper and PNI publish for the tables of paper_tables.py, as data,
keyed by (arch, width, method[, target], column), that REPORT.md sets beside every
measured cell."""

from __future__ import annotations

from l2p_jax.methods import METHODS

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
