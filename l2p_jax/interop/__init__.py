"""Interoperation with other frameworks' checkpoints (PyTorch: needs the `torch` extra)."""

from l2p_jax.interop.torch_checkpoints import (
  TorchStateDictMismatchError,
  export_torch_state_dict,
  import_torch_checkpoint,
  read_torch_normalization,
  save_torch_checkpoint,
)
from l2p_jax.interop.torch_layouts import LAYOUTS

__all__ = [
  'LAYOUTS',
  'TorchStateDictMismatchError',
  'export_torch_state_dict',
  'import_torch_checkpoint',
  'read_torch_normalization',
  'save_torch_checkpoint',
]
