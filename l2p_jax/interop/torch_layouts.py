"""The key layouts of the authors' PyTorch CIFAR ResNets and the torch counterpart of
each of our Flax variables in them: key, axis order, shape and channel order.

Three key layouts ("families") are understood, each read from the published code:

- 'l2p' (ArmenJeddi/Learn2Perturb): ResNet-V1 named as fb.resnet.torch (`conv_1_3x3`,
  `bn_1`, `stage_1.0.conv_a`/`bn_a`/`conv_b`/`bn_b`, `classifier`) and ResNet-V2(18)
  named as kuangliu/pytorch-cifar (`conv1`, `bn1`, `layer1.0.conv1`/.../`shortcut.0`/
  `shortcut.1`, `linear`); noise maps `cn1_sigma_map` and `<block>.sigma_map`, (C, H, W).
- 'pni' (elliothe/CVPR_2019_PNI): the same ResNet-V1 names with `alpha_w` next to every
  conv and linear weight: (1,) layer-wise, (out, 1, 1, 1) or (out, 1) channel-wise, the
  weight's shape element-wise. PNI publishes no ResNet-18; ours uses the kuangliu names.
- 'torchvision' (akamaster/pytorch_resnet_cifar10 for ResNet-V1, kuangliu for
  ResNet-18): kuangliu names everywhere. akamaster's option-A shortcut pads planes//4
  zero channels on *both* sides where ours (and the authors') appends them, so stage
  channels are permuted on the way in and out to keep the function identical.

The mapping is derived from the names in our variable tree, so every depth, width and
ResNet-18 work. Reading and writing checkpoints is torch_checkpoints.py's job.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

LAYOUTS = ('l2p', 'pni', 'torchvision')

# Module names in kuangliu/pytorch-cifar (and L2P's ResNet-V2, akamaster's ResNet-V1).
_KUANGLIU = {
  'stem_conv': 'conv1',
  'stem_bn': 'bn1',
  'stem_noise': 'cn1_sigma_map',
  'stage': 'layer{stage}.{index}',
  'conv1': 'conv1',
  'bn1': 'bn1',
  'conv2': 'conv2',
  'bn2': 'bn2',
  'shortcut_conv': 'shortcut.0',
  'shortcut_bn': 'shortcut.1',
  'noise': 'sigma_map',
  'classifier': 'linear',
}
# Module names of L2P's and PNI's ResNet-V1 (fb.resnet.torch style).
_FB = {
  **_KUANGLIU,
  'stem_conv': 'conv_1_3x3',
  'stem_bn': 'bn_1',
  'stage': 'stage_{stage}.{index}',
  'conv1': 'conv_a',
  'bn1': 'bn_a',
  'conv2': 'conv_b',
  'bn2': 'bn_b',
  'classifier': 'classifier',
}
# (collection, our leaf) -> torch attribute; '' means the module's own name (L2P's maps
# are bare Parameters, `cn1_sigma_map` on the root and `sigma_map` on each block).
_LEAVES = {
  ('params', 'kernel'): 'weight',
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
  ('perturb', 'kernel_alpha'): 'alpha_w',
  ('perturb', 'theta'): '',
}
_BLOCK = re.compile(r'stage(\d+)_block(\d+)')

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One of our variables and its torch tensor: key, axis order, shape, channel order,
  and the conversions of an array between the two."""

  ours: Path  # (collection, *module path, leaf)
  shape: tuple[int, ...]  # our shape
  key: str  # torch key inside the bare network
  axes: tuple[int, ...]  # transpose taking our array to torch's axis order
  torch_shape: tuple[int, ...]
  perms: tuple[tuple[int, np.ndarray], ...] = ()  # (our axis, our channel -> theirs)

  def to_torch(self, value: np.ndarray) -> np.ndarray:
    for axis, perm in self.perms:
      value = np.take(value, np.argsort(perm), axis=axis)
    return np.transpose(value, self.axes).reshape(self.torch_shape)

  def to_ours(self, value: np.ndarray) -> np.ndarray:
    value = value.reshape(tuple(self.shape[a] for a in self.axes))
    value = np.transpose(value, np.argsort(self.axes))
    for axis, perm in self.perms:
      value = np.take(value, perm, axis=axis)
    return value


def _module_key(module: Path, names: Mapping[str, str]) -> str:
  """Torch name of one of our module paths: stage2_block1/conv1 -> layer2.0.conv1."""
  head, *rest = module
  match = _BLOCK.fullmatch(head)
  if not match:
    return names[head]
  stage, block = map(int, match.groups())
  return '.'.join(
    [names['stage'].format(stage=stage, index=block - 1), *(names[name] for name in rest)]
  )


def _streams(module: Path, last_stage: int) -> tuple[int | None, int | None]:
  """(stage whose residual stream the module reads, stage whose stream it writes)."""
  match = _BLOCK.fullmatch(module[0])
  if not match:
    return (last_stage, None) if module[0] == 'classifier' else (None, 1)
  stage, block = map(int, match.groups())
  entering = stage - 1 if block == 1 and stage > 1 else stage
  return {
    'conv1': (entering, None),
    'conv2': (None, stage),
    'bn2': (None, stage),
    'noise': (None, stage),
    'shortcut_conv': (entering, stage),
    'shortcut_bn': (None, stage),
  }.get(module[1], (None, None))


def _stages(shapes: Mapping[Path, tuple[int, ...]]) -> dict[int, int]:
  """Stage number -> channels, read from each stage's first conv2 kernel."""
  return {
    int(m.group(1)): shapes[('params', m.group(0), 'conv2', 'kernel')][-1]
    for path in shapes
    if (m := _BLOCK.fullmatch(path[1])) and m.group(2) == '1'
  }


def _symmetric_padding_perms(stages: Mapping[int, int]) -> dict[int, np.ndarray]:
  """Our channel -> akamaster's channel, per stage, for option-A shortcuts that pad
  planes//4 zero channels on both sides (ours append them at the end)."""
  perms, perm = {}, np.arange(stages[min(stages)])
  for stage in sorted(stages)[1:]:
    before, after = stages[stage - 1], stages[stage]
    pad = after // 4
    if before + 2 * pad != after:
      raise ValueError(
        f"layout 'torchvision' (akamaster's option A pads {pad} zero channels on each "
        f'side) cannot express stage {stage} going from {before} to {after} channels.'
      )
    rest = np.setdiff1d(np.arange(after), pad + np.arange(before))
    perm = perms[stage] = np.concatenate([pad + perm, rest])
  return perms


def torch_entries(shapes: Mapping[Path, tuple[int, ...]], layout: str) -> dict[Path, Entry]:
  """The torch counterpart in `layout` of each of our variables, {(collection, ...,
  leaf): shape} -> its Entry, in our flattening order."""
  if layout not in LAYOUTS:
    raise ValueError(f'Unknown layout {layout!r}; expected one of {LAYOUTS}.')
  option_a = not any('shortcut_conv' in path for path in shapes)
  names = _FB if layout in ('l2p', 'pni') and option_a else _KUANGLIU
  stages = _stages(shapes)
  perms = _symmetric_padding_perms(stages) if layout == 'torchvision' and option_a else {}
  unsupported = [path for path in shapes if (path[0], path[-1]) not in _LEAVES]
  if unsupported:
    raise ValueError(
      'No PyTorch layout holds these variables (Bayesian adv_bnn weights have no '
      'counterpart in the l2p/pni/torchvision code): '
      + ', '.join('/'.join(path) for path in unsupported)
    )
  entries = {}
  for path, shape in shapes.items():
    collection, *module, leaf = path
    suffix = _LEAVES[(collection, leaf)]
    key = _module_key(tuple(module), names) + (f'.{suffix}' if suffix else '')
    kernel = shapes.get(('params', *module, 'kernel'), ())
    kernel_shaped = leaf == 'kernel' or (leaf == 'kernel_alpha' and shape == kernel)
    axes = tuple(range(len(shape)))
    if kernel_shaped:  # HWIO -> OIHW, (in, out) -> (out, in)
      axes = (3, 2, 0, 1) if len(shape) == 4 else (1, 0)
    elif len(shape) == 3:  # L2P map: HWC -> CHW
      axes = (2, 0, 1)
    torch_shape = tuple(shape[a] for a in axes)
    if leaf == 'kernel_alpha' and not kernel_shaped:  # () -> (1,); (out,) -> (out, 1, ...)
      torch_shape = (shape[0], *(1,) * (len(kernel) - 1)) if shape else (1,)
    reads, writes = _streams(tuple(module), max(stages))
    channel_axes = (
      (len(shape) - 2 if kernel_shaped else None, reads),
      (len(shape) - 1 if shape else None, writes),
    )
    entries[path] = Entry(
      path,
      tuple(shape),
      key,
      axes,
      torch_shape,
      tuple(
        (axis, perms[stage]) for axis, stage in channel_axes if axis is not None and stage in perms
      ),
    )
  return entries


def detect_layout(state: Mapping[str, Any], option_a: bool) -> str:
  """The family whose names a state_dict's keys use (`option_a`: the network's shortcuts
  pad instead of projecting); fb-style V1 names mean the authors' code."""
  alphas = any(key.endswith('.alpha_w') for key in state)
  if 'conv_1_3x3.weight' in state:
    return 'pni' if alphas else 'l2p'
  if option_a:  # a V1 with kuangliu names is akamaster's
    return 'torchvision'
  return 'pni' if alphas else 'l2p' if 'cn1_sigma_map' in state else 'torchvision'
