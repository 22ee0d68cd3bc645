"""Training: the train state (`train_state`), the epoch schedule (`schedule`), the step of
every method and its settings (`step`), the objectives and optimizers, the loop
(`loop.train_and_evaluate`), its checkpoints and the workdir's lock."""

from l2p_jax.training.schedule import Phase, epoch_schedule, phase_for_epoch, regularizer_weight
from l2p_jax.training.step import (
  EVAL_STREAM,
  INIT_STREAM,
  TRAIN_STREAM,
  StepAux,
  StepSettings,
  UpdateRule,
  accumulating,
  adversarial_examples,
  all_finite,
  descend,
  eval_step,
  joint_update,
  kl_loss_weight,
  l2p_code_update,
  l2p_paper_update,
  pgd_attack,
  step_keys,
  step_loss_fn,
  train_forward,
  train_step,
  train_step_on_split,
  update_rule,
)
from l2p_jax.training.train_state import (
  EpochMetrics,
  TrainState,
  checkpoint_tree,
  create_train_state,
  from_checkpoint_tree,
  restart_optimizers,
)
