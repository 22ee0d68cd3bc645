"""Multi-process start-up: join JAX's multi-controller runtime when asked to.

Both entry points call `initialize_from_flags()` before anything touches a device. A
run is one process unless a coordinator address is given (`--coordinator_address` or
JAX's own `JAX_COORDINATOR_ADDRESS`) or `--distributed=auto` asks JAX to find the job
in its environment (Cloud TPU, SLURM, Open MPI, Kubernetes). Each of the N processes
then drives its local devices, and the training mesh spans all of them.
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from l2p_jax.runtime import sharding

_DISTRIBUTED = flags.DEFINE_enum(
  'distributed',
  'coordinator',
  ['coordinator', 'auto'],
  'coordinator: a multi-process run when a coordinator address is given (by '
  '--coordinator_address or $JAX_COORDINATOR_ADDRESS), else one process. auto: '
  'always a multi-process run; whatever the three flags below leave unset is '
  'detected from the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes).',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0 (reachable from every process), for multi-process runs.',
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, 'Number of processes in a multi-process run.'
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id', None, "This process's index, 0 to num_processes - 1."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  'heartbeat_timeout_seconds',
  100,
  'Seconds without a heartbeat after which a process counts as dead and the others '
  "stop (else they would wait forever in a collective); JAX's default is 100.",
)
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
  'initialization_timeout_seconds',
  300,
  'Seconds to wait at start-up for every process to join the coordinator before '
  'giving up with a message.',
)


def initialize_from_flags() -> None:
  """Calls jax.distributed.initialize as the flags ask, or does nothing for one process.

  Must run before any JAX computation. Raises ValueError when process flags are given
  without a coordinator, or when JAX cannot complete the job's description.
  """
  coordinator = _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if _DISTRIBUTED.value == 'coordinator' and not coordinator:
    if _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None:
      raise ValueError(
        '--num_processes and --process_id need --coordinator_address '
        '(or $JAX_COORDINATOR_ADDRESS), or --distributed=auto.'
      )
    return
  # Cross-process all-reduces of CPU devices need a collectives library. JAX 0.10
  # defaults to gloo (0.4.27, which added the option, to none); this fills in an unset
  # choice only, leaving mpi alone. It configures the CPU client only: GPU and TPU
  # runs are unaffected.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timeout = _INITIALIZATION_TIMEOUT.value
  where = coordinator or 'the address JAX finds in the environment'
  logging.warning(
    'Process %s of %s: waiting up to %d s for every process to join the coordinator at %s.',
    _PROCESS_ID.value,
    _NUM_PROCESSES.value,
    timeout,
    where,
  )
  # On a timeout JAX aborts the process from C++ with a stack dump; this says why first.
  deadline = threading.Timer(timeout, _give_up, (timeout, where, _NUM_PROCESSES.value))
  deadline.daemon = True
  deadline.start()
  try:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      initialization_timeout=timeout + 60,
      heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
    )
  except ValueError as e:  # A value neither given nor found in the environment.
    raise ValueError(
      f'{e} JAX finds the job by itself on Cloud TPU, SLURM, Open MPI and Kubernetes; '
      'elsewhere give --coordinator_address, --num_processes and --process_id.'
    ) from e
  finally:
    deadline.cancel()
  _set_up_collectives()


def _give_up(timeout: int, where: str, num_processes: int | None) -> None:
  """Ends the process with one message when the processes did not all join in time."""
  sys.stderr.write(
    f'Gave up after {timeout} s: not every process joined the coordinator at {where}. '
    f'Start all {num_processes or "N"} processes (the same command, each with its own '
    '--process_id), check that the address is reachable from every host, or raise '
    '--initialization_timeout_seconds.\n'
  )
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access  # The main thread is stuck in C++.


def _set_up_collectives() -> None:
  """Runs an all-reduce over the training mesh and a barrier across processes, so that
  the communicators of both device groups are set up while all processes are together.

  jax.distributed.initialize returns once every process has connected. On CPU, gloo
  then gives each device group's first collective only 30 s for all processes to
  arrive, and processes drift further apart than that while compiling (only process
  0 can use the persistent compilation cache on CPU). Once a group is set up, its
  collectives wait minutes for a late process (130 s tried), not 30 s.
  """
  mesh = sharding.make_mesh()
  ones = sharding.shard_batch(mesh, np.ones(jax.local_device_count(), np.int32))
  jax.jit(jnp.sum, out_shardings=sharding.replicated_sharding(mesh))(ones).block_until_ready()
  # The group of JAX's and orbax's barriers: one device per process.
  multihost_utils.sync_global_devices('l2p_jax: all processes started')
