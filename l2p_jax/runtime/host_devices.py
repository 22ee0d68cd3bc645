"""How many devices XLA:CPU makes: by default two per available core.

XLA:CPU spreads one program's convolutions over the cores poorly, while the library runs
data-parallel over any device mesh; splitting each batch over several host devices is
faster: on 2 cores, 2 devices 1.3-2.1x over 1, and 4 a further 0.97-1.39x (BENCHMARKS.md,
point 10). The entry points call `configure` before JAX starts its backend. It sets
`jax_num_cpu_devices`, which only JAX's CPU client reads (`jax/_src/xla_bridge.py`,
`make_cpu_client`), so GPU and TPU runs are unchanged: their mesh is still every
accelerator.

Who decides, first match wins: `--cpu_devices=N` (N > 0); JAX_NUM_CPU_DEVICES (or
`jax_num_cpu_devices` set in code); `--xla_force_host_platform_device_count` in
XLA_FLAGS; else two devices per available core (`os.sched_getaffinity`), lowered to the
largest count that divides every batch the run splits, which is said once in the log.
An explicit count is taken as given: a batch it does not divide is an error naming both.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import jax
from absl import flags, logging

from l2p_jax.errors import UserError

DEVICES_PER_CORE = 2  # Measured against 1 per core on 2 cores (BENCHMARKS.md, point 10).
_CPU_DEVICES = flags.DEFINE_integer(
  'cpu_devices',
  0,
  'Devices a CPU run splits each batch over (data parallelism). '
  f'0: {DEVICES_PER_CORE} per available core '
  '(fewer when that count does not divide the batch), unless XLA_FLAGS '
  '(--xla_force_host_platform_device_count) or JAX_NUM_CPU_DEVICES sets one. No effect on '
  'GPUs or TPUs.',
)
XLA_COUNT_FLAG = re.compile(r'--xla_force_host_platform_device_count=(\d+)')


@dataclasses.dataclass(frozen=True)
class Choice:
  """The CPU device count a run asks JAX for (None: JAX's own, from the environment),
  why, and what to say in the log when the batch lowered the default."""

  count: int | None
  source: str
  note: str | None = None


def available_cores() -> int:
  """The cores this process may run on (its CPU affinity, not the machine's total)."""
  return len(os.sched_getaffinity(0))


def default_count(cores: int, batch_sizes: Sequence[int]) -> int:
  """The default device count on `cores` cores: DEVICES_PER_CORE per core, lowered to
  the largest count that divides every one of `batch_sizes`."""
  return largest_dividing(DEVICES_PER_CORE * cores, batch_sizes)


def largest_dividing(limit: int, batch_sizes: Sequence[int]) -> int:
  """The largest count from 1 to `limit` that divides every one of `batch_sizes`."""
  return next(k for k in range(max(limit, 1), 0, -1) if all(b % k == 0 for b in batch_sizes))


def choose(
  requested: int, batch_sizes: dict[str, int], *, cores: int, xla_flags: str, jax_count: int
) -> Choice:
  """The CPU device count for a run that splits `batch_sizes` (name: size), from the
  flag's `requested` (0: the default), the available `cores`, the XLA_FLAGS text and
  `jax_num_cpu_devices` as already set (-1: unset); see the module docstring."""
  if requested < 0:
    raise UserError(
      f'--cpu_devices={requested}: give a number of devices, or 0 for '
      f'{DEVICES_PER_CORE} per available core.'
    )
  if requested:
    return Choice(requested, f'--cpu_devices={requested}')
  if jax_count >= 0:
    return Choice(None, f'JAX_NUM_CPU_DEVICES={jax_count}')
  given = XLA_COUNT_FLAG.search(xla_flags)
  if given:
    return Choice(None, f'XLA_FLAGS {given.group(0)}')
  count, target = default_count(cores, list(batch_sizes.values())), DEVICES_PER_CORE * cores
  default = f'{DEVICES_PER_CORE} per available core ({target} for {cores} cores)'
  if count == target:
    return Choice(count, default)
  sizes = ' and '.join(f'{name} {size}' for name, size in batch_sizes.items())
  return Choice(
    count,
    f'{default}, lowered to divide the batch',
    f'{count} CPU devices, not {default}: {count} is the largest count that divides '
    f'{sizes}. A batch that is a multiple of {target} gets all of them.',
  )


def configure(batch_sizes: dict[str, int], requested: int | None = None) -> Choice:
  """Sets JAX's CPU device count for a run splitting `batch_sizes` (name: size) as
  `choose` decides, `requested` defaulting to --cpu_devices (0 before flags are parsed);
  call it before JAX starts its backend. A backend already started (a test, a notebook)
  keeps its devices."""
  if requested is None:
    requested = _CPU_DEVICES.value if flags.FLAGS.is_parsed() else 0
  choice = choose(
    requested,
    batch_sizes,
    cores=available_cores(),
    xla_flags=os.environ.get('XLA_FLAGS', ''),
    jax_count=jax.config.jax_num_cpu_devices,
  )
  if choice.count is not None:
    try:
      jax.config.update('jax_num_cpu_devices', choice.count)
    except RuntimeError:  # JAX refuses once its backend has started.
      started = len(jax.devices('cpu'))
      if started != choice.count:
        logging.warning(
          'JAX started with %d CPU devices before they could be set to %d (%s); it keeps %d.',
          started,
          choice.count,
          choice.source,
          started,
        )
        return Choice(None, f'the {started} CPU devices JAX had started with')
  return choice


def log_choice(choice: Choice) -> None:
  """Says once, on a CPU run, how many devices it splits its batches over and why:
  as a warning when the batch lowered the default, else at INFO."""
  if jax.default_backend() != 'cpu':
    return
  if choice.note:
    logging.warning('%s', choice.note)
  else:
    logging.info('%d CPU devices (%s).', jax.device_count(), choice.source)
