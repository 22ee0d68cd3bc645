"""Evaluation of trained checkpoints under attack: the attack registry
(`attack_registry`), attacks run over a split and judged by a prediction rule
(`judging`), one record per result (`records`), and the runner over workdirs
(`evaluate_workdirs`) that writes results.json and results.md (`results_report`)."""

from l2p_jax.evaluation.attack_registry import (
  ATTACK_FUNCTIONS,
  ATTACK_NAMES,
  ATTACKS,
  AttackSpec,
  EvaluationError,
  RegisteredAttack,
  plan_attacks,
)
from l2p_jax.evaluation.judging import DEFAULT_DRAWS, KEY_LAYOUT, attack_accuracy, prediction_rule
from l2p_jax.evaluation.runner import (
  check_model_takes_split,
  data_settings,
  evaluate_checkpoint,
  evaluate_workdirs,
  load_examples,
  transfer_records,
  validate_config,
)
