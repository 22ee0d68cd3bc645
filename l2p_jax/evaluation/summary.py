"""What an evaluation concludes over all its records, computed by the runner before
anything is written: the per-image worst case of every checkpoint over the attacks
that join it (verdicts.worst_cases) and the sanity checks (sanity.sanity_checks)."""

from __future__ import annotations

from typing import Any

from l2p_jax.evaluation import sanity, verdicts


def summarize(results: dict[str, Any], verdicts_by_name: dict[str, Any]) -> dict[str, Any]:
  """`results` with its per-image worst cases and its sanity checks computed over all
  its records."""
  eps = results['config']['eps']
  results = {
    **results,
    'worst_case': verdicts.worst_cases(results['records'], verdicts_by_name, eps),
  }
  return {**results, 'sanity': sanity.sanity_checks(results)}
