"""Adv-BNN as its paper and as its code define it: which layers' KL enter the loss, the
N of alpha/N, the code's Adam with restarts, Bayesian BatchNorm, parameter counts,
and the authors' 50-draw prediction rule as the evaluation default."""

import functools

import fake_datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from networks import create_model

from configs import cifar as cifar_configs
from configs import eval as eval_configs
from l2p_jax import checkpointing, data, evaluation, experiment, methods
from l2p_jax.evaluation import prediction
from l2p_jax.models import bnn_kl
from l2p_jax.runtime import sharding
from l2p_jax.runtime.metrics import read_metrics
from l2p_jax.training import loop, optim, rules, schedule, train_state
from l2p_jax.training import step as step_lib

IMAGE = (8, 8, 3)


get_config, get_eval_config = cifar_configs.get_config, eval_configs.get_config


def numpy_kl(mean, log_sigma, prior_sigma):
  """KL(N(mean, sigma^2) || N(0, prior^2)) summed, written out in NumPy."""
  mean, log_sigma = np.asarray(mean, np.float64), np.asarray(log_sigma, np.float64)
  sigma2 = np.exp(2 * log_sigma)
  return np.sum(np.log(prior_sigma) - log_sigma + (sigma2 + mean**2) / (2 * prior_sigma**2) - 0.5)


def bnn_variables(batchnorm, sigma=0.08, width=0.25):
  model = create_model(
    'resnet8', 10, 'adv_bnn', width=width, bnn_init_sigma=sigma, bnn_batchnorm=batchnorm
  )
  variables = jax.jit(
    lambda: model.init(
      {'params': jax.random.key(0), 'noise': jax.random.key(1)}, jnp.zeros((2, *IMAGE)), train=True
    )
  )()
  # Spread the log-sigmas so that a wrong pairing of mean and sigma shows.
  perturb = jax.tree.map(
    lambda v: v + 0.3 * jax.random.normal(jax.random.key(v.size), v.shape), variables['perturb']
  )
  return model, {**variables, 'perturb': perturb}


def kl_by_layer(variables, prior_sigma):
  """{layer path: KL of its Bayesian weights}, pairing names by hand."""
  params = traverse_util.flatten_dict(variables['params'])
  layers = {}
  for path, log_sigma in traverse_util.flatten_dict(variables['perturb']).items():
    mean = params[path[:-1] + (path[-1].removesuffix('_log_sigma'),)]
    layers.setdefault(path[:-1], 0.0)
    layers[path[:-1]] += numpy_kl(mean, log_sigma, prior_sigma)
  return layers


@pytest.mark.parametrize('batchnorm', [False, True])
def test_kl_scope_picks_exactly_which_layers_enter(batchnorm):
  _, variables = bnn_variables(batchnorm)
  layers = kl_by_layer(variables, 0.08)
  bn_layers = [p for p in layers if p[-1].endswith('bn')]
  assert bool(bn_layers) == batchnorm  # Bayesian BatchNorm layers carry a KL too.
  every = sum(layers.values())
  classifier = layers[('classifier',)]
  args = (variables['params'], variables['perturb'], 0.08)
  np.testing.assert_allclose(bnn_kl(*args, scope='all'), every, rtol=1e-5)
  np.testing.assert_allclose(bnn_kl(*args, scope='classifier'), classifier, rtol=1e-5)
  assert classifier < every / 5  # The scopes are far apart, not a rounding apart.
  with pytest.raises(ValueError, match=r"Unknown KL scope 'last'.*'all', 'classifier'"):
    bnn_kl(*args, scope='last')


@functools.cache
def objective_of(scope):
  """The training objective of one adv_bnn step (no PGD) as f(params, perturb,
  kl_weight), for a model with Bayesian BatchNorm."""
  config = get_config('adv_bnn,resnet8,cifar10,tiny')
  config.bnn.kl_scope = scope
  config.model.width, config.model.bnn_batchnorm = 0.25, True
  model, variables = bnn_variables(True)
  optimizers = optim.make_optimizers(0.9, True, 0.0)
  state = train_state.create_train_state(model, optimizers, jax.random.key(0), IMAGE)
  state = state.replace(params=variables['params'], perturb=variables['perturb'])
  phase = schedule.Phase(noise=True, adversarial=False, train_perturb=True)

  def objective(params, perturb, kl_weight):
    settings = rules.StepSettings.from_config(config, methods.get(config.method), kl_weight)
    return step_lib.step_loss_fn(state, batch(), 0.0, phase=phase, model=model, settings=settings)(
      params, perturb
    )[0]

  return jax.jit(objective, static_argnames='kl_weight'), variables


@pytest.mark.parametrize('scope', ['all', 'classifier'])
def test_training_loss_adds_the_scoped_kl_at_its_weight(scope):
  objective, variables = objective_of(scope)
  args = (variables['params'], variables['perturb'])
  added = float(objective(*args, 1e-3)) - float(objective(*args, 0.0))
  layers = kl_by_layer(variables, 0.08)
  expected = sum(layers.values()) if scope == 'all' else layers[('classifier',)]
  np.testing.assert_allclose(added, 1e-3 * expected, rtol=1e-4)


def test_kl_weight_is_alpha_over_the_whole_training_split(tmp_path):
  cifar = fake_datasets.write_cifar10(tmp_path, train=60, test=10)
  config = get_config('adv_bnn,resnet8,cifar10,tiny')
  config.data.source, config.data.local_dir = 'local', str(cifar)
  config.data.train_examples, config.data.eval_examples = 20, 10
  config.batch_size = 20  # At most the training examples.
  train_split, _, full_size = experiment.load_data(config)
  assert (train_split.num_examples, full_size) == (20, 60)
  assert step_lib.kl_loss_weight(config, full_size) == 1 / 60  # Not 1/20: same prior.
  config.bnn.kl_alpha = 0.02
  assert step_lib.kl_loss_weight(config, full_size) == pytest.approx(0.02 / 60)
  config.bnn.kl_examples = 1000
  assert step_lib.kl_loss_weight(config, full_size) == pytest.approx(0.02 / 1000)
  config.bnn.kl_examples = 0
  with pytest.raises(ValueError, match=r'bnn.kl_examples=0 positive'):
    experiment.validate_config(config)


def test_authors_code_variant_sets_every_field_the_code_differs_in():
  paper = get_config('adv_bnn,resnet20,cifar10')
  code = get_config('adv_bnn,resnet20,cifar10,authors_code')
  assert (
    paper.bnn.kl_scope,
    paper.optim.optimizer,
    paper.model.bnn_batchnorm,
    paper.adv.clean_weight,
    paper.adv.random_start,
  ) == ('all', 'sgd', False, 0.5, True)
  assert (
    code.bnn.kl_scope,
    code.optim.optimizer,
    code.optim.learning_rate,
    tuple(code.optim.lr_boundaries),
    code.num_epochs,
    code.optim.restart_at_boundaries,
    code.optim.weight_decay,
  ) == ('classifier', 'adam', 0.01, (80, 140, 180), 200, True, 0.0)
  assert (code.model.bnn_mean_init, code.model.bnn_batchnorm) == ('adv_bnn_code', True)
  assert (
    code.adv.clean_weight,
    code.adv.adv_weight,
    code.adv.labels,
    code.adv.steps,
    code.adv.step_size,
    code.adv.random_start,
    code.adv.attack_batchnorm,
  ) == (0.0, 1.0, 'true', 10, 0.007, False, 'running')
  assert code.bnn.kl_examples is None and paper.bnn.kl_examples is None
  with pytest.raises(ValueError, match=r'authors_code .* applies to adv_bnn only'):
    get_config('l2p,resnet20,cifar10,authors_code')


def test_adv_bnn_code_init_is_uniform_fan_in_and_batchnorm_scale_uniform():
  model = create_model(
    'resnet8', 10, 'adv_bnn', width=1, bnn_mean_init='adv_bnn_code', bnn_batchnorm=True
  )
  variables = model.init(
    {'params': jax.random.key(0), 'noise': jax.random.key(1)}, jnp.zeros((1, *IMAGE))
  )
  params = traverse_util.flatten_dict(variables['params'])
  conv = np.asarray(params[('stage1_block1', 'conv1', 'kernel')])  # fan_in 3*3*16
  assert np.abs(conv).max() <= 1 / 12 and np.abs(conv).max() > 0.95 / 12
  np.testing.assert_allclose(conv.std(), 1 / 12 / np.sqrt(3), rtol=0.05)
  dense = np.asarray(params[('classifier', 'bias')])  # fan_in 64
  assert np.abs(dense).max() <= 1 / 8 and np.any(dense != 0)
  scale = np.asarray(params[('stage1_block1', 'bn1', 'scale')])
  assert 0 <= scale.min() and scale.max() < 1 and len(set(scale.tolist())) == 16
  assert not np.any(np.asarray(params[('stage1_block1', 'bn1', 'bias')]))
  assert ('stage1_block1', 'bn1', 'stats', 'mean') in traverse_util.flatten_dict(
    variables['batch_stats']
  )


@pytest.mark.parametrize(
  'arch,params,perturb_plain_bn,batch_stats',
  [('resnet20', 269_722, 268_346, 1_376), ('resnet18', 11_173_962, 11_164_362, 9_600)],
)
def test_bayesian_model_parameter_counts(arch, params, perturb_plain_bn, batch_stats):
  """Means as many as the plain network's weights; one log-sigma per conv and dense
  weight and bias, plus one per BatchNorm scale and bias when BatchNorm is Bayesian."""
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  for batchnorm, perturb in ((False, perturb_plain_bn), (True, params)):
    model = create_model(arch, 10, 'adv_bnn', bnn_batchnorm=batchnorm)
    shapes = jax.eval_shape(
      lambda m=model: m.init(
        {'params': jax.random.key(0), 'noise': jax.random.key(1)},
        jnp.zeros((1, 32, 32, 3)),
        train=True,
      )
    )
    assert (count(shapes['params']), count(shapes['perturb']), count(shapes['batch_stats'])) == (
      params,
      perturb,
      batch_stats,
    )


# --- the code's optimizer --------------------------------------------------------


def batch(seed=0, n=8):
  rng = np.random.default_rng(seed)
  return {
    'image': jnp.asarray(rng.integers(0, 256, (n, *IMAGE), dtype=np.uint8)),
    'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32),
  }


def numpy_adam(grads, lr, restart_before=()):
  """Parameter moves of torch.optim.Adam (betas 0.9/0.999, eps 1e-8) for a gradient
  sequence, with a new optimizer (zero moments, count 1) before each step listed."""
  m = v = 0.0
  t, moves = 0, []
  for i, g in enumerate(grads):
    if i in restart_before:
      m = v = 0.0
      t = 0
    t += 1
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    moves.append(-lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8))
  return moves


@pytest.mark.parametrize('restart', [False, True])
def test_authors_code_steps_are_hand_composed_adam_steps(restart):
  """Two steps of the code's variant (eps 0, so the adversarial batch is the batch)
  against Adam written out on gradients of the code's loss: the adversarial
  cross-entropy plus alpha/N times the classifier's KL; restarted, the second step
  is a first Adam step again."""
  config = get_config('adv_bnn,resnet8,cifar10,authors_code,tiny')
  config.model.width, config.adv.eps = 0.25, 0.0
  model = experiment.build_model(config, methods.get(config.method), 10, (0.5,) * 3, (0.25,) * 3)
  optimizers = optim.make_optimizers(0.9, True, 0.0, 'adam')
  state = train_state.create_train_state(model, optimizers, jax.random.key(0), IMAGE)
  phase = schedule.phase_for_epoch(config, methods.get(config.method), 0)
  assert phase == schedule.Phase(noise=True, adversarial=True, train_perturb=True)
  kl_weight, lr = 0.5, 0.01
  step = jax.jit(
    functools.partial(
      step_lib.train_step,
      phase=phase,
      model=model,
      settings=rules.StepSettings.from_config(config, methods.get(config.method), kl_weight),
      optimizers=optimizers,
    )
  )

  def code_loss(params, perturb, batch_stats, b, step_index):
    keys = step_lib.step_keys(config.seed, step_index)
    x = data.augment(keys['augment'], b['image'])
    logits, updates = model.apply(
      {'params': params, 'perturb': perturb, 'batch_stats': batch_stats},
      x,
      train=True,
      noise=True,
      rngs={'noise': keys['adv']},
      mutable=['batch_stats'],
    )
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b['label'][:, None], 1))
    return ce + kl_weight * bnn_kl(params, perturb, 0.08, 'classifier'), updates

  grad_fn = jax.jit(jax.grad(code_loss, argnums=(0, 1), has_aux=True))
  start, grads, new = state, [], state
  for i in range(2):
    if restart and i == 1:
      new = train_state.restart_optimizers(new, optimizers)
    (g_params, g_perturb), updates = grad_fn(new.params, new.perturb, new.batch_stats, batch(i), i)
    grads.append((g_params, g_perturb))
    new, _ = step(new, batch(i), jnp.float32(lr), jnp.float32(0.0))
    # BatchNorm moved by the adversarial batch alone (the clean pass leaves it).
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
      new.batch_stats,
      updates['batch_stats'],
    )
  for c, collection in enumerate(('params', 'perturb')):
    for path, value in traverse_util.flatten_dict(getattr(new, collection)).items():
      sequence = [np.asarray(traverse_util.flatten_dict(g[c])[path], np.float64) for g in grads]
      moves = numpy_adam(sequence, lr, restart_before=(1,) if restart else ())
      initial = np.asarray(traverse_util.flatten_dict(getattr(start, collection))[path])
      # Adam moves a weight whose gradient is rounding noise around 0 by up to
      # lr * |g| / (|g| + 1e-8): atol allows 0.2% of a step for those, far below the
      # 3x of a missing bias correction or the whole step of a missed restart.
      np.testing.assert_allclose(
        value, initial + moves[0] + moves[1], rtol=1e-5, atol=2e-5, err_msg=f'{collection} {path}'
      )


def test_loop_restarts_the_optimizer_at_each_stage(tmp_path):
  """The code's variant end to end: Adam made anew at the boundary epoch, so the saved
  Adam count is the steps since then, and the run's loss is finite."""
  cifar = fake_datasets.write_cifar10(tmp_path / 'data', train=128, test=16)
  config = get_config('adv_bnn,resnet8,cifar10,authors_code,tiny')
  config.data.source, config.data.local_dir = 'local', str(cifar)
  config.data.train_examples, config.data.eval_examples = 128, 16
  config.progress_bar = False
  config.model.width, config.num_epochs = 0.25, 3
  config.optim.lr_boundaries, config.adv.steps = (2,), 1
  state = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 6  # 3 epochs of 128 / 64 steps.
  adam_states = [
    s
    for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)
    )
    if isinstance(s, optax.ScaleByAdamState)
  ]
  counts = {int(s.count) for s in adam_states}
  assert counts == {2}  # 2 steps since the restart at epoch 2, not 6.
  records = read_metrics(str(tmp_path / 'run' / 'metrics.jsonl'))
  assert all(np.isfinite(r['train_loss']) for r in records)


# --- evaluation follows the authors' rule ------------------------------------------


def test_adv_bnn_is_judged_by_the_mean_softmax_of_50_draws_by_default():
  model = create_model('resnet8', 10, 'adv_bnn', width=0.25, bnn_init_sigma=0.5)
  variables = model.init(
    {'params': jax.random.key(3), 'noise': jax.random.key(4)}, jnp.zeros((1, *IMAGE))
  )
  images = np.random.default_rng(0).integers(0, 256, (24, *IMAGE), np.uint8)
  checkpoint = checkpointing.Checkpoint(
    '/nowhere/checkpoints/1',
    1,
    model,
    variables,
    {'config': {'method': 'adv_bnn', 'model': {'arch': 'resnet8', 'width': 0.25}}},
  )
  [spec] = evaluation.plan_attacks(get_eval_config('tiny'), 'clean')[0]

  def by_hand(rule, draws):
    """Predicted labels with the keys evaluation.KEY_LAYOUT gives batch b of 8, judged
    draw 0 (whatever the attack)."""
    key = jax.random.fold_in(jax.random.key(0), 2**31)
    logits_fn = lambda x, k: model.apply(variables, x, rngs={'noise': k})  # noqa: E731
    return np.concatenate(
      [
        prediction.predict(
          logits_fn,
          jax.random.fold_in(jax.random.fold_in(key, b), 0),
          data.to_float(images[8 * b : 8 * b + 8]),
          draws=draws,
          rule=rule,
        )
        for b in range(3)
      ]
    )

  # Labelled with its own 50-draw mean-softmax prediction, the model is right on every
  # example under that rule only, if its draws disagree (a wide sigma makes them).
  labels = by_hand('mean_softmax', 50).astype(np.int32)
  assert np.mean(by_hand('single', 1) == labels) < 0.9
  assert np.mean(by_hand('mean_softmax', 2) == labels) < 0.95
  split = data.HostSplit('fake', 'test', images, labels, 10)
  mesh = sharding.make_mesh()
  results = {}
  for rule in (None, 'single'):
    config = get_eval_config('tiny')
    config.predict.rule, config.progress_bar = rule, False
    config.judge.draws = 1  # The rule's own draws are what this test is about.
    [record] = evaluation.evaluate_checkpoint(config, checkpoint, 'bnn', split, [spec], mesh, {})
    results[rule] = record
  default, single = results[None], results['single']
  assert (default['rule'], default['draws'], default['rule_from']) == (
    'mean_softmax',
    50,
    'authors',
  )
  assert (single['rule'], single['draws'], single['rule_from']) == ('single', 1, 'config')
  assert default['accuracy'] == 1.0
  assert single['correct'] == np.sum(by_hand('single', 1) == labels)
  config = get_eval_config('')
  assert evaluation.prediction_rule(config, 'l2p') == ('single', 1, 'authors')
  config.predict.draws = 10  # Draws ask nothing of a one-draw rule.
  assert evaluation.prediction_rule(config, 'l2p') == ('single', 1, 'authors')
  assert evaluation.prediction_rule(config, 'adv_bnn') == ('mean_softmax', 10, 'authors')
