"""Evaluation of trained checkpoints under attack: the attack registry, attacks run over
a split and judged by a prediction rule, and the runner over workdirs
(`evaluate_workdirs`) that writes results.json and results.md."""

from l2p_jax.evaluation.runner import (
  ATTACK_FUNCTIONS,
  ATTACK_NAMES,
  ATTACKS,
  AUTHORS_PREDICTION,
  DEFAULT_DRAWS,
  KEY_LAYOUT,
  AttackSpec,
  EvaluationError,
  RegisteredAttack,
  attack_accuracy,
  check_model_takes_split,
  data_settings,
  evaluate_checkpoint,
  evaluate_workdirs,
  load_examples,
  plan_attacks,
  prediction_rule,
  transfer_records,
  validate_config,
)
