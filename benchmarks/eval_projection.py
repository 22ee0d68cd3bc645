"""How long eval.py's default evaluation takes, projected from measured attack rates: each
planned attack's input gradients and forward passes per image, and the judging of its
examples under judge.draws noise draws, priced at the rates benchmarks/run.py measured.

The counts are each attack's registry Cost (attack_registry.Cost, e.g. PGD: steps x
restarts x EOT draws gradients; few-pixel: population x (iterations + 1) forward passes,
no early stop), so the projection is an upper bound where an attack stops early.
"""

from __future__ import annotations

from typing import Any

from configs import eval as eval_config
from l2p_jax.evaluation import AttackSpec, plan_attacks


def attack_cost(spec: AttackSpec) -> dict[str, Any]:
  """Input gradients, forward passes and loop iterations per attacked image of `spec`, and
  which measured rate prices them ('pgd7', 'eot_pgd', 'apgd' or 'forward'): its registry
  entry's Cost; EvaluationError for an attack registered without one."""
  return spec.priced()._asdict()


def default_plan(arg: str = '') -> tuple[list[AttackSpec], int]:
  """The white-box attacks of eval.py's config `arg` and its judge.draws."""
  config = eval_config.get_config(arg)
  specs, _ = plan_attacks(config)
  return specs, config.judge.draws


def project(
  rates: dict[str, float], judge_s_per_image: float, images: int = 10_000, arg: str = ''
) -> dict[str, Any]:
  """Seconds of the evaluation of `images` images under eval.py's config `arg`, from
  `rates` (gradient-images/s of 'pgd7', 'eot_pgd', 'apgd'; forward-images/s of
  'forward') and the seconds per image of judging one attack's examples under the
  config's draws; one row per attack, the total and the draws it assumed."""
  specs, draws = default_plan(arg)
  rows = []
  for spec in specs:
    cost = attack_cost(spec)
    attacked = min(spec.examples or images, images)
    attack_s = attacked * (
      cost['gradients'] / rates[cost['rate']] + cost['forwards'] / rates['forward']
    )
    rows.append(
      {
        'attack': spec.name,
        **cost,
        'images': attacked,
        'attack_s': attack_s,
        'judge_s': attacked * judge_s_per_image,
      }
    )
  total = sum(r['attack_s'] + r['judge_s'] for r in rows)
  return {'images': images, 'judge_draws': draws, 'attacks': rows, 'total_s': total}
