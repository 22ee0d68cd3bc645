"""Training: configs, schedules, the five methods' steps, L2P's alternation, and the loop
end to end (outputs, resume after a kill, 1 vs 8 devices, errors) on a tiny config."""

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import fake_datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import step_passes
from configs import cifar as cifar_configs
from configs import eval as eval_configs
from l2p_jax import checkpointing, data, evaluation, experiment, methods
from l2p_jax.runtime import metrics, sharding
from l2p_jax.runtime.metrics import read_metrics
from l2p_jax.training import locking, loop, objectives, optim, rules, schedule, train_state
from l2p_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


get_config = cifar_configs.get_config


# --- configs and schedules --------------------------------------------------------


def test_config_defaults_follow_the_papers():
  l2p = get_config('l2p,resnet20,cifar10')
  assert (
    l2p.num_epochs,
    tuple(l2p.optim.lr_boundaries),
    l2p.optim.weight_decay,
    l2p.batch_size,
  ) == (350, (150, 250), 1e-4, 128)
  assert (l2p.l2p.noise_start_epoch, l2p.adv.start_epoch, l2p.l2p.gamma) == (10, 20, 1e-4)
  assert (l2p.adv.eps, l2p.adv.steps, l2p.adv.step_size) == (8 / 255, 7, 0.01)
  pni = get_config('pni,resnet18,cifar100')
  assert (
    pni.num_epochs,
    tuple(pni.optim.lr_boundaries),
    pni.optim.weight_decay,
    pni.adv.start_epoch,
    pni.model.arch,
    pni.data.dataset,
  ) == (160, (80, 120), 3e-4, 5, 'resnet18', 'cifar100')
  assert get_config('none').adv.start_epoch == -1
  assert get_config('adv_bnn').adv.steps == 10


def test_config_is_locked_and_bad_arguments_are_clear():
  config = get_config('tiny')
  with pytest.raises(AttributeError):
    config.optim.lr = 0.2  # A typo of optim.learning_rate.
  with pytest.raises(ValueError, match=r"Unknown method 'l2q'"):
    get_config('l2q,resnet20')
  with pytest.raises(ValueError, match='too many parts'):
    get_config('l2p,resnet20,cifar10,x')
  with pytest.raises(ValueError, match=r'METHOD,ARCH,DATASET\[,authors_code\]\[,tiny\]'):
    get_config('adv_bnn,resnet20,cifar10,code')


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('method', 'bnn', r"Unknown method 'bnn'"),
    ('model.arch', 'resnet19', r"Unknown architecture 'resnet19'"),
    ('model.dtype', 'float16', r"Unknown model.dtype 'float16'"),
    ('model.conv_input_gradient', 'eigen', r"Unknown model.conv_input_gradient 'eigen'"),
    ('adv.labels', 'gold', r"Unknown adv.labels 'gold'.*'prediction', 'true'"),
    ('l2p.alternation', 'joint', r"Unknown l2p.alternation 'joint'"),
    ('l2p.noise_start_epoch', 3, r'noise_start_epoch=3 must be in \[0, num_epochs=3\)'),
    ('optim.optimizer', 'rmsprop', r"Unknown optim.optimizer 'rmsprop'.*'sgd', 'adam'"),
    ('bnn.kl_scope', 'last', r"Unknown bnn.kl_scope 'last'.*'all', 'classifier'"),
    ('model.bnn_mean_init', 'zeros', r"Unknown model.bnn_mean_init 'zeros'"),
    ('adv.attack_batchnorm', 'eval', r"Unknown adv.attack_batchnorm 'eval'.*'running'"),
  ],
)
def test_invalid_config_values_name_field_and_choices(field, value, message):
  config = get_config('tiny')
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=message):
    experiment.validate_config(config)


def test_impossible_method_and_adversarial_combinations():
  config = get_config('none,resnet8,cifar10,tiny')
  config.adv.start_epoch = 0
  with pytest.raises(ValueError, match='method=none trains on clean images only'):
    experiment.validate_config(config)
  config = get_config('vanilla,resnet8,cifar10,tiny')
  config.adv.start_epoch = -1
  with pytest.raises(ValueError, match='method=vanilla needs adversarial training'):
    experiment.validate_config(config)


def test_regularizer_weight_is_gamma_over_harmonic_tau():
  config = get_config('l2p')  # noise from epoch 10, gamma 1e-4
  expected = {9: 0.0, 10: 1e-4, 11: 1e-4 / 1.5, 12: 1e-4 / (11 / 6), 13: 1e-4 / (25 / 12)}
  for epoch, weight in expected.items():
    assert schedule.regularizer_weight(config, methods.L2P, epoch) == pytest.approx(
      weight, rel=1e-12
    )
  assert objectives.harmonic_tau(10, 10) == 1.0
  with pytest.raises(ValueError, match='undefined before noise starts'):
    objectives.harmonic_tau(9, 10)
  assert schedule.regularizer_weight(get_config('pni'), methods.PNI, 50) == 0.0


def test_phases_switch_noise_and_adversarial_training_on_at_their_epochs():
  def phase(method, epoch):
    return schedule.phase_for_epoch(get_config(method), methods.get(method), epoch)

  assert phase('l2p', 9) == schedule.Phase(False, False, False)
  assert phase('l2p', 10) == schedule.Phase(True, False, True)
  assert phase('l2p', 20) == schedule.Phase(True, True, True)
  assert phase('pni', 4) == schedule.Phase(True, False, True)
  assert phase('pni', 5) == schedule.Phase(True, True, True)
  assert phase('vanilla', 0) == schedule.Phase(False, True, False)
  assert phase('none', 99) == schedule.Phase(False, False, False)


def test_a_new_randomized_method_trains_with_the_records_defaults(monkeypatch):
  """A user's sixth record (Gaussian input noise, say) names nothing but `randomized`:
  noise and its parameters from epoch 0, no regularizer, one joint update."""
  monkeypatch.setitem(methods._REGISTRY, 'gauss', methods.Method('gauss', 'Gauss', True))
  config = get_config('pni')
  config.method = 'gauss'
  gauss = methods.get('gauss')
  assert schedule.phase_for_epoch(config, gauss, 0) == schedule.Phase(True, False, True)
  assert schedule.regularizer_weight(config, gauss, 50) == 0.0
  settings = rules.StepSettings.from_config(config, gauss, kl_weight=0.0)
  rule = step_lib.update_rule(settings, schedule.phase_for_epoch(config, gauss, 0))
  assert (rule.func, rule.keywords) == (rules.joint_update, {'train_perturb': True})


@pytest.mark.parametrize(
  'choice,std0', [('dataset', 0.2470), ('l2p_code', 0.2023), ('pni_code', 63.0 / 255)]
)
def test_normalization_choices(choice, std0):
  config = get_config('tiny')
  config.data.normalization = choice
  split = data.HostSplit(
    'cifar10', 'train', np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int32), 10
  )
  mean, std = experiment.normalization(config, split)
  assert std[0] == pytest.approx(std0) and len(mean) == 3
  config.data.normalization = 'imagenet'
  with pytest.raises(ValueError, match=r"Unknown data.normalization 'imagenet'"):
    experiment.normalization(config, split)
  config.data.normalization, config.data.dataset = 'l2p_code', 'mnist'
  gray = data.HostSplit(
    'mnist', 'train', np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int32), 10
  )
  with pytest.raises(ValueError, match='has 3 channels but mnist images have 1'):
    experiment.normalization(config, gray)


def test_learning_rate_schedule():
  lrs = [optim.learning_rate(e, 0.1, (150, 250), 0.1) for e in (0, 149, 150, 249, 250)]
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001])


def test_weight_decay_is_masked_off_the_perturb_collection():
  optimizers = optim.make_optimizers(momentum=0.9, nesterov=True, weight_decay=0.1)
  variables = {
    'params': {'w': jnp.array([1.0, -2.0])},
    'perturb': {'theta': jnp.array([0.5, 0.25])},
  }
  for name, tree in variables.items():
    state = optimizers[name].init(tree)
    zero = jax.tree.map(jnp.zeros_like, tree)
    new, _ = optim.update(optimizers[name], zero, state, tree, lr=0.5)
    # Nesterov's first step moves by lr * (1 + momentum) * (grad + wd * w).
    expected = {'params': [1.0 - 0.5 * 1.9 * 0.1, -2.0 + 0.5 * 1.9 * 0.2], 'perturb': [0.5, 0.25]}[
      name
    ]
    np.testing.assert_allclose(jax.tree.leaves(new)[0], expected, rtol=1e-6)


# --- single steps of every method ------------------------------------------------

IMAGE = (8, 8, 3)


def batch(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return {
    'image': jnp.asarray(rng.integers(0, 256, (n, *IMAGE), dtype=np.uint8)),
    'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32),
  }


@functools.cache
def step_setup(method, alternation='paper'):
  """A tiny model, its state and its jitted step; every phase on from epoch 0."""
  config = get_config(f'{method},resnet8,cifar10,tiny')
  config.model.width = 0.25
  config.l2p.alternation = alternation
  if method != 'none':
    config.adv.start_epoch = 0
  model = experiment.build_model(config, methods.get(config.method), 10, (0.5,) * 3, (0.25,) * 3)
  optimizers = optim.make_optimizers(0.9, True, config.optim.weight_decay)
  state = train_state.create_train_state(model, optimizers, jax.random.key(0), IMAGE)
  kwargs = dict(
    model=model,
    settings=rules.StepSettings.from_config(config, methods.get(config.method), kl_weight=1e-3),
  )
  step = jax.jit(
    functools.partial(step_lib.train_step, optimizers=optimizers, **kwargs), static_argnames='phase'
  )
  return config, optimizers, state, step, kwargs


@pytest.mark.parametrize('method', ['none', 'vanilla', 'pni', 'adv_bnn', 'l2p'])
def test_every_method_trains_a_few_steps(method):
  config, _, state, step, _ = step_setup(method)
  phase = schedule.phase_for_epoch(config, methods.get(config.method), 0)
  new, sums = state, train_state.EpochMetrics.empty()
  for i in range(3):
    new, metrics = step(new, batch(i), 0.05, 1e-2, phase=phase)
    sums = sums.add(metrics)
  assert int(new.step) == 3 and int(sums.seen) == 48 and int(sums.nonfinite_step) == -1
  assert np.isfinite(float(sums.loss_sum))
  moved = lambda a, b: any(
    not np.array_equal(x, y)
    for x, y in zip(  # noqa: E731
      jax.tree.leaves(a), jax.tree.leaves(b)
    )
  )
  assert moved(state.params, new.params)
  assert moved(state.batch_stats, new.batch_stats)
  assert moved(state.perturb, new.perturb) == (method in ('pni', 'adv_bnn', 'l2p'))
  again = state
  for i in range(3):
    again, _ = step(again, batch(i), 0.05, 1e-2, phase=phase)
  chex.assert_trees_all_equal(new, again)  # Same state and data: the same bits.


def test_steps_on_a_split_kept_on_the_device_make_no_transfers():
  """With the split, the epoch's order and the epoch's scalars on the device, steps run
  under transfer_guard('disallow') (no host-device copy) and give the same bits as
  steps on the same batches gathered on the host."""
  config, optimizers, state, host_step, kwargs = step_setup('vanilla')
  phase = schedule.phase_for_epoch(config, methods.get(config.method), 0)
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(3)
  split = data.HostSplit(
    'toy',
    'train',
    num_classes=10,
    images=rng.integers(0, 256, (40, *IMAGE), dtype=np.uint8),
    labels=rng.integers(0, 10, 40).astype(np.int32),
  )
  device_step = jax.jit(
    functools.partial(
      step_lib.train_step_on_split,
      batch_size=16,
      batch_sharding=sharding.data_sharding(mesh),
      optimizers=optimizers,
      **kwargs,
    ),
    static_argnames='phase',
  )
  on_mesh = data.put_on_mesh(mesh, split)
  order = data.epoch_order_on_mesh(mesh, 4, 1, split.num_examples)
  lr, reg, epoch_start = sharding.replicate(mesh, (np.float32(0.05), np.float32(1e-2), np.int32(0)))
  state = sharding.replicate(mesh, jax.device_get(state))
  on_device = on_host = state
  with jax.transfer_guard('disallow'):
    for _ in range(2):
      on_device, _ = device_step(on_device, on_mesh, order, epoch_start, lr, reg, phase=phase)
  for i in range(2):
    batch = data.train_batch(split, seed=4, epoch=1, step=i, batch_size=16)
    on_host, _ = host_step(on_host, sharding.shard_batch(mesh, batch), 0.05, 1e-2, phase=phase)
  chex.assert_trees_all_equal(on_device, on_host)


@pytest.mark.parametrize('alternation', ['paper', 'authors_code'])
def test_l2p_alternation_moves_one_collection_at_a_time(alternation):
  """The step equals hand-composed SGD updates: in the paper's order, theta moves with
  W fixed and then W with the new theta fixed; in the authors' order, theta first
  steps on the regularizer alone, then W and theta step jointly on the loss alone."""
  config, optimizers, state, step, kwargs = step_setup('l2p', alternation)
  phase = schedule.Phase(noise=True, adversarial=False, train_perturb=True)  # PGD aside
  lr, reg, m, wd, floor = 0.05, 0.5, 0.9, config.optim.weight_decay, 0.01
  b = batch(7)
  # The authors' joint step is on the loss alone: the regularizer had its own step.
  objective = step_lib.step_loss_fn(
    state, b, reg if alternation == 'paper' else 0.0, phase=phase, **kwargs
  )
  grad = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))
  sgd1 = lambda v, g, decay=0.0: jax.tree.map(  # noqa: E731  first Nesterov step
    lambda v, g: v - lr * (1 + m) * (g + decay * v), v, g
  )
  floor_ = lambda t: jax.tree.map(lambda x: jnp.maximum(x, floor), t)  # noqa: E731
  w0, t0 = state.params, state.perturb
  if alternation == 'paper':
    (_, g_t), _ = grad(w0, t0)
    t1 = floor_(sgd1(t0, g_t))
    (g_w, _), _ = grad(w0, t1)  # W's gradient is taken at the NEW theta.
    w1 = sgd1(w0, g_w, wd)
  else:
    g_reg = jax.grad(lambda t: -reg * objectives.l2p_regularizer(t))(t0)
    t_half = floor_(sgd1(t0, g_reg))
    (g_w, g_t), _ = grad(w0, t_half)
    w1 = sgd1(w0, g_w, wd)
    # Second update of theta's momentum: trace = g + m * g_reg; step g + m * trace.
    t1 = floor_(jax.tree.map(lambda t, g, r: t - lr * (g + m * (g + m * r)), t_half, g_t, g_reg))
  new, _ = step(state, b, lr, reg, phase=phase)
  chex.assert_trees_all_close((new.perturb, new.params), (t1, w1), rtol=2e-5, atol=2e-7)
  # The two orders really differ, so the test can tell them apart.
  assert not np.allclose(jax.tree.leaves(new.perturb)[0], jax.tree.leaves(t0)[0])


def test_paper_passes_compute_what_they_need_only():
  """The compiled L2P step read by benchmarks/step_passes.py (ResNet-8, PGD-2): kernel
  gradients in the W pass only, one per convolution of its clean and adversarial pass;
  PGD's convolutions counted by its loop's turns; no noise drawn in the W pass."""
  config, optimizers, state, _, kwargs = step_setup('l2p')
  phase = schedule.phase_for_epoch(config, methods.get(config.method), 0)
  train_step = functools.partial(step_lib.train_step, optimizers=optimizers, **kwargs)
  lowered = jax.jit(train_step, static_argnames='phase').lower(
    state, batch(5), 0.05, 0.5, phase=phase
  )
  # A cached executable keeps the op names it was compiled with: compile afresh.
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    counts = step_passes.profile_hlo(lowered.compile().as_text())
  finally:
    jax.config.update('jax_enable_compilation_cache', True)
  kernel = {k: v for k, v in counts['convolutions'].items() if k.endswith('kernel gradient')}
  assert kernel == {'W pass / kernel gradient': 2 * 7}
  assert counts['convolutions']['theta pass: pgd / forward'] == config.adv.steps * 7
  assert counts['rng_loops'].get('W pass', 0) == 0
  # PGD's noise is drawn ahead of its loop (adv.draw_noise_ahead), none inside it.
  assert counts['rng_loops'].get('theta pass: pgd', 0) == 0 < counts['rng_loops']['theta pass']


@pytest.mark.parametrize('method,attack_batchnorm', [('l2p', 'batch'), ('adv_bnn', 'running')])
def test_noise_drawn_ahead_or_at_each_call_gives_the_same_steps(method, attack_batchnorm):
  """adv.draw_noise_ahead changes how PGD's steps draw their noise, not the step: the
  same draws, so the same states up to float32 rounding (equal bits here), with PGD in
  training mode or on the running statistics."""
  config, optimizers, state, step, kwargs = step_setup(method)
  phase = schedule.phase_for_epoch(config, methods.get(config.method), 0)
  assert kwargs['settings'].draw_noise_ahead and phase.noise and phase.adversarial

  def jitted(ahead):
    settings = dataclasses.replace(
      kwargs['settings'], draw_noise_ahead=ahead, attack_batchnorm=attack_batchnorm
    )
    return jax.jit(
      functools.partial(
        step_lib.train_step, optimizers=optimizers, model=kwargs['model'], settings=settings
      ),
      static_argnames='phase',
    )

  if attack_batchnorm == kwargs['settings'].attack_batchnorm:
    steps = (step, jitted(False))
  else:
    steps = (jitted(True), jitted(False))
  runs = []
  for run in steps:
    new = state
    for i in range(2):
      new, metrics = run(new, batch(i), 0.05, 1e-2, phase=phase)
    runs.append((new, metrics))
  chex.assert_trees_all_close(*runs, rtol=1e-6, atol=1e-7)
  moved = jax.tree.leaves(runs[0][0].perturb)[0], jax.tree.leaves(state.perturb)[0]
  assert not np.array_equal(*moved)  # Two real steps, with the noise on.


def test_each_half_step_leaves_the_other_collection_and_its_momentum_alone():
  _, optimizers, state, _, _ = step_setup('l2p')
  ones = lambda tree: jax.tree.map(jnp.ones_like, tree)  # noqa: E731
  theta_step = rules.descend(state, 'perturb', ones(state.perturb), 0.1, optimizers, 0.01)
  chex.assert_trees_all_equal(
    (theta_step.params, theta_step.opt_state['params']), (state.params, state.opt_state['params'])
  )
  assert not np.array_equal(
    jax.tree.leaves(theta_step.perturb)[0], jax.tree.leaves(state.perturb)[0]
  )
  w_step = rules.descend(theta_step, 'params', ones(state.params), 0.1, optimizers, 0.01)
  chex.assert_trees_all_equal(
    (w_step.perturb, w_step.opt_state['perturb']),
    (theta_step.perturb, theta_step.opt_state['perturb']),
  )
  assert not np.array_equal(jax.tree.leaves(w_step.params)[0], jax.tree.leaves(state.params)[0])


def test_theta_floor_holds_after_updates():
  config, _, state, step, _ = step_setup('l2p')
  low = state.replace(perturb=jax.tree.map(lambda t: jnp.full_like(t, 0.011), state.perturb))
  new, _ = step(
    low, batch(3), 5.0, 0.0, phase=schedule.phase_for_epoch(config, methods.get(config.method), 0)
  )
  leaves = jax.tree.leaves(new.perturb)
  assert min(float(t.min()) for t in leaves) == pytest.approx(0.01)
  assert any(float(t.min()) == np.float32(0.01) for t in leaves)


# --- the loop end to end ------------------------------------------------------------


@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
  return fake_datasets.write_cifar10(tmp_path_factory.mktemp('cifar'), train=512, test=128)


def tiny(cifar_dir, method='l2p', **fields):
  config = get_config(f'{method},resnet8,cifar10,tiny')
  config.data.source = 'local'
  config.data.local_dir = str(cifar_dir)
  config.progress_bar = False
  config.update_from_flattened_dict({k.replace('__', '.'): v for k, v in fields.items()})
  return config


@pytest.fixture(scope='module')
def reference_run(cifar_dir, tmp_path_factory):
  """The tiny L2P config trained uninterrupted: 3 epochs of 8 steps."""
  workdir = tmp_path_factory.mktemp('reference')
  state = loop.train_and_evaluate(tiny(cifar_dir), str(workdir))
  return workdir, state


def test_run_leaves_config_checkpoints_metrics_tensorboard_and_plot(reference_run):
  workdir, state = reference_run
  assert int(state.step) == 24
  assert json.loads((workdir / 'config.json').read_text())['method'] == 'l2p'
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['20', '24']
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert (workdir / 'noise_evolution.png').stat().st_size > 10_000
  records = read_metrics(workdir / 'metrics.jsonl')
  assert [r['epoch'] for r in records] == [0, 1, 2]
  for r in records:
    assert {'learning_rate', 'train_loss', 'eval_clean_accuracy', 'eval_pgd_accuracy'} <= set(r)
    assert len(r['noise']) == 4  # stem + 3 blocks of resnet8
    for stats in r['noise'].values():
      assert stats['min'] <= stats['mean'] <= stats['max'] and stats['min'] >= 0.01
  assert [r['learning_rate'] for r in records] == pytest.approx([0.1, 0.1, 0.01])


def test_loss_goes_down_on_a_learnable_set(reference_run):
  records = read_metrics(reference_run[0] / 'metrics.jsonl')
  assert records[-1]['train_loss'] < 0.5 * records[0]['train_loss']
  assert records[-1]['eval_clean_accuracy'] > 0.5  # chance is 0.1


def restore_state(workdir, step):
  checkpoints = checkpointing.Checkpoints(str(workdir / 'checkpoints'), read_only=True)
  state, meta = checkpoints.restore(step)
  checkpoints.close()
  return state, meta


def train_command(cifar_dir, workdir):
  return [
    sys.executable,
    str(ROOT / 'train.py'),
    '--config',
    f'{ROOT}/configs/cifar.py:l2p,resnet8,cifar10,tiny',
    '--workdir',
    str(workdir),
    '--config.data.source=local',
    f'--config.data.local_dir={cifar_dir}',
    '--config.progress_bar=False',
    '--cpu_devices=1',  # The device count of the in-process reference run.
  ]


def test_killed_run_resumes_bit_identical(reference_run, cifar_dir, tmp_path):
  """SIGKILL mid-epoch 1 once a checkpoint exists, rerun, and compare with the
  uninterrupted run: every variable, optimizer state and metric the same. The killed
  run takes its batches from the host, the rerun and the reference from the split
  kept on the device, so this also shows the two input paths give the same bits."""
  workdir = tmp_path / 'killed'
  command = train_command(cifar_dir, workdir)
  process = subprocess.Popen(
    command + ['--config.data.on_device=False'],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  deadline = time.time() + 240
  while not (workdir / 'checkpoints' / '12').exists():
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert steps and steps[-1] < 24, steps  # Killed before the end.
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from' in result.stdout + result.stderr
  resumed, meta = restore_state(workdir, 24)
  reference, _ = restore_state(reference_run[0], 24)
  chex.assert_trees_all_equal(resumed, reference)
  assert meta['config']['method'] == 'l2p'
  drop_time = lambda rs: [
    {k: v for k, v in r.items() if k != 'epoch_seconds'}  # noqa
    for r in rs
  ]
  assert drop_time(read_metrics(workdir / 'metrics.jsonl')) == drop_time(
    read_metrics(reference_run[0] / 'metrics.jsonl')
  )


def test_checkpoint_of_another_model_is_refused(reference_run, cifar_dir):
  workdir, _ = reference_run
  with pytest.raises(
    checkpointing.CheckpointMismatchError,
    match=r'(?s)model.width: checkpoint has 0.5, config has 1.0.*--workdir',
  ):
    loop.train_and_evaluate(tiny(cifar_dir, model__width=1.0), str(workdir))


def copy_run(reference_run, tmp_path):
  """A copy of the finished reference workdir, to damage or resume."""
  return pathlib.Path(shutil.copytree(reference_run[0], tmp_path / 'copy'))


def saved_steps(workdir):
  return sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())


def test_divergence_stops_naming_the_last_good_checkpoint_and_keeps_it(cifar_dir, tmp_path):
  """lr 1e6 from epoch 1 (lr_decay 1e7): the state goes NaN where the loss may stay
  finite; the run stops, and the checkpoints it kept are all finite."""
  config = tiny(cifar_dir, num_epochs=2, optim__lr_boundaries=(1,), optim__lr_decay=1e7)
  with pytest.raises(
    loop.NonFiniteLossError,
    match=r'train state .* at step (8|9|10|11)\. Last good checkpoint: '
    r'.*checkpoints/8\.',
  ):
    loop.train_and_evaluate(config, str(tmp_path))
  assert saved_steps(tmp_path) == [4, 8]  # Nothing written after it went bad.
  for step in (4, 8):
    state, _ = restore_state(tmp_path, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state)), step


@pytest.mark.parametrize('moment', ['record', 'checkpoint'])
def test_interrupt_at_an_epochs_end_loses_no_record(cifar_dir, tmp_path, monkeypatch, moment):
  """Ctrl-C while the epoch's record is written, or while its checkpoint (step 8) is
  saved after it: one line names the step a rerun resumes from (4), and the rerun
  leaves the epoch's record exactly once."""
  config = tiny(cifar_dir, num_epochs=1)
  if moment == 'record':
    monkeypatch.setattr(metrics.MetricsWriter, 'epoch', lambda *_: _interrupt())
  else:
    save = checkpointing.Checkpoints.save
    monkeypatch.setattr(
      checkpointing.Checkpoints,
      'save',
      lambda self, step, *a: save(self, step, *a) if step != 8 else _interrupt(),
    )
  with pytest.raises(
    loop.TrainingInterrupted,
    match=r'^interrupted; rerun the same command to resume from step '
    r'4\.$',
  ):
    loop.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  loop.train_and_evaluate(config, str(tmp_path))
  assert [r['epoch'] for r in read_metrics(tmp_path / 'metrics.jsonl')] == [0]


def _interrupt():
  raise KeyboardInterrupt


def test_resume_refuses_a_changed_step_and_keeps_the_original_config(
  reference_run, cifar_dir, tmp_path, caplog
):
  workdir = copy_run(reference_run, tmp_path)
  original = (workdir / 'config.json').read_text()
  with pytest.raises(
    checkpointing.CheckpointMismatchError,
    match=r'(?s)batch_size: checkpoint has 64, config has 32.*--workdir',
  ):
    loop.train_and_evaluate(tiny(cifar_dir, batch_size=32), str(workdir))
  # Another learning rate is accepted, said, and kept beside the original config.
  loop.train_and_evaluate(tiny(cifar_dir, optim__learning_rate=0.05), str(workdir))
  assert 'optim.learning_rate: checkpoint has 0.1, config has 0.05' in caplog.text
  assert (workdir / 'config.json').read_text() == original
  changed = json.loads((workdir / 'config.24.json').read_text())
  assert changed['optim']['learning_rate'] == 0.05


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(
  reference_run, cifar_dir, tmp_path, caplog
):
  """A truncated file in checkpoint 24: eval.py's loader and the resumed run take 20,
  naming 24; the rerun redoes steps 20-24 to the reference's bits."""
  workdir = copy_run(reference_run, tmp_path)
  broken = workdir / 'checkpoints' / '24'
  victim = max(
    (p for p in (broken / 'state').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size
  )
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  assert checkpointing.load_checkpoint(str(workdir)).step == 20
  assert f'{broken} is unreadable' in caplog.text
  with pytest.raises(checkpointing.CheckpointUnreadableError, match='No readable checkpoint in'):
    checkpointing.load_checkpoint(str(broken))  # Named explicitly: one message.
  loop.train_and_evaluate(tiny(cifar_dir), str(workdir))
  assert (workdir / 'unreadable_checkpoints' / '24' / 'state').is_dir()
  chex.assert_trees_all_equal(restore_state(workdir, 24)[0], restore_state(reference_run[0], 24)[0])


def test_a_second_run_on_a_workdir_is_refused_but_a_stale_lock_is_not(
  reference_run, cifar_dir, tmp_path
):
  workdir = copy_run(reference_run, tmp_path)
  with locking.WorkdirLock(str(workdir)):  # A first run, alive.
    result = subprocess.run(
      train_command(cifar_dir, workdir), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
  assert result.returncode == 1, result.stderr[-3000:]
  assert f'is in use by another training run (pid {os.getpid()} on host ' in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith('train.py: ')
  assert 'Traceback' not in result.stderr
  # A run killed long ago leaves its name in the file but holds no lock.
  (workdir / 'lock').write_text('pid 999999999 on host gone\n')
  loop.train_and_evaluate(tiny(cifar_dir), str(workdir))


def sharded_step_result(path):
  """One L2P step (PGD on) on a fixed 64-image batch split over every device;
  saves the new variables, flattened, to `path`."""
  config, optimizers, _, _, kwargs = step_setup('l2p')
  mesh = sharding.make_mesh()
  state = jax.jit(
    lambda k: train_state.create_train_state(kwargs['model'], optimizers, k, IMAGE),
    out_shardings=sharding.replicated_sharding(mesh),
  )(jax.random.key(0))
  step = jax.jit(
    functools.partial(step_lib.train_step, optimizers=optimizers, **kwargs), static_argnames='phase'
  )
  new, _ = step(
    state,
    sharding.shard_batch(mesh, jax.device_get(batch(1, n=64))),
    0.1,
    1e-4,
    phase=schedule.phase_for_epoch(config, methods.get(config.method), 0),
  )
  np.save(
    path,
    np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves((new.params, new.perturb, new.batch_stats))]
    ),
  )


def test_one_and_eight_devices_agree(cifar_dir, tmp_path):
  """The same step and the same run on 8 simulated CPU devices (batch split 8 ways)
  match 1 device: one step to float rounding, a whole epoch to a looser tolerance."""
  sharded_step_result(tmp_path / 'step1.npy')
  one = loop.train_and_evaluate(tiny(cifar_dir, num_epochs=1), str(tmp_path / 'one'))
  script = (
    'import sys; sys.path.insert(0, {!r})\n'
    'import jax; assert jax.device_count() == 8\n'
    'from test_train import tiny, sharded_step_result\n'
    'from l2p_jax.training import loop\n'
    'sharded_step_result({!r})\n'
    'loop.train_and_evaluate(tiny({!r}, num_epochs=1), {!r})\n'
  ).format(
    str(ROOT / 'tests'), str(tmp_path / 'step8.npy'), str(cifar_dir), str(tmp_path / 'eight')
  )
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run(
    [sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
  )
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_allclose(
    np.load(tmp_path / 'step8.npy'), np.load(tmp_path / 'step1.npy'), rtol=0, atol=1e-6
  )
  eight, _ = restore_state(tmp_path / 'eight', 8)
  # Over 8 steps at lr 0.1 the rounding differences grow (PGD's sign steps flip
  # where a gradient is near zero) to ~6e-4 (a BN bias) and 0.2% (a running var); one step
  # agrees to 1e-6 above.
  chex.assert_trees_all_close(
    (one.params, one.perturb, one.batch_stats),
    (eight['params'], eight['perturb'], eight['batch_stats']),
    rtol=5e-3,
    atol=2e-3,
  )


# --- small mistakes, one clear message each ----------------------------------------


def _tiny_mistake(**fields):
  config = get_config('tiny')
  config.update_from_flattened_dict({k.replace('__', '.'): v for k, v in fields.items()})
  experiment.validate_config(config)


def _truncated_idx(tmp_path):
  (tmp_path / 'train-images-idx3-ubyte').write_bytes(
    bytes([0, 0, 8, 3]) + np.array([5, 4, 4], '>u4').tobytes() + bytes(30)
  )
  data.load_split('fashion_mnist', 'train', source='local', local_dir=str(tmp_path))


def _not_a_torch_checkpoint(tmp_path):
  pytest.importorskip('torch')
  from l2p_jax.interop import import_torch_checkpoint

  (tmp_path / 'notes.pth').write_text('not a checkpoint')
  import_torch_checkpoint(
    str(tmp_path / 'notes.pth'), arch='resnet8', num_classes=10, method='none'
  )


def _export_onto_a_file(tmp_path):
  pytest.importorskip('torch')
  from l2p_jax.interop import convert

  (tmp_path / 'taken.pth').write_text('keep me')
  convert.workdir_to_torch(str(tmp_path), str(tmp_path / 'taken.pth'), 'l2p')


def _eval_eps(tmp_path):
  config = eval_configs.get_config('tiny')
  config.eps = -0.1
  evaluation.validate_config(config)


@pytest.mark.parametrize(
  'mistake,error,message',
  [
    (
      lambda _: get_config('l2p,resnet7,cifar10,tiny'),
      ValueError,
      r"Unknown architecture 'resnet7'",
    ),
    (
      lambda _: _tiny_mistake(optim__learning_rate=-0.1),
      experiment.ConfigError,
      r'optim.learning_rate must be positive, got -0.1',
    ),
    (
      lambda _: _tiny_mistake(model__width=0.01),
      experiment.ConfigError,
      r'model.width=0.01: Width multiplier 0.01 leaves a resnet8 layer of 16 channels '
      r'with none; use a width of at least 0.0625',
    ),
    (
      _truncated_idx,
      data.DatasetFileError,
      r'train-images-idx3-ubyte is truncated or not an idx file: 46 bytes, but its '
      r'header describes 96 \(5x4x4\)',
    ),
    (
      lambda tmp_path: data.load_split(
        'cifar10', 'train', source='local', local_dir=str(ROOT / 'README.md')
      ),
      data.DatasetNotFoundError,
      r'data.local_dir=.*README.md is a file; it must be the '
      r'folder holding cifar-10-python.tar.gz',
    ),
    (_eval_eps, evaluation.EvaluationError, r'config.eps=-0.1 must be at least 0\.'),
    (
      _not_a_torch_checkpoint,
      ValueError,
      r"notes.pth' is not a PyTorch state dict checkpoint that loads without running code",
    ),
    (_export_onto_a_file, FileExistsError, r'taken.pth exists; pass --overwrite'),
  ],
  ids=[
    'tiny_arch',
    'learning_rate',
    'width',
    'idx',
    'local_dir',
    'eval_eps',
    'torch_file',
    'export',
  ],
)
def test_small_mistakes_are_one_clear_message(mistake, error, message, tmp_path):
  with pytest.raises(error, match=message) as raised:
    mistake(tmp_path)
  assert 'weights_only=False' not in str(raised.value)


def test_tiny_keeps_an_explicit_arch():
  assert get_config('l2p,resnet20,cifar10,tiny').model.arch == 'resnet20'
  assert get_config('l2p,tiny').model.arch == 'resnet8'


def test_a_mistyped_override_is_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      str(ROOT / 'train.py'),
      '--config',
      f'{ROOT}/configs/cifar.py:tiny',
      '--workdir',
      str(tmp_path),
      '--config.optim.lr=0.2',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    "train.py: --config.optim.lr: the config has no field 'lr'; check the spelling "
    'against the config file.'
  )  # ml_collections suggests nothing for 'lr'.
  assert 'Traceback' not in result.stderr
