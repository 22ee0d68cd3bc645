"""The built-in attacks' registry entries (attack_registry.register_attack): clean, FGSM,
PGD (with EOT, noise-off and the eps sweep), C&W L2 (in expectation on randomized
models, with PNI's preset), AutoAttack 'rand' (APGD), APGD-T, the AutoAttack suite,
Square and few-pixel, each with the specs its config.attacks names plan from
configs/eval.py (and, for some, the spec a randomized model runs instead), its bounds,
title and column."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from l2p_jax import attacks
from l2p_jax.evaluation.attack_registry import (
  CLEAN,
  GRADIENT_FREE,
  ITERATIVE,
  L0,
  L2,
  LINF,
  SINGLE_STEP,
  Attack,
  AttackSpec,
  Cost,
  Preset,
  register_attack,
)


def _clean(
  logits_fn: attacks.LogitsFn, key: jax.Array, x: jax.Array, y: jax.Array
) -> attacks.AttackResult:
  """No attack: the inputs themselves, so clean accuracy runs through the same path."""
  del logits_fn, key
  return attacks.AttackResult(x, jnp.zeros(y.shape, bool), jnp.zeros(y.shape, x.dtype))


def _unroll(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The speed setting of the attacks with loops: unrolled or not (config.unroll)."""
  return (('unroll', True if config.unroll else 1),)


def _pgd(
  config: ml_collections.ConfigDict,
  steps: int,
  eps: float,
  eot_draws: int = 1,
  attack_noise: bool = True,
) -> AttackSpec:
  """PGD (with EOT over `eot_draws` draws) of `steps` steps at `eps`, config.pgd's
  other settings, on the checkpoint with its noise on or off."""
  p = config.pgd
  return AttackSpec(
    'pgd',
    (
      ('steps', steps),
      ('step_size', p.step_size),
      ('random_start', p.random_start),
      ('restarts', p.restarts),
      ('eot_draws', eot_draws),
    ),
    eps,
    attack_noise=attack_noise,
    speed=_unroll(config),
  )


def _eps_sweep(config: ml_collections.ConfigDict) -> list[AttackSpec]:
  """FGSM and PGD at every eps of config.eps_sweep.eps_255 (in 1/255 units); PGD takes
  eps_sweep.steps steps of eps_sweep.step_fraction * eps, so that every radius is crossed
  in the same number of steps, with config.pgd's random start and restarts."""
  sweep = config.eps_sweep
  pgd = (
    ('steps', sweep.steps),
    ('step_fraction', sweep.step_fraction),
    ('random_start', config.pgd.random_start),
    ('restarts', config.pgd.restarts),
    ('eot_draws', 1),
  )
  return [
    spec
    for e in sweep.eps_255
    for spec in (
      AttackSpec('fgsm', (), e / 255),
      AttackSpec('pgd', pgd, e / 255, speed=_unroll(config)),
    )
  ]


def _pgd_title(p: dict[str, Any]) -> str:
  """PGD-7, PGD-20 noise-off, EOT-PGD-7 (30 draws), PGD-10 (step eps/4) (a step in
  proportion to eps, as the eps sweep's)."""
  noise_off = '' if p.get('attack_noise', True) else ' noise-off'
  title = (
    f'PGD-{p["steps"]}{noise_off}'
    if p['eot_draws'] == 1
    else f'EOT-PGD-{p["steps"]} ({p["eot_draws"]} draws)'
  )
  fraction = p.get('step_fraction')
  return title if fraction is None else f'{title} (step eps/{1 / fraction:.3g})'


# PNI's C&W settings (He et al. 2019's attack code), run by the `cw_pni` preset whatever
# config.cw says, so that the authors' C&W column can still be reported beside ours.
PNI_CW = ml_collections.FrozenConfigDict(
  {'c_init': 0.01, 'learning_rate': 5e-4, 'kappa': 0.0, 'binary_steps': 9, 'steps': 10}
)
CW_COLUMN = 'C&W acc / L2'
CW_PNI_COLUMN = 'C&W (PNI) acc / L2'  # The `cw_pni` preset: PNI's settings.


def _cw(
  config: ml_collections.ConfigDict, cw: ml_collections.ConfigDict | None = None
) -> AttackSpec:
  """C&W L2 with the settings `cw` (default config.cw's)."""
  cw = config.cw if cw is None else cw
  return AttackSpec(
    'cw',
    (
      ('c_init', cw.c_init),
      ('learning_rate', cw.learning_rate),
      ('kappa', cw.kappa),
      ('binary_steps', cw.binary_steps),
      ('steps', cw.steps),
      *((('abort_early', True),) if cw.get('abort_early') else ()),
    ),
    speed=_unroll(config),
  )


def _cw_in_expectation(spec: AttackSpec, config: ml_collections.ConfigDict) -> AttackSpec:
  """A randomized model's C&W: in expectation over config.cw.eot_draws draws, with the
  margin config.cw.eot_kappa cleared by config.cw.eot_z standard errors (PNI's preset,
  the authors' attack, unchanged), its early abort on the loss's mean over each period
  (config.cw.eot_abort_on_mean). One draw keeps the planned spec's text, and eot_z 0 or
  the one-iteration abort the text (and key) of the C&W in expectation before them."""
  cw = config.cw
  if _is_pni_cw(dict(spec.params)) or cw.eot_draws == 1:
    return spec
  params = tuple((k, cw.eot_kappa if k == 'kappa' else v) for k, v in spec.params)
  added = (('eot_draws', cw.eot_draws),) + ((('eot_z', cw.eot_z),) if cw.eot_z else ())
  if cw.eot_abort_on_mean and 'abort_early' in dict(params):
    added += (('abort_on_mean', True),)
  return dataclasses.replace(spec, params=params + added)


def _cw_title(p: dict[str, Any]) -> str:
  """C&W's column: ours, in expectation (a randomized model's), or PNI's preset."""
  if _is_pni_cw(p):
    return CW_PNI_COLUMN
  draws, z = p.get('eot_draws', 1), p.get('eot_z', 0)
  if draws == 1:
    return CW_COLUMN
  abort = ', mean abort' if p.get('abort_on_mean') else ''
  return f'EOT-C&W ({draws} draws{f", z {z:g}" if z else ""}{abort}) acc / L2'


def _eot_title(title: str) -> Callable[[dict[str, Any]], str]:
  """A title function: `title`, with ' (EOT, N draws)' where the record averaged N > 1."""
  return lambda p: title if p.get('eot_draws', 1) == 1 else f'{title} (EOT, {p["eot_draws"]} draws)'


def _is_pni_cw(params: dict[str, Any]) -> bool:
  return all(params.get(k) == v for k, v in PNI_CW.items()) and 'abort_early' not in params


def _apgd(config: ml_collections.ConfigDict, attack_noise: bool = True) -> AttackSpec:
  """AutoAttack's 'rand' version (APGD-CE and APGD-DLR with EOT over config.apgd's
  draws), or with the noise off APGD on the mean network (one draw is all it has)."""
  return AttackSpec(
    'apgd_rand',
    (('steps', config.apgd.steps), ('eot_draws', config.apgd.eot_draws if attack_noise else 1)),
    config.eps,
    attack_noise=attack_noise,
    speed=_unroll(config),
  )


def _apgd_t(config: ml_collections.ConfigDict) -> AttackSpec:
  """AutoAttack's APGD-T with config.apgd_t's steps and target classes, one draw."""
  a = config.apgd_t
  return AttackSpec(
    'apgd_t',
    (('steps', a.steps), ('target_classes', a.target_classes)),
    config.eps,
    speed=_unroll(config),
  )


def _with_draws(
  draws: Callable[[ml_collections.ConfigDict], int],
  **changes: Callable[[ml_collections.ConfigDict], Any],
) -> Callable[[AttackSpec, ml_collections.ConfigDict], AttackSpec]:
  """A `randomized` adapter: the planned spec with ('eot_draws', draws) added and the
  params named in `changes` replaced."""

  def adapt(spec: AttackSpec, config: ml_collections.ConfigDict) -> AttackSpec:
    params = {**dict(spec.params), **{k: v(config) for k, v in changes.items()}}
    return dataclasses.replace(spec, params=(*params.items(), ('eot_draws', draws(config))))

  return adapt


def _square(config: ml_collections.ConfigDict) -> AttackSpec:
  """Square (L-inf, at config.eps) with config.square's queries and p_init, one draw."""
  q = config.square
  return AttackSpec('square', (('queries', q.queries), ('p_init', q.p_init)), config.eps)


def _autoattack(config: ml_collections.ConfigDict) -> AttackSpec:
  """AutoAttack's standard suite: APGD-CE (config.apgd.steps), APGD-T (config.apgd_t's
  targets) and Square (config.square's queries)."""
  return AttackSpec(
    'autoattack',
    (
      ('version', 'standard'),
      ('steps', config.apgd.steps),
      ('target_classes', config.apgd_t.target_classes),
      ('queries', config.square.queries),
    ),
    config.eps,
    speed=_unroll(config),
  )


def _autoattack_rand(spec: AttackSpec, config: ml_collections.ConfigDict) -> AttackSpec:
  """A randomized model's AutoAttack: the 'rand' version with config.apgd's settings."""
  params = (('version', 'rand'), ('steps', config.apgd.steps), ('eot_draws', config.apgd.eot_draws))
  return dataclasses.replace(spec, params=params)


def _few_pixel(config: ml_collections.ConfigDict, n_pixels: int) -> AttackSpec:
  """The few-pixel attack on `n_pixels` pixels with config.few_pixel's settings."""
  f = config.few_pixel
  return AttackSpec(
    'few_pixel',
    (('n_pixels', n_pixels), ('population', f.population), ('iterations', f.iterations)),
    None,
    f.examples,
    speed=(('chunk_size', f.chunk_size),),
  )


def _pgd_cost(p: dict[str, Any]) -> Cost:
  """PGD: steps x restarts iterations of one gradient per EOT draw."""
  iterations, draws = p['steps'] * p['restarts'], p['eot_draws']
  return Cost(iterations * draws, 0, iterations, 'eot_pgd' if draws > 1 else 'pgd7')


def _cw_cost(p: dict[str, Any]) -> Cost:
  """C&W: binary steps x steps Adam iterations, each a gradient per EOT draw and, in
  expectation, the forward passes of the fresh draws that judge it."""
  iterations, draws = p['binary_steps'] * p['steps'], p.get('eot_draws', 1)
  if draws == 1:
    return Cost(iterations, 0, iterations)
  return Cost(iterations * draws, iterations * draws, iterations, 'eot_pgd')


def _apgd_rand_cost(p: dict[str, Any]) -> Cost:
  """APGD-CE then APGD-DLR: steps + 1 gradients (the start's too) of EOT draws each."""
  return Cost(2 * (p['steps'] + 1) * p['eot_draws'], 0, 2 * p['steps'], 'apgd')


def _apgd_t_cost(p: dict[str, Any]) -> Cost:
  """APGD-T: one APGD run of steps + 1 gradients per target class (all of them: an
  upper bound, the runs stopping once every image is fooled)."""
  iterations = p['target_classes'] * p['steps']
  gradients = p['target_classes'] * (p['steps'] + 1) * p.get('eot_draws', 1)
  return Cost(gradients, 0, iterations, 'apgd')


def _autoattack_cost(p: dict[str, Any]) -> Cost:
  """The 'rand' version's APGD-CE and APGD-DLR, or the standard suite's stages: APGD-CE,
  APGD-T over its targets, then Square's queries."""
  if p['version'] == 'rand':
    return _apgd_rand_cost(p)
  runs = 1 + p['target_classes']
  return Cost(runs * (p['steps'] + 1), p['queries'], runs * p['steps'] + p['queries'], 'apgd')


register_attack(
  Attack(
    'clean',
    _clean,
    CLEAN,
    lambda p: 'Clean',
    column=0,
    presets={'clean': Preset(lambda c, n: [AttackSpec('clean')])},
    worst_case=True,
    cost=lambda p: Cost(0, 0, 0),
  )
)
register_attack(
  Attack(
    'fgsm',
    attacks.fgsm,
    LINF,
    lambda p: 'FGSM',
    column=1,
    presets={'fgsm': Preset(lambda c, n: [AttackSpec('fgsm', (), c.eps)])},
    worst_case=True,
    transfer=True,
    role=SINGLE_STEP,
    cost=lambda p: Cost(1, 0, 1),
  )
)
register_attack(
  Attack(
    'pgd',
    attacks.pgd,
    LINF,
    _pgd_title,
    column=2,
    presets={
      'pgd': Preset(lambda c, n: [_pgd(c, n or c.pgd.steps, c.eps)], counted=True),
      'eot_pgd': Preset(lambda c, n: [_pgd(c, n or c.pgd.steps, c.eps, c.eot.draws)], counted=True),
      'eps_sweep': Preset(lambda c, n: _eps_sweep(c)),
      # Made on the mean network (noise off), judged on the noisy one; randomized models only.
      'noise_off_pgd': Preset(
        lambda c, n: [_pgd(c, n or c.pgd.steps, c.eps, attack_noise=False)], counted=True
      ),
    },
    bounds=(('pgd.steps', 1), ('pgd.restarts', 1), ('eot.draws', 1)),
    worst_case=True,
    transfer=True,
    role=ITERATIVE,
    cost=_pgd_cost,
  )
)
register_attack(
  Attack(
    'cw',
    attacks.cw_l2,
    L2,
    _cw_title,
    column=3,
    presets={'cw': Preset(lambda c, n: [_cw(c)]), 'cw_pni': Preset(lambda c, n: [_cw(c, PNI_CW)])},
    bounds=(('cw.binary_steps', 1), ('cw.steps', 1), ('cw.eot_draws', 1), ('cw.eot_z', 0)),
    note='C&W: accuracy / mean L2 of the perturbations that fooled the model.',
    randomized=_cw_in_expectation,
    cost=_cw_cost,
  )
)
register_attack(
  Attack(
    'apgd_rand',
    attacks.autoattack_rand,
    LINF,
    lambda p: 'APGD-rand' if p.get('attack_noise', True) else 'APGD noise-off',
    column=4,
    presets={
      'apgd': Preset(lambda c, n: [_apgd(c)]),
      'noise_off_apgd': Preset(lambda c, n: [_apgd(c, attack_noise=False)]),
    },
    bounds=(('apgd.steps', 1), ('apgd.eot_draws', 1)),
    worst_case=True,
    cost=_apgd_rand_cost,
  )
)
register_attack(
  Attack(
    'few_pixel',
    attacks.few_pixel,
    L0,
    lambda p: f'{p["n_pixels"]} px',
    column=5,
    presets={
      'few_pixel': Preset(
        lambda c, n: [_few_pixel(c, p) for p in ((n,) if n else c.few_pixel.pixels)], counted=True
      )
    },
    bounds=(('few_pixel.population', 4), ('few_pixel.examples', 0)),
    budget='n_pixels',
    cost=lambda p: Cost(0, p['population'] * (p['iterations'] + 1), p['iterations'], 'forward'),
  )
)
register_attack(
  Attack(
    'apgd_t',
    attacks.apgd_targeted,
    LINF,
    _eot_title('APGD-T'),
    column=4.2,
    presets={'apgd_t': Preset(lambda c, n: [_apgd_t(c)])},
    bounds=(('apgd_t.steps', 1), ('apgd_t.target_classes', 1), ('apgd_t.eot_draws', 1)),
    worst_case=True,
    randomized=_with_draws(lambda c: c.apgd_t.eot_draws),
    cost=_apgd_t_cost,
  )
)
register_attack(
  Attack(
    'autoattack',
    attacks.autoattack,
    LINF,
    lambda p: 'AutoAttack' if p['version'] == 'standard' else 'AutoAttack-rand',
    column=4.4,
    presets={'autoattack': Preset(lambda c, n: [_autoattack(c)])},
    worst_case=True,
    note=(
      'AutoAttack: the standard suite (APGD-CE, APGD-T, Square; no FAB-T) on deterministic '
      "models, the 'rand' version (APGD-CE, APGD-DLR with EOT) on randomized ones; each "
      "record's params.version says which ran."
    ),
    randomized=_autoattack_rand,
    cost=_autoattack_cost,
  )
)
register_attack(
  Attack(
    'square',
    attacks.square,
    LINF,
    _eot_title('Square'),
    column=4.6,
    presets={'square': Preset(lambda c, n: [_square(c)])},
    bounds=(('square.queries', 1), ('square.randomized_queries', 1), ('square.eot_draws', 1)),
    worst_case=True,
    budget='queries',
    role=GRADIENT_FREE,
    randomized=_with_draws(
      lambda c: c.square.eot_draws, queries=lambda c: c.square.randomized_queries
    ),
    cost=lambda p: Cost(0, p['queries'] * p.get('eot_draws', 1), p['queries'], 'forward'),
  )
)
