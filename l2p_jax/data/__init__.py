"""Datasets in host memory (TFDS or original archives), batches on the mesh, augmenting."""

from l2p_jax.data.pipeline import (
  Batch,
  augment,
  check_split_fits,
  device_batches,
  epoch_order_on_mesh,
  epoch_permutation,
  eval_batches,
  num_eval_batches,
  put_on_mesh,
  steps_per_epoch,
  take_train_batch,
  to_float,
  train_batch,
  train_batches,
)
from l2p_jax.data.sources import (
  KNOWN_CHANNEL_STATS,
  LOCAL_FORMATS,
  LOCAL_SPLITS,
  SOURCES,
  DataConfigError,
  DatasetFileError,
  DatasetNotFoundError,
  HostSplit,
  LocalFormat,
  channel_stats,
  load_split,
)
