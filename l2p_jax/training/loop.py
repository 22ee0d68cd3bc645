"""The training loop of the five methods: per-epoch phases and evaluation, checkpoints,
metrics and resume, in a workdir one run holds at a time.

The steps themselves are in `l2p_jax.training.step`, the resume policy in
`l2p_jax.checkpointing.resume`; what a config builds (model, data,
normalization) in `l2p_jax.experiment`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from l2p_jax import checkpointing, data, experiment, methods
from l2p_jax.checkpointing.resume import refuse_changed_steps, resume
from l2p_jax.errors import UserError
from l2p_jax.experiment import ConfigError
from l2p_jax.runtime import files, sharding
from l2p_jax.runtime.metrics import MetricsWriter, read_metrics
from l2p_jax.runtime.plots import plot_noise_evolution
from l2p_jax.training import locking, objectives, schedule
from l2p_jax.training import step as step_lib
from l2p_jax.training.setup import init_key, run_setup
from l2p_jax.training.train_state import (
  EpochMetrics,
  TrainState,
  checkpoint_tree,
  from_checkpoint_tree,
  restart_optimizers,
)


def summarize(record: dict[str, Any]) -> str:
  """One console line for an epoch's record."""
  parts = [
    f'epoch {record["epoch"]}',  # Counted from 0, as in metrics.jsonl.
    f'lr {record["learning_rate"]:.4g}',
    f'loss {record["train_loss"]:.4f}',
    f'train acc {record["train_accuracy"]:.4f}',
  ]
  if 'eval_clean_accuracy' in record:
    parts += [
      f'clean acc {record["eval_clean_accuracy"]:.4f}',
      f'PGD acc {record["eval_pgd_accuracy"]:.4f}',
    ]
  if record['noise']:
    means = [v['mean'] for v in record['noise'].values()]
    parts.append(f'mean noise {sum(means) / len(means):.4f}')
  return ' | '.join(parts)


class NonFiniteLossError(UserError, FloatingPointError):
  """Training produced a NaN or infinite loss, parameter or optimizer state."""


class TrainingInterrupted(UserError, RuntimeError):
  """The run was stopped by Ctrl-C (KeyboardInterrupt); it resumes from a checkpoint."""


def evaluate(
  eval_fn,
  variables: dict[str, Any],
  split: data.HostSplit,
  mesh: jax.sharding.Mesh,
  batch_size: int,
  key: jax.Array,
) -> dict[str, float]:
  """Clean and PGD accuracy over a whole split, every example counted once."""
  clean = robust = 0
  batches = data.device_batches(mesh, data.eval_batches(split, batch_size))
  for i, batch in enumerate(batches):
    c, r = eval_fn(variables, batch, jax.random.fold_in(key, i))
    clean, robust = clean + c, robust + r
  n = split.num_examples
  return {'clean_accuracy': float(clean) / n, 'pgd_accuracy': float(robust) / n}


@dataclasses.dataclass
class _Saver:
  """Saves checkpoints with the run's metadata, never a non-finite state nor one step
  twice; `last` is the newest step saved (or resumed from), None before any. With the
  first checkpoint of a workdir it writes WORKDIR/config.json, so that file is the
  config of the run its checkpoints hold, never of a start that failed before one."""

  checkpoints: checkpointing.Checkpoints
  meta: dict[str, Any]
  last: int | None
  config: ml_collections.ConfigDict
  workdir: str

  def check(self, metrics: EpochMetrics) -> None:
    check_finite(metrics, self.checkpoints, self.last)

  def save(self, step: int, state: TrainState, metrics: EpochMetrics) -> None:
    self.check(metrics)
    if step != self.last:
      _write_config(self.config, self.workdir)
      self.checkpoints.save(step, checkpoint_tree(state, metrics), self.meta)
      self.last = step


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """WORKDIR/config.json, the first run's config (changes go to config.STEP.json)."""
  config_path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0 and not os.path.exists(config_path):
    files.write_text(config_path, config.to_json_best_effort(indent=2))


@contextlib.contextmanager
def _interrupt_names_resume_step(checkpoints: checkpointing.Checkpoints):
  """Turns Ctrl-C into TrainingInterrupted naming the step a rerun resumes from, once
  a save under way has completed."""
  try:
    yield
  except KeyboardInterrupt:
    checkpoints.wait()
    step = checkpoints.latest_step()
    raise TrainingInterrupted(
      'interrupted; rerun the same command to resume from '
      + (f'step {step}.' if step is not None else 'the start (no checkpoint yet).')
    ) from None


def _epoch_inputs(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  train_split: data.HostSplit,
  device_split: Any,
  epoch: int,
  start: int,
  steps_per_epoch: int,
):
  """The step inputs of the epoch's steps from `start` on, beyond state, metrics and
  the per-epoch values: batches from the host, or (the split on the mesh, the epoch's
  order, the epoch's first step) with data.on_device."""
  if config.data.on_device:
    order = data.epoch_order_on_mesh(mesh, config.seed, epoch, train_split.num_examples)
    epoch_start = sharding.replicate(mesh, np.int32(epoch * steps_per_epoch))
    return itertools.repeat((device_split, order, epoch_start), steps_per_epoch - start)
  batches = data.train_batches(
    train_split, seed=config.seed, epoch=epoch, batch_size=config.batch_size, start_step=start
  )
  return ((batch,) for batch in data.device_batches(mesh, batches))


def _warn_without_adversarial_steps(
  config: ml_collections.ConfigDict, method: methods.Method
) -> None:
  """Says when an adversarial method's run ends before its adversarial phase starts (a
  short smoke run may mean it; a real run would not)."""
  if method.adversarial and config.adv.start_epoch >= config.num_epochs:
    logging.warning(
      'method=%s trains no adversarial step: adv.start_epoch=%d is not below num_epochs=%d.',
      config.method,
      config.adv.start_epoch,
      config.num_epochs,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from the newest readable checkpoint there.

  Leaves config.json, checkpoints/, metrics.jsonl, tensorboard/ and (for randomized
  methods) noise_evolution.png in `workdir`; returns the final state. Process 0 holds
  the workdir's lock for the run; Ctrl-C raises TrainingInterrupted naming the step a
  rerun resumes from.
  """
  method = experiment.validate_config(config)
  _warn_without_adversarial_steps(config, method)
  mesh = sharding.mesh_for_batches(
    {'batch_size': config.batch_size, 'eval_batch_size': config.eval_batch_size}, ConfigError
  )
  # The data first: a missing dataset leaves no workdir behind.
  train_split, eval_split, train_split_size = experiment.load_data(config)
  os.makedirs(workdir, exist_ok=True)
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:  # The processes of one run share the workdir.
      stack.enter_context(locking.WorkdirLock(workdir))
    checkpoints = stack.enter_context(
      checkpointing.Checkpoints(
        os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints
      ).closing()
    )
    stack.enter_context(_interrupt_names_resume_step(checkpoints))

    replicated = sharding.replicated_sharding(mesh)
    refuse_changed_steps(checkpoints, config)
    mean, std = experiment.normalization(config, train_split)
    setup = run_setup(config, train_split.num_classes, mean, std, train_split_size, method)
    model, optimizers, settings = setup.model, setup.optimizers, setup.settings

    root = jax.random.key(config.seed)
    state = setup.initializer(train_split.images.shape[1:], out_shardings=replicated)(
      init_key(config.seed)
    )
    metrics = sharding.replicate(mesh, EpochMetrics.empty())
    tree, latest = resume(checkpoints, config, checkpoint_tree(state, metrics), workdir)
    state, metrics = from_checkpoint_tree(tree)

    # The jitted steps: training on batches from the host, or gathered from the split
    # put on the mesh; evaluation; the optimizers' restart.
    step_kwargs = dict(model=model, settings=settings, optimizers=optimizers)
    step_fn = functools.partial(step_lib.train_step, **step_kwargs)
    device_split = None
    if config.data.on_device:
      device_split = data.put_on_mesh(mesh, train_split)
      step_fn = functools.partial(
        step_lib.train_step_on_split,
        batch_size=config.batch_size,
        batch_sharding=sharding.data_sharding(mesh),
        **step_kwargs,
      )
    train_step = jax.jit(
      step_lib.accumulating(step_fn), static_argnames='phase', donate_argnums=(0, 1)
    )
    eval_step = jax.jit(
      functools.partial(step_lib.eval_step, model=model, settings=settings), static_argnames='noise'
    )
    restart = jax.jit(
      functools.partial(restart_optimizers, optimizers=optimizers), out_shardings=replicated
    )

    # A resume on another device count warns (not bit for bit).
    meta = checkpointing.checkpoint_meta(
      config, train_split.num_classes, mean, std, train_split.images.shape[1:], devices=mesh.size
    )
    saver = _Saver(checkpoints, meta, latest, config, workdir)
    writer = MetricsWriter(workdir)
    steps_per_epoch = data.steps_per_epoch(train_split.num_examples, config.batch_size)
    writer.drop_epochs_from(int(state.step) // steps_per_epoch)
    for epoch in range(int(state.step) // steps_per_epoch, config.num_epochs):
      phase, lr, reg_weight = schedule.epoch_schedule(config, method, epoch)
      step = int(state.step)
      start = step - epoch * steps_per_epoch  # Past 0 when resumed within the epoch.
      if start == 0:
        metrics = sharding.replicate(mesh, EpochMetrics.empty())
        if config.optim.restart_at_boundaries and epoch in config.optim.lr_boundaries:
          state = restart(state)
      started = time.time()
      # Per-epoch values go to the devices once here, not with every step.
      per_epoch = sharding.replicate(mesh, (np.float32(lr), np.float32(reg_weight)))
      # The bar closes before any error propagates, so its message starts a line.
      with tqdm(
        total=steps_per_epoch,
        initial=start,
        unit='step',
        dynamic_ncols=True,
        desc=f'epoch {epoch} [{epoch + 1}/{config.num_epochs}]',
        disable=not config.progress_bar or jax.process_index() != 0,
      ) as bar:
        for inputs in _epoch_inputs(
          config, mesh, train_split, device_split, epoch, start, steps_per_epoch
        ):
          state, metrics = train_step(state, metrics, *inputs, *per_epoch, phase=phase)
          step += 1
          bar.update()
          if step % config.log_every_steps == 0:
            saver.check(metrics)
            loss = float(metrics.loss_sum) / (step - epoch * steps_per_epoch)
            bar.set_postfix(loss=f'{loss:.4f}')
            writer.scalars(step, {'train/loss_running': loss, 'train/learning_rate': lr})
          # The epoch's last step is saved after its record is written (below), so that
          # a crash in between redoes the epoch rather than lose its record.
          if step % config.checkpoint_every_steps == 0 and step < (epoch + 1) * steps_per_epoch:
            saver.save(step, state, metrics)

      record = {
        'epoch': epoch,
        'step': step,
        'learning_rate': lr,
        'regularizer_weight': reg_weight,
        'train_loss': float(metrics.loss_sum) / steps_per_epoch,
        'train_accuracy': float(metrics.correct_sum) / int(metrics.seen),
        'epoch_seconds': time.time() - started,
      }
      # Every eval.every_epochs, and the last.
      if (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs:
        results = evaluate(
          functools.partial(eval_step, noise=phase.noise),
          state.variables,
          eval_split,
          mesh,
          config.eval_batch_size,
          jax.random.fold_in(jax.random.fold_in(root, step_lib.EVAL_STREAM), epoch),
        )
        record.update({f'eval_{k}': v for k, v in results.items()})
      record['noise'] = objectives.noise_statistics(state.perturb)
      saver.check(metrics)
      writer.epoch(record)
      saver.save(step, state, metrics)
      if jax.process_index() == 0:
        tqdm.write(summarize(record))

    checkpoints.wait()
    writer.close()
    if jax.process_index() == 0 and method.randomized:
      plot_noise_evolution(
        read_metrics(writer.path),
        os.path.join(workdir, 'noise_evolution.png'),
        title=f'{config.method} {config.model.arch}',
      )
    return state


def check_finite(
  metrics: EpochMetrics, checkpoints: checkpointing.Checkpoints, last_saved: int | None
) -> None:
  """Raises NonFiniteLossError naming the step and the last good checkpoint."""
  bad = int(metrics.nonfinite_step)
  if bad >= 0:
    if last_saved is None:
      where, rerun = 'none (no checkpoint was written yet)', 'starts over'
    else:
      where, rerun = checkpoints.path(last_saved), 'resumes from that checkpoint'
    raise NonFiniteLossError(
      f'Non-finite loss or train state (parameters, noise parameters or optimizer '
      f'state) at step {bad}. Last good checkpoint: {where}. Lower '
      f'optim.learning_rate or check the data; rerunning the same command {rerun}.'
    )
