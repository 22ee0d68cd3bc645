"""Checkpoints, one owner for every use: orbax's manager and the run metadata
(`manager`), whether a config may resume a checkpoint (`compatibility`), the resume
policy of a training workdir (`resume`), and a model restored from its checkpoint alone
for evaluation and interop (`restore`)."""

from l2p_jax.checkpointing.compatibility import check_compatible
from l2p_jax.checkpointing.manager import (
  RESTORE_ERRORS,
  CheckpointMismatchError,
  CheckpointNotFoundError,
  Checkpoints,
  CheckpointUnreadableError,
  checkpoint_meta,
  newest_readable,
)
from l2p_jax.checkpointing.restore import (
  Checkpoint,
  check_variables_fit,
  find_checkpoint,
  load_checkpoint,
)
