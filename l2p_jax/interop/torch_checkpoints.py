"""PyTorch checkpoints of the authors' CIFAR ResNets <-> our Flax variables.

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

The authors wrap the network as `nn.Sequential(Normalize_layer(mean, std), net)`, so their
keys read `0.mean`, `0.std`, `1.<net key>`; DataParallel adds `module.`. The mapping is
derived from the names in our variable tree, so every depth, width and ResNet-18 work.
torch is imported inside the functions only: it is an optional extra.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from l2p_jax.errors import UserError
from l2p_jax.models import create_model, resnet_layout

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
_WRAPPERS = ('module.', '_orig_mod.')  # DataParallel/DDP, torch.compile
_TORCH_HINT = "PyTorch checkpoint interop needs torch: pip install 'l2p-jax[torch]'"

Path = tuple[str, ...]


def _torch() -> Any:
  """The torch module, or an ImportError that says how to install it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(_TORCH_HINT) from error
  return torch


class TorchStateDictMismatchError(UserError, ValueError):
  """A PyTorch state_dict that does not fit the requested model; lists every problem.

  Attributes: `unexpected` (checkpoint keys the model lacks), `missing` (model keys the
  checkpoint lacks), `shape_mismatches` ((key, expected torch shape, checkpoint shape))
  and `other` (anything else, e.g. a different input normalization).
  """

  def __init__(
    self,
    model: str,
    unexpected: Sequence[tuple[str, tuple[int, ...]]],
    missing: Sequence[tuple[str, tuple[int, ...], str]],
    shape_mismatches: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
    other: Sequence[str],
  ):
    self.unexpected = [key for key, _ in unexpected]
    self.missing = [key for key, _, _ in missing]
    self.shape_mismatches = list(shape_mismatches)
    self.other = list(other)
    lines = [
      f'PyTorch checkpoint does not fit {model}: {len(unexpected)} unexpected '
      f'key(s), {len(missing)} missing key(s), {len(shape_mismatches)} shape '
      f'mismatch(es), {len(other)} other problem(s).'
    ]
    if unexpected:
      lines.append('Unexpected keys (in the checkpoint, not in the model):')
      lines += [f'  {key} {shape}' for key, shape in unexpected]
    if missing:
      lines.append('Missing keys (in the model, not in the checkpoint):')
      lines += [f'  {key} {shape} <- ours {ours}' for key, shape, ours in missing]
    if shape_mismatches:
      lines.append('Shape mismatches (key: expected torch shape, checkpoint shape):')
      lines += [f'  {key}: expected {want}, got {got}' for key, want, got in shape_mismatches]
    lines += [f'Other: {problem}' for problem in other]
    super().__init__('\n'.join(lines))


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One of our variables and its torch tensor: key, axis order, shape, channel order."""

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


def _entries(shapes: Mapping[Path, tuple[int, ...]], layout: str) -> list[_Entry]:
  """The torch counterpart of each of our variables, in our flattening order."""
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
  entries = []
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
    entries.append(
      _Entry(
        path,
        tuple(shape),
        key,
        axes,
        torch_shape,
        tuple(
          (axis, perms[stage])
          for axis, stage in channel_axes
          if axis is not None and stage in perms
        ),
      )
    )
  return entries


def torch_entries(shapes: Mapping[Path, tuple[int, ...]], layout: str) -> dict[Path, Any]:
  """The torch counterpart of each of our variables, {(collection, ..., leaf): shape}
  -> an entry with the torch `key` and `to_torch`/`to_ours` array conversions."""
  return {entry.ours: entry for entry in _entries(shapes, layout)}


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (float types as float32) or array-like as a numpy array."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _load_state_dict(source: Any) -> dict[str, Any]:
  """The flat state_dict inside a path, nn.Module, checkpoint dict or state_dict,
  with DataParallel/compile prefixes removed."""
  torch = _torch()
  obj = source
  if isinstance(source, (str, os.PathLike)):
    try:
      obj = torch.load(source, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
      reason = (str(error).splitlines() or [type(error).__name__])[0]
      raise ValueError(
        f'{os.fspath(source)!r} is not a PyTorch state dict checkpoint that loads '
        f'without running code ({reason}). A file that pickles Python objects besides '
        "tensors (PNI's 'recorder', Learn2Perturb's torch.save(model)) must be "
        'turned into a state dict by the code that wrote it: '
        'torch.save(model.state_dict(), path).'
      ) from None
  while True:
    if isinstance(obj, torch.nn.Module):
      obj = obj.state_dict()
    elif callable(obj) and getattr(obj, '__name__', '') == 'state_dict':
      obj = obj()  # PNI's --model_only saves the bound method net.state_dict
    elif isinstance(obj, Mapping) and not all(
      isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()
    ):
      inner = [name for name in ('state_dict', 'model', 'net') if name in obj]
      if not inner:
        raise ValueError(
          f'Found no state_dict in the checkpoint; its top-level keys are {list(obj)}.'
        )
      obj = obj[inner[0]]
    else:
      break
  if not isinstance(obj, Mapping):
    raise ValueError(
      f'The checkpoint holds a {type(obj).__name__}, not a state dict (a mapping from '
      'parameter names to tensors); save one with torch.save(model.state_dict(), path).'
    )
  state = dict(obj)
  while state and (
    prefix := next((p for p in _WRAPPERS if all(key.startswith(p) for key in state)), None)
  ):
    state = {key[len(prefix) :]: value for key, value in state.items()}
  return state


def _split_normalizer(
  state: Mapping[str, Any],
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
  """Separates the authors' `Sequential(Normalize_layer, net)`: (net keys, (mean, std))."""
  if '0.mean' not in state or '0.std' not in state:
    return dict(state), None
  net = {
    key[2:] if key.startswith('1.') else key: value
    for key, value in state.items()
    if key not in ('0.mean', '0.std')
  }
  return net, (_to_numpy(state['0.mean']).ravel(), _to_numpy(state['0.std']).ravel())


def read_torch_normalization(source: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """The (mean, std) of the checkpoint's input Normalize layer, or None if it has none;
  pass them to `create_model` so an imported model sees the inputs it was trained on."""
  _, normalizer = _split_normalizer(_load_state_dict(source))
  if normalizer is None:
    return None
  return tuple(map(float, normalizer[0])), tuple(map(float, normalizer[1]))


def _infer_pni_mode(state: Mapping[str, Any]) -> str:
  """PNI alpha shape of the first layer that has one: (1,) layer, weight shape element,
  else channel; 'layer' when the checkpoint has no alphas."""
  for key, alpha in state.items():
    if key.endswith('.alpha_w') and key[: -len('alpha_w')] + 'weight' in state:
      weight = state[key[: -len('alpha_w')] + 'weight']
      if tuple(alpha.shape) == tuple(weight.shape):
        return 'element'
      return 'layer' if tuple(alpha.shape) == (1,) else 'channel'
  return 'layer'


def _detect_layout(state: Mapping[str, Any], option_a: bool) -> str:
  """The family whose names the keys use: fb-style V1 names mean the authors' code."""
  alphas = any(key.endswith('.alpha_w') for key in state)
  if 'conv_1_3x3.weight' in state:
    return 'pni' if alphas else 'l2p'
  if option_a:  # a V1 with kuangliu names is akamaster's
    return 'torchvision'
  return 'pni' if alphas else 'l2p' if 'cn1_sigma_map' in state else 'torchvision'


def _variable_shapes(
  arch: str,
  num_classes: int,
  method: str,
  *,
  width: float,
  pni_mode: str,
  channels: int,
  image_size: tuple[int, int],
) -> dict[Path, tuple[int, ...]]:
  """Shapes of the variables `create_model` builds, flattened to (collection, ..., leaf)."""
  model = create_model(
    arch,
    num_classes,
    method,
    width=width,
    pni_mode=pni_mode,
    mean=(0.0,) * channels,
    std=(1.0,) * channels,
  )
  shapes = jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0), 'noise': jax.random.key(0)},
      jnp.zeros((1, *image_size, channels)),
    )
  )
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _model_entries(
  state: Mapping[str, np.ndarray],
  normalizer: tuple[np.ndarray, np.ndarray] | None,
  arch: str,
  num_classes: int,
  method: str,
  *,
  width: float,
  layout: str,
  pni_mode: str | None,
  mean: Sequence[float] | None,
) -> tuple[list[_Entry], str]:
  """The entries the requested model expects, and the layout they follow: channels from
  mean (else the checkpoint's normalizer, else 3), the L2P input size from
  `cn1_sigma_map`, the PNI mode and (for 'auto') the layout told from the state."""
  channels = (
    len(mean) if mean is not None else (len(normalizer[0]) if normalizer is not None else 3)
  )
  stem_map = state.get('cn1_sigma_map', np.zeros((0, 32, 32)))  # L2P: (C, H, W)
  image_size = tuple(stem_map.shape[-2:]) if stem_map.ndim == 3 else (32, 32)
  pni_mode = pni_mode or _infer_pni_mode(state)
  shapes = _variable_shapes(
    arch,
    num_classes,
    method,
    width=width,
    pni_mode=pni_mode,
    channels=channels,
    image_size=image_size,
  )
  if layout == 'auto':
    layout = _detect_layout(state, resnet_layout(arch, width)['shortcut'] == 'A')
  return _entries(shapes, layout), layout


def _key_problems(
  state: Mapping[str, np.ndarray], entries: Sequence[_Entry]
) -> tuple[list[tuple], list[tuple], list[tuple]]:
  """(unexpected, missing, mismatched) keys of `state` against the model's `entries`,
  in TorchStateDictMismatchError's form; BatchNorm's step counters are never unexpected."""
  expected = {entry.key: entry for entry in entries}
  bn_counters = {
    key[: -len('running_mean')] + 'num_batches_tracked'
    for key in expected
    if key.endswith('.running_mean')
  }
  unexpected = [
    (key, tuple(value.shape))
    for key, value in state.items()
    if key not in expected and key not in bn_counters
  ]
  missing = [
    (entry.key, entry.torch_shape, '/'.join(entry.ours))
    for entry in entries
    if entry.key not in state
  ]
  mismatched = [
    (entry.key, entry.torch_shape, tuple(state[entry.key].shape))
    for entry in entries
    if entry.key in state and tuple(state[entry.key].shape) != entry.torch_shape
  ]
  return unexpected, missing, mismatched


def _normalization_problems(
  normalizer: tuple[np.ndarray, np.ndarray] | None,
  mean: Sequence[float] | None,
  std: Sequence[float] | None,
) -> list[str]:
  """One message if the checkpoint's Normalize layer and the caller's mean/std (both
  given) disagree, else none."""
  if (
    normalizer is not None
    and mean is not None
    and std is not None
    and not (
      normalizer[0].shape == np.shape(mean)
      and normalizer[1].shape == np.shape(std)
      and np.allclose(normalizer[0], mean, atol=1e-6)
      and np.allclose(normalizer[1], std, atol=1e-6)
    )
  ):
    return [
      f'the checkpoint normalizes inputs with mean {normalizer[0].tolist()} '
      f'and std {normalizer[1].tolist()}, the model with mean {list(mean)} '
      f'and std {list(std)}.'
    ]
  return []


def import_torch_checkpoint(
  source: Any,
  *,
  arch: str,
  num_classes: int,
  method: str,
  width: float = 1.0,
  layout: str = 'auto',
  pni_mode: str | None = None,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
) -> dict[str, Any]:
  """Our variables {'params', 'perturb'?, 'batch_stats'} from a PyTorch checkpoint of
  the L2P, PNI or torchvision-style CIFAR ResNets, for `create_model(arch, ...)`.

  `source`: a file path (read with weights_only=True), an nn.Module, a checkpoint dict
  ({'state_dict': ...}, {'net': ...}, {'model': ...}) or a state_dict, with or without
  `module.` prefixes and the authors' Normalize layer. `layout`: a family in LAYOUTS,
  or 'auto' to tell it from the key names. `pni_mode`: None reads it from the alphas'
  shape. `mean`/`std`: the normalization the caller's model will use; when given and
  the checkpoint carries a Normalize layer, they must agree. The input size of L2P
  maps is read from `cn1_sigma_map`. Everything that does not fit is reported in one
  TorchStateDictMismatchError.
  """
  state, normalizer = _split_normalizer(_load_state_dict(source))
  state = {key: _to_numpy(value) for key, value in state.items()}
  entries, layout = _model_entries(
    state,
    normalizer,
    arch,
    num_classes,
    method,
    width=width,
    layout=layout,
    pni_mode=pni_mode,
    mean=mean,
  )
  unexpected, missing, mismatched = _key_problems(state, entries)
  other = _normalization_problems(normalizer, mean, std)
  if unexpected or missing or mismatched or other:
    raise TorchStateDictMismatchError(
      f'{arch} (width {width}, {num_classes} classes, method {method!r}, layout {layout!r})',
      unexpected,
      missing,
      mismatched,
      other,
    )
  return traverse_util.unflatten_dict(
    {entry.ours: jnp.asarray(entry.to_ours(state[entry.key]), jnp.float32) for entry in entries}
  )


def export_torch_state_dict(
  variables: Mapping[str, Any],
  *,
  layout: str,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
) -> dict[str, Any]:
  """A PyTorch state_dict of our variables in a family's key layout, so that the
  authors' (or any PyTorch) code can load and attack a model trained here.

  With `mean`/`std` the dict is that of the authors' `Sequential(Normalize_layer, net)`
  (`0.mean`, `0.std`, `1.<key>`); without, the bare network. BatchNorm counters
  `num_batches_tracked` are written as 0 (we do not count steps).
  """
  torch = _torch()
  flat = {
    path: np.asarray(value) for path, value in traverse_util.flatten_dict(dict(variables)).items()
  }
  state = {}
  for entry in _entries({path: value.shape for path, value in flat.items()}, layout):
    value = np.array(entry.to_torch(flat[entry.ours]))  # a writable copy
    state[entry.key] = torch.from_numpy(value)
    if entry.key.endswith('.running_var'):
      state[entry.key[: -len('running_var')] + 'num_batches_tracked'] = torch.tensor(0)
  if mean is None and std is None:
    return state
  if mean is None or std is None or len(mean) != len(std):
    raise ValueError('Give both mean and std, one value per input channel each.')
  return {
    '0.mean': torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1),
    '0.std': torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1),
    **{f'1.{key}': value for key, value in state.items()},
  }


def save_torch_checkpoint(
  path: str | os.PathLike,
  variables: Mapping[str, Any],
  layout: str,
  *,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
) -> None:
  """Writes `{'state_dict': export_torch_state_dict(...)}` with torch.save, the wrapping
  that PNI's and akamaster's loaders read (and torch.load(weights_only=True) accepts)."""
  torch = _torch()
  torch.save(
    {'state_dict': export_torch_state_dict(variables, layout=layout, mean=mean, std=std)}, path
  )
