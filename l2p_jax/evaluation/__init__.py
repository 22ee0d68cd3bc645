"""Evaluation of models under attack: the attack registry (`attack_registry`, the
built-in entries in `builtin_attacks`; `register_attack` adds one), attacks run over a
split and judged by a prediction rule (`judging`) on a model whatever made it
(`judged_model`), one record per result (`records`), the runner (`runner`) over trained
workdirs (`evaluate_workdirs`) and over any predict function (`api`, `evaluate`) that
writes results.json and results.md (`results_files`, `summary`, `results_report`)."""

from l2p_jax.evaluation import builtin_attacks  # noqa: F401  (registers the built-in attacks)
from l2p_jax.evaluation.api import InputError, default_config, evaluate
from l2p_jax.evaluation.attack_registry import (
  CLEAN,
  ITERATIVE,
  L0,
  L2,
  LINF,
  SINGLE_STEP,
  Attack,
  AttackSpec,
  Cost,
  EvaluationError,
  Preset,
  attack_entry,
  attack_names,
  plan_attacks,
  register_attack,
  registered,
  registered_attacks,
  unregister_attack,
)
from l2p_jax.evaluation.judged_model import JudgedModel
from l2p_jax.evaluation.judging import (
  DEFAULT_DRAWS,
  KEY_LAYOUT,
  CleanVerdicts,
  attack_accuracy,
  chosen_rule,
  prediction_rule,
)
from l2p_jax.evaluation.recording import EvaluationInterrupted, Recorder
from l2p_jax.evaluation.runner import (
  check_model_takes_split,
  checkpoint_model,
  data_settings,
  evaluate_checkpoint,
  evaluate_model,
  evaluate_workdirs,
  load_examples,
  transfer_records,
  validate_config,
)
