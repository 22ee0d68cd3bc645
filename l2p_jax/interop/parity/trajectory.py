"""Training trajectories of l2p_jax and of the authors' PyTorch step from one start.

Both frameworks start from our initial variables (exported with the checkpoint bridge)
and take the same optimizer steps on the same augmented batches (augmented here, once).
Noise draws and PGD's random starts are made on our side and injected into PyTorch:
each pass's draws are recorded through the `draws` collection of
`l2p_jax.models.layers.draw_normal` (with the keys our `train_step` uses) and handed to
`torch_reference.inject_draws`. After every step the report holds how far the two have
parted: weights, noise parameters, BatchNorm statistics, loss, PGD's gradient signs
(measured and summarized by trajectory_report.py). Needs the `torch` extra.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from l2p_jax import data, experiment, methods
from l2p_jax.attacks import core
from l2p_jax.interop.parity import trajectory_report
from l2p_jax.interop.torch_layouts import torch_entries
from l2p_jax.models.layers import DRAWS
from l2p_jax.training import objectives, rules, schedule, train_state
from l2p_jax.training import setup as training_setup
from l2p_jax.training import step as step_lib

LAYOUT = 'l2p'  # The authors' module names: ResNet-V1 fb-style, ResNet-18 kuangliu.
LOG_SIGMA = '_log_sigma'
TORCH_HINT = 'Comparing with PyTorch needs torch: pip install -e ".[torch]"'


def _torch_modules():
  """(torch, torch_reference, torch_step), or an ImportError saying how to get torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel

    from l2p_jax.interop.parity import torch_reference, torch_step  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(TORCH_HINT) from error
  return torch, torch_reference, torch_step


def pgd_trace(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  eps: float,
  steps: int,
  step_size: float,
  random_start: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`attacks.pgd` with one restart and no EOT, step by step: (start, noise key of
  each step, gradient sign of each step, last iterate), by pgd.py's key layout."""
  start_key, steps_key, _ = jax.random.split(jax.random.fold_in(key, 0), 3)
  x0 = core.linf_random_start(start_key, x, eps) if random_start else x
  noise_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(steps_key, i), 0))(
    jnp.arange(steps)
  )

  def step(x_adv, noise_key):
    grad = jax.grad(lambda z: jnp.sum(core.cross_entropy(logits_fn(z, noise_key), y)))(x_adv)
    return core.linf_project(core.sign_step(x_adv, grad, step_size), x, eps), jnp.sign(grad)

  x_adv, signs = jax.lax.scan(step, x0, noise_keys)
  return x0, noise_keys, signs, x_adv


def check_config(config: ml_collections.ConfigDict, steps: int) -> None:
  """Raises ValueError for what the PyTorch side cannot follow."""
  method = experiment.validate_config(config)
  problems = []
  if config.model.dtype != 'float32':
    problems.append(f'model.dtype={config.model.dtype!r} (PyTorch runs float32)')
  if config.model.l2p_per_example:
    problems.append('model.l2p_per_example=True (the authors draw one eps per batch)')
  if steps < 1:
    problems.append(f'steps={steps} (needs at least 1)')
  if (
    config.adv.attack_batchnorm == 'running'
    and method.noise_update is not None
    and config.l2p.alternation == 'paper'
  ):
    problems.append(
      'adv.attack_batchnorm=running with l2p.alternation=paper (the '
      "reference's first clean pass of that alternation leaves the "
      'running statistics alone)'
    )
  if config.adv.clean_weight == 0:
    problems.append(
      'adv.clean_weight=0 (the reference always runs the clean pass through BatchNorm)'
    )
  if config.method == 'adv_bnn':  # The reference follows the Adv-BNN paper's variant.
    for field, value, paper in (
      ('optim.optimizer', config.optim.optimizer, 'sgd'),
      ('optim.restart_at_boundaries', config.optim.restart_at_boundaries, False),
      ('bnn.kl_scope', config.bnn.kl_scope, 'all'),
      ('model.bnn_batchnorm', config.model.bnn_batchnorm, False),
      ('model.bnn_mean_init', config.model.bnn_mean_init, 'kaiming_normal'),
    ):
      if value != paper:
        problems.append(f'{field}={value!r} (the PyTorch reference has {paper!r} only)')
  if problems:
    raise ValueError('Cannot compare with PyTorch: ' + '; '.join(problems) + '.')


def _entries(variables: dict[str, Any]) -> dict[tuple[str, ...], Any]:
  """Torch counterparts of our variables; Bayesian log-sigmas go with their means."""
  shapes = {
    path: tuple(np.shape(v))
    for path, v in traverse_util.flatten_dict(variables).items()
    if not path[-1].endswith(LOG_SIGMA)
  }
  return torch_entries(shapes, LAYOUT)


def _torch_key(path: tuple[str, ...], entries) -> tuple[str, Any]:
  """(torch key, entry) of one of our variables; `<mean>_log_sigma` -> `weight_log_sigma`."""
  if path[-1].endswith(LOG_SIGMA):
    entry = entries[('params', *path[1:-1], path[-1][: -len(LOG_SIGMA)])]
    return entry.key + LOG_SIGMA, entry
  return entries[path].key, entries[path]


def to_torch_state(variables: dict[str, Any], entries) -> dict[str, np.ndarray]:
  """Our variables as the bare PyTorch network's state (layout 'l2p', Bayesian too)."""
  state = {}
  for path, value in traverse_util.flatten_dict(variables).items():
    key, entry = _torch_key(path, entries)
    state[key] = np.array(entry.to_torch(np.asarray(value)))
  return state


def from_torch_state(state: dict[str, Any], like: dict[str, Any], entries) -> dict:
  """The PyTorch network's state as our flat {path: array}, for the paths of `like`."""
  flat = {}
  for path in traverse_util.flatten_dict(like):
    key, entry = _torch_key(path, entries)
    flat[path] = entry.to_ours(state[key].detach().numpy())
  return flat


def torch_draws(draws: dict[str, Any], entries) -> dict[str, np.ndarray]:
  """One pass's recorded draws as `inject_draws` wants them: torch key -> array."""
  out = {}
  for (*module, leaf), value in traverse_util.flatten_dict(draws).items():
    path = ('perturb' if leaf == 'theta' else 'params', *module, leaf)
    out[entries[path].key] = np.array(entries[path].to_torch(np.asarray(value)))
  return out


def compare(
  config: ml_collections.ConfigDict,
  steps: int,
  split: data.HostSplit,
  *,
  batch_norm: str = 'ours',
  noise: bool = True,
  train_split_size: int | None = None,
) -> dict[str, Any]:
  """Trains `config` for `steps` optimizer steps with l2p_jax's `train_step` and with
  the authors' PyTorch step from the same start, on `split`'s batches in training
  order; returns the report (see the module docstring and README).

  batch_norm: 'ours' moves PyTorch's running statistics as Flax does; 'authors' keeps
  torch's BatchNorm2d (every training-mode pass, PGD's too, toward the unbiased variance).
  noise=False switches the noise layers off in both (the deterministic check).
  train_split_size: the whole training split's size, Adv-BNN's N (default: split's).
  """
  check_config(config, steps)
  mean, std = experiment.normalization(config, split)
  setup = training_setup.run_setup(
    config, split.num_classes, mean, std, train_split_size or split.num_examples
  )
  method, model, optimizers, settings = setup.method, setup.model, setup.optimizers, setup.settings
  kl_weight = settings.kl_weight
  state = setup.initializer(split.images.shape[1:])(training_setup.init_key(config.seed))
  entries = _entries(state.variables)
  net, torch_train_step = _torch_twin(
    config, split, state, entries, mean, std, batch_norm, kl_weight
  )
  jax_step = jax.jit(
    functools.partial(step_lib.train_step, model=model, settings=settings, optimizers=optimizers),
    static_argnames='phase',
  )
  inputs = jax.jit(
    functools.partial(
      _step_inputs, model=model, method=method, config=config, optimizers=optimizers
    ),
    static_argnames='phase',
  )
  steps_per_epoch = data.steps_per_epoch(split.num_examples, config.batch_size)
  records = []
  for k in range(steps):
    epoch = k // steps_per_epoch
    phase, lr, reg_weight = schedule.epoch_schedule(config, method, epoch)
    phase = dataclasses.replace(phase, noise=phase.noise and noise)
    batch = data.train_batch(
      split, seed=config.seed, epoch=epoch, step=k % steps_per_epoch, batch_size=config.batch_size
    )
    batch = jax.tree.map(jnp.asarray, batch)
    made = inputs(state, batch, reg_weight, lr, phase=phase)
    state, metrics = jax_step(state, batch, lr, reg_weight, phase=phase)
    torch_loss, torch_signs = _torch_step(
      torch_train_step, made, batch, entries, config, lr=lr, reg_weight=reg_weight, phase=phase
    )
    jax_loss = float(metrics['loss'])
    records.append(
      _step_record(
        k, epoch, lr, phase, state, jax_loss, net, entries, made, torch_loss, torch_signs
      )
    )
  return trajectory_report.run_report(config, batch_norm, records)


def _torch_twin(
  config: ml_collections.ConfigDict,
  split: data.HostSplit,
  state: Any,
  entries: dict,
  mean: Any,
  std: Any,
  batch_norm: str,
  kl_weight: float,
) -> tuple[Any, Any]:
  """(net, step): the authors' PyTorch network holding `state`'s variables, and its
  training step with `config`'s settings."""
  torch, _, torch_step = _torch_modules()
  image_shape = split.images.shape[1:]
  torch.manual_seed(config.seed)
  torch_model = torch_step.build_model(
    config.method,
    config.model.arch,
    num_classes=split.num_classes,
    width=config.model.width,
    image_size=image_shape[0],
    in_channels=image_shape[2],
    mean=mean,
    std=std,
    pni_mode=config.model.pni_mode,
    bnn_init_sigma=config.model.bnn_init_sigma,
    batch_norm=batch_norm,
  )
  net = torch_model[1]
  missing, unexpected = net.load_state_dict(
    {k: torch.from_numpy(v) for k, v in to_torch_state(state.variables, entries).items()},
    strict=False,
  )
  if unexpected or any(not k.endswith('num_batches_tracked') for k in missing):
    raise RuntimeError(
      f'Export to the PyTorch reference failed: missing {missing}, unexpected {unexpected}.'
    )
  return net, torch_step.make_train_step_for_config(torch_model, config, kl_weight)


def _to_torch_images(images: jax.Array) -> Any:
  """NHWC arrays as a torch NCHW tensor."""
  torch = _torch_modules()[0]
  return torch.from_numpy(np.array(images).transpose(0, 3, 1, 2))


def _torch_step(
  torch_train_step,
  made: dict[str, Any],
  batch: dict[str, jax.Array],
  entries: dict,
  config: ml_collections.ConfigDict,
  *,
  lr: float,
  reg_weight: float,
  phase: schedule.Phase,
) -> tuple[float, list]:
  """The PyTorch step on the inputs and draws our step uses: (its loss, the gradient
  sign of each PGD step)."""
  torch = _torch_modules()[0]
  draws = {'clean': torch_draws(made['draws']['clean'], entries)}
  torch_signs = []
  if phase.adversarial:
    draws['adv'] = torch_draws(made['draws']['adv'], entries)
    draws['pgd'] = [
      torch_draws(jax.tree.map(lambda d, i=i: d[i], made['draws']['pgd']), entries)
      for i in range(config.adv.steps)
    ]
  draws = jax.tree.map(torch.from_numpy, draws)
  loss = float(
    torch_train_step(
      _to_torch_images(made['x']),
      torch.from_numpy(np.asarray(batch['label'], np.int64)),
      lr=lr,
      reg_weight=reg_weight,
      noise=phase.noise,
      adversarial=phase.adversarial,
      train_perturb=phase.train_perturb,
      pgd_start=_to_torch_images(made['pgd_start']) if phase.adversarial else None,
      draws=draws,
      signs=torch_signs,
    )
  )
  return loss, torch_signs


def _step_record(
  k: int,
  epoch: int,
  lr: float,
  phase: schedule.Phase,
  state: train_state.TrainState,
  jax_loss: float,
  net: Any,
  entries: dict,
  made: dict[str, Any],
  torch_loss: float,
  torch_signs: list,
) -> dict[str, Any]:
  """Step k+1's record (trajectory_report.step_record) from both sides: our state and
  PGD signs, the PyTorch network's state and the signs its PGD recorded."""
  torch = _torch_modules()[0]
  ours = traverse_util.flatten_dict(jax.device_get(state.variables))
  theirs = from_torch_state(net.state_dict(), state.variables, entries)
  signs = None
  if phase.adversarial:
    ours_signs = np.asarray(made['pgd_signs']).transpose(0, 1, 4, 2, 3)
    signs = (ours_signs, torch.stack(torch_signs).numpy())
  return trajectory_report.step_record(
    k + 1, epoch, lr, phase, ours, theirs, (jax_loss, torch_loss), signs
  )


def _step_inputs(
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  reg_weight: jax.Array,
  lr: jax.Array,
  *,
  phase: schedule.Phase,
  model,
  method: methods.Method,
  config: ml_collections.ConfigDict,
  optimizers: dict,
) -> dict[str, Any]:
  """What `train_step` will use at `state`, made with its keys: the augmented batch,
  every pass's noise draws ('clean', 'adv', 'pgd' stacked over PGD steps), PGD's start
  and each PGD step's gradient sign."""
  keys = step_lib.step_keys(config.seed, state.step)
  x = data.augment(keys['augment'], batch['image'])
  alternates = method.noise_update is not None  # L2P's alternation.
  if alternates and phase.train_perturb and config.l2p.alternation == 'authors_code':
    # PGD comes after theta's step.
    g_reg = jax.grad(lambda p: -reg_weight * objectives.l2p_regularizer(p))(state.perturb)
    state = rules.descend(state, 'perturb', g_reg, lr, optimizers, config.l2p.theta_floor)

  def apply(inputs, key):
    return model.apply(
      state.variables,
      inputs,
      train=True,
      noise=phase.noise,
      rngs={'noise': key},
      mutable=['batch_stats', DRAWS],
    )

  def recorded(key):
    return apply(x, key)[1].get(DRAWS, {})

  clean_logits, updates = apply(x, keys['clean'])
  made = {'x': x, 'draws': {'clean': recorded(keys['clean'])}}
  if phase.adversarial:
    target = batch['label'] if config.adv.labels == 'true' else jnp.argmax(clean_logits, axis=-1)
    attack_logits = lambda inputs, key: apply(inputs, key)[0]  # noqa: E731
    if config.adv.attack_batchnorm == 'running':  # As step_lib.adversarial_examples.
      attacked = {**state.variables, 'batch_stats': updates['batch_stats']}
      attack_logits = lambda inputs, key: model.apply(  # noqa: E731
        attacked, inputs, train=False, noise=phase.noise, rngs={'noise': key}
      )
    start, noise_keys, signs, _ = pgd_trace(
      attack_logits,
      keys['pgd'],
      x,
      target,
      eps=config.adv.eps,
      steps=config.adv.steps,
      step_size=config.adv.step_size,
      random_start=config.adv.random_start,
    )
    made.update(pgd_start=start, pgd_signs=signs)
    made['draws'].update(adv=recorded(keys['adv']), pgd=jax.vmap(recorded)(noise_keys))
  return made
