"""How long eval.py's default evaluation takes, projected from measured attack rates: each
planned attack's input gradients and forward passes per image, and the judging of its
examples under judge.draws noise draws, priced at the rates benchmarks/run.py measured.

The counts follow each attack's loop (PGD: steps x restarts x EOT draws; C&W: binary
steps x iterations; APGD-rand: APGD-CE and APGD-DLR, each steps + 1 gradients of EOT
draws; APGD-T: target classes x (steps + 1); Square: queries x EOT draws forward passes;
AutoAttack: its stages' sum; few-pixel: population x (iterations + 1) forward passes, no
early stop), so the projection is an upper bound where an attack stops early.
"""

from __future__ import annotations

from typing import Any

from configs import eval as eval_config
from l2p_jax.evaluation import AttackSpec, plan_attacks


def attack_cost(spec: AttackSpec) -> dict[str, Any]:
  """Input gradients and forward passes per attacked image of `spec`, and which measured
  rate prices them: 'pgd7' (one gradient at a time), 'eot_pgd' (gradients averaged over
  EOT draws), 'apgd' or 'forward' (forward passes of the judging)."""
  p = dict(spec.params)
  if spec.attack == 'clean':
    return {'gradients': 0, 'forwards': 0, 'rate': 'pgd7'}
  if spec.attack == 'fgsm':
    return {'gradients': 1, 'forwards': 0, 'rate': 'pgd7'}
  if spec.attack == 'pgd':
    rate = 'eot_pgd' if p['eot_draws'] > 1 else 'pgd7'
    return {'gradients': p['steps'] * p['restarts'] * p['eot_draws'], 'forwards': 0, 'rate': rate}
  if spec.attack == 'cw':
    return {'gradients': p['binary_steps'] * p['steps'], 'forwards': 0, 'rate': 'pgd7'}
  if spec.attack == 'apgd_rand':
    return {'gradients': 2 * (p['steps'] + 1) * p['eot_draws'], 'forwards': 0, 'rate': 'apgd'}
  if spec.attack == 'apgd_t':
    gradients = p['target_classes'] * (p['steps'] + 1) * p.get('eot_draws', 1)
    return {'gradients': gradients, 'forwards': 0, 'rate': 'apgd'}
  if spec.attack == 'square':
    return {'gradients': 0, 'forwards': p['queries'] * p.get('eot_draws', 1), 'rate': 'forward'}
  if spec.attack == 'autoattack' and p['version'] == 'rand':
    return {'gradients': 2 * (p['steps'] + 1) * p['eot_draws'], 'forwards': 0, 'rate': 'apgd'}
  if spec.attack == 'autoattack':  # APGD-CE, APGD-T over its targets, then Square.
    gradients = (1 + p['target_classes']) * (p['steps'] + 1)
    return {'gradients': gradients, 'forwards': p['queries'], 'rate': 'apgd'}
  if spec.attack == 'few_pixel':
    forwards = p['population'] * (p['iterations'] + 1)
    return {'gradients': 0, 'forwards': forwards, 'rate': 'forward'}
  raise ValueError(f'No cost model for attack {spec.attack!r}; add one to attack_cost.')


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
