"""PyTorch checkpoints of the authors' CIFAR ResNets <-> our Flax variables: reading a
checkpoint in any of its forms, checking it against the requested model, importing and
exporting it, in the key layouts of torch_layouts.py.

The authors wrap the network as `nn.Sequential(Normalize_layer(mean, std), net)`, so their
keys read `0.mean`, `0.std`, `1.<net key>`; DataParallel adds `module.`. torch is
imported inside the functions only: it is an optional extra.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from l2p_jax import methods
from l2p_jax.errors import UserError
from l2p_jax.interop.torch_layouts import Entry, Path, detect_layout, torch_entries
from l2p_jax.models import resnet_layout, resnet_settings

_WRAPPERS = ('module.', '_orig_mod.')  # DataParallel/DDP, torch.compile
_TORCH_HINT = "PyTorch checkpoint interop needs torch: pip install 'l2p-jax[torch]'"


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
  pass them to the network so an imported model sees the inputs it was trained on."""
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


# The model settings `_variable_shapes` does not take: initial values and options that
# change no variable's shape a PyTorch family can hold, so any valid value does.
_SHAPE_NEUTRAL_SETTINGS = dict(
  l2p_init=1.0,
  l2p_per_example=False,
  pni_init=1.0,
  bnn_init_sigma=1.0,
  bnn_mean_init='kaiming_normal',
  bnn_batchnorm=False,
)


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
  """Shapes of the variables of `method`'s network (as its registry record builds it),
  flattened to (collection, ..., leaf)."""
  config = ml_collections.ConfigDict(
    dict(
      method=method, model=dict(_SHAPE_NEUTRAL_SETTINGS, arch=arch, width=width, pni_mode=pni_mode)
    )
  )
  base = resnet_settings(
    arch,
    num_classes,
    width=width,
    mean=(0.0,) * channels,
    std=(1.0,) * channels,
    conv_input_gradient='auto',
    dtype=jnp.float32,
  )
  model = methods.get(method).network(config, base)
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
) -> tuple[list[Entry], str]:
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
    layout = detect_layout(state, resnet_layout(arch, width)['shortcut'] == 'A')
  return list(torch_entries(shapes, layout).values()), layout


def _key_problems(
  state: Mapping[str, np.ndarray], entries: Sequence[Entry]
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
  the L2P, PNI or torchvision-style CIFAR ResNets, for `method`'s network on `arch`.

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
  for entry in torch_entries({path: value.shape for path, value in flat.items()}, layout).values():
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
