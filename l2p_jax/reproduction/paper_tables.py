"""The paper's tables and figures as data: for each, its data, its networks (the
paper's settings), the methods it compares and the eval.py attacks that measure it."""

from __future__ import annotations

import dataclasses

from l2p_jax.methods import METHODS

Setting = tuple[str, float]  # (arch, width) of the paper's network.

V1_20, V2_18 = ('resnet20', 1.0), ('resnet18', 1.0)
_MAIN_SETTINGS = (
  V1_20,
  ('resnet32', 1.0),
  ('resnet44', 1.0),
  ('resnet56', 1.0),
  ('resnet20', 1.5),
  ('resnet20', 2.0),
  ('resnet20', 4.0),
  V2_18,
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
      (V1_20, V2_18),
      METHODS,
      'few_pixel',
    ),
    Table(
      'transfer',
      'Transferability (supplementary Table 2)',
      'cifar10',
      (V1_20, V2_18),
      ('vanilla', 'pni', 'adv_bnn', 'l2p'),
      'transfer',
    ),
    Table(
      'figure1',
      'Noise parameters during training (supplementary Figure 1)',
      'cifar10',
      (V2_18,),
      ('pni', 'l2p'),
      '',
    ),
    Table(
      'figures23',
      'FGSM and PGD accuracy against eps (supplementary Figures 2-3)',
      'cifar100',
      (V2_18,),
      METHODS,
      'eps_sweep',
    ),
  )
}


def arch_name(arch: str, width: float) -> str:
  """A network's short name: resnet20, resnet20x1.5, resnet8x0.5."""
  return arch if width == 1 else f'{arch}x{width:g}'
