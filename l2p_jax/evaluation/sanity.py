"""Checks that an evaluation attacked what it judged, after every evaluation and per
checkpoint (Carlini et al. 2019, "On evaluating adversarial robustness", sec. 5; Athalye
et al. 2018): a failed check says the numbers may measure a weak attack, not a strong
defense.

Each check compares records of one checkpoint; "beyond the interval" means outside the
other record's accuracy_ci95 (intervals.accuracy_interval):
- largest_eps: the iterative attack (PGD) at the largest radius of an eps sweep leaves
  at most 2%; not applicable (passed None) when that radius is below 32/255, where a
  robust model may rightly keep more;
- more_steps / more_eot_draws: the iterative attack with more steps (more EOT draws),
  the rest the same, is not more accurate beyond the interval of fewer;
- single_step: a single-step attack (FGSM) is not less accurate than the iterative one
  at its radius beyond the iterative one's interval;
- white_box_vs_transfer: no transfer or noise-off cell of an L-inf attack at the
  headline eps is less accurate than the strongest white-box L-inf attack beyond that
  attack's interval;
- unbounded: an unbounded attack (L2 minimum norm: C&W) leaves at most 5%;
- judged_over_draws: a model whose logits change between noise draws is judged under
  more than one draw;
- gradient_free: a gradient-free attack (Square) is not less accurate than the strongest
  white-box gradient L-inf attack at its radius beyond that attack's interval (a
  gradient the attacks follow is masked);
- converged: an attack whose record keeps its accuracy after each iteration (`curve`:
  PGD, Square, and the APGD attacks over the iterations of all their stages) lowers it
  over its last quarter of iterations by less than the width of its interval (it had
  stopped improving).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from l2p_jax.evaluation.attack_registry import (
  GRADIENT_FREE,
  ITERATIVE,
  L2,
  LINF,
  SINGLE_STEP,
  Attack,
  attack_entry,
  from_source,
)

LARGEST_EPS_MAX = 0.02
LARGEST_EPS_APPLIES = 32 / 255  # From this radius on every model must fall to about 0%.
UNBOUNDED_MAX = 0.05


def verdict(entry: dict[str, Any]) -> str:
  """A check's result in words: passed, FAILED or not applicable (passed None)."""
  return {True: 'passed', False: 'FAILED', None: 'not applicable'}[entry['passed']]


def _interval(record: dict[str, Any]) -> tuple[float, float]:
  """A record's 95% interval (its accuracy twice for records written before intervals)."""
  return tuple(record.get('accuracy_ci95') or (record['accuracy'],) * 2)


def _title(record: dict[str, Any]) -> str:
  p = record['params']
  eps = '' if p['eps'] is None else f' at {p["eps"] * 255:g}/255'
  return f'{record["attack"]}{_steps(p)}{eps}{from_source(record)}'


def _steps(params: dict[str, Any]) -> str:
  parts = [f'{params[k]} {k}' for k in ('steps', 'eot_draws') if k in params]
  parts += [] if params.get('attack_noise', True) else ['noise off']
  return f' ({", ".join(parts)})' if parts else ''


def _percent(value: float) -> str:
  return f'{100 * value:.2f}%'


def _versus(first: dict[str, Any], second: dict[str, Any]) -> str:
  """'<first> <accuracy> vs <second> <accuracy>' for a check's detail."""
  return (
    f'{_title(first)} {_percent(first["accuracy"])} vs '
    f'{_title(second)} {_percent(second["accuracy"])}'
  )


def _check(name: str, failures: list[str], passes: list[str]) -> dict[str, Any]:
  """A check's entry: passed when nothing failed; the detail lists what failed, else
  what was compared."""
  return {'name': name, 'passed': not failures, 'detail': '; '.join(failures or passes)}


def _not_applicable(name: str, why: str) -> dict[str, Any]:
  """The entry of a check that the evaluation's settings cannot pass or fail."""
  return {'name': name, 'passed': None, 'detail': why}


def _white_box(
  records: Sequence[dict[str, Any]], kind: Callable[[Attack], bool]
) -> list[dict[str, Any]]:
  """The white-box records, noise on, of the attacks whose entry is of the `kind`."""
  return [
    r
    for r in records
    if r['source'] is None
    and kind(attack_entry(r['attack']))
    and r['params'].get('attack_noise', True)
  ]


def _iterative(entry: Attack) -> bool:
  return entry.role == ITERATIVE


def _largest_eps(records: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  pgd = [r for r in _white_box(records, _iterative) if r['params']['eot_draws'] == 1]
  radii = {r['params']['eps'] for r in pgd}
  if len(radii) > 1:
    at_largest = [r for r in pgd if r['params']['eps'] == max(radii)]
    best = min(at_largest, key=lambda r: r['accuracy'])
    text = f'{_title(best)} leaves {_percent(best["accuracy"])}'
    if max(radii) < LARGEST_EPS_APPLIES - 1e-9:
      yield _not_applicable(
        'largest_eps',
        f'{text}, but the sweep stops at {max(radii) * 255:g}/255; PGD must leave every model '
        f'near 0% only from {LARGEST_EPS_APPLIES * 255:g}/255 (eps_sweep.eps_255 up to 64)',
      )
      return
    ok = best['accuracy'] <= LARGEST_EPS_MAX
    yield _check('largest_eps', [] if ok else [f'{text} > 2%'], [f'{text} <= 2%'])


def _more_budget(
  records: Sequence[dict[str, Any]], budget: str, name: str
) -> Iterator[dict[str, Any]]:
  """Within PGD records equal but for `budget` (steps or eot_draws), more is not more
  accurate beyond the interval of fewer."""
  families: dict[tuple, list[dict[str, Any]]] = {}
  for r in _white_box(records, _iterative):
    rest = tuple(sorted((k, v) for k, v in r['params'].items() if k != budget))
    families.setdefault(rest, []).append(r)
  failures, passes = [], []
  for family in families.values():
    for fewer, more in itertools.combinations(sorted(family, key=lambda r: r['params'][budget]), 2):
      text = _versus(more, fewer)
      (failures if more['accuracy'] > _interval(fewer)[1] else passes).append(text)
  if failures or passes:
    yield _check(name, failures, passes)


def _single_step(records: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  failures, passes = [], []
  for fgsm in _white_box(records, lambda entry: entry.role == SINGLE_STEP):
    for pgd in _white_box(records, _iterative):
      if pgd['params']['eps'] == fgsm['params']['eps']:
        text = _versus(fgsm, pgd)
        (failures if fgsm['accuracy'] < _interval(pgd)[0] else passes).append(text)
  if failures or passes:
    yield _check('single_step', failures, passes)


def _white_box_vs_transfer(
  records: Sequence[dict[str, Any]], eps: float
) -> Iterator[dict[str, Any]]:
  at_eps = [
    r
    for r in records
    if attack_entry(r['attack']).threat_model == LINF and r['params']['eps'] == eps
  ]
  white = [r for r in at_eps if r['source'] is None and r['params'].get('attack_noise', True)]
  others = [
    r
    for r in at_eps
    if (r['source'] is not None and r['source']['checkpoint'] != r['checkpoint'])
    or not r['params'].get('attack_noise', True)
  ]
  if white and others:
    strongest = min(white, key=lambda r: r['accuracy'])
    low = _interval(strongest)[0]
    failures, passes = [], []
    for r in others:
      text = _versus(r, strongest)
      (failures if r['accuracy'] < low else passes).append(text)
    yield _check('white_box_vs_transfer', failures, passes)


def _unbounded(records: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  for r in _white_box(records, lambda entry: entry.threat_model == L2):
    text = f'{r["name"]} leaves {_percent(r["accuracy"])}'
    ok = r['accuracy'] <= UNBOUNDED_MAX
    yield _check('unbounded', [] if ok else [f'{text} > 5%'], [f'{text} <= 5%'])


def _judged_over_draws(
  records: Sequence[dict[str, Any]], checkpoint: dict[str, Any]
) -> Iterator[dict[str, Any]]:
  if checkpoint.get('logits_vary') is None:
    return
  once = [r for r in records if r.get('judged_draws', 1) == 1]
  if checkpoint['logits_vary'] and once:
    yield _check(
      'judged_over_draws',
      [f'its logits change between noise draws but {len(once)} records were judged under one draw'],
      [],
    )
  else:
    varies = 'change' if checkpoint['logits_vary'] else 'do not change'
    yield _check('judged_over_draws', [], [f'its logits {varies} between noise draws'])


def sanity_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Every applicable check (module docstring) of every checkpoint in `results`, each
  {label, checkpoint, name, passed, detail}."""
  eps, entries = results['config']['eps'], []
  for checkpoint in results['checkpoints']:
    mine = [r for r in results['records'] if r['checkpoint'] == checkpoint['checkpoint']]
    checks = itertools.chain(
      _largest_eps(mine),
      _more_budget(mine, 'steps', 'more_steps'),
      _more_budget(mine, 'eot_draws', 'more_eot_draws'),
      _single_step(mine),
      _white_box_vs_transfer(mine, eps),
      _unbounded(mine),
      _judged_over_draws(mine, checkpoint),
      _gradient_free(mine),
      _converged(mine),
    )
    entries += [
      {'label': checkpoint['label'], 'checkpoint': checkpoint['checkpoint'], **check}
      for check in checks
    ]
  return entries


def _gradient_free(records: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  """Every gradient-free white-box record against the strongest gradient L-inf attack at
  its radius (an attack that spends queries, as AutoAttack's standard suite with Square
  in it, is no gradient baseline)."""
  free = _white_box(records, lambda entry: entry.role == GRADIENT_FREE)
  gradient = [
    r
    for r in _white_box(records, lambda entry: entry.threat_model == LINF)
    if attack_entry(r['attack']).role != GRADIENT_FREE and 'queries' not in r['params']
  ]
  failures, passes = [], []
  for r in free:
    rivals = [g for g in gradient if g['params']['eps'] == r['params']['eps']]
    if rivals:
      strongest = min(rivals, key=lambda g: g['accuracy'])
      text = _versus(r, strongest)
      (failures if r['accuracy'] < _interval(strongest)[0] else passes).append(text)
  if failures or passes:
    yield _check('gradient_free', failures, passes)


def _converged(records: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  """Every record with a curve of at least 4 points: the accuracy its last quarter of
  iterations took off against the width of its interval."""
  failures, passes = [], []
  for r in records:
    curve = r.get('curve') or []
    if len(curve) >= 4:
      start = curve[(3 * (len(curve) - 1)) // 4]
      low, high = _interval(r)
      text = (
        f'{_title(r)}: the last quarter of its {len(curve) - 1} iterations took '
        f'{_percent(start - curve[-1])} off (interval width {_percent(high - low)})'
      )
      (failures if start - curve[-1] >= max(high - low, 1e-12) else passes).append(text)
  if failures or passes:
    yield _check('converged', failures, passes)
