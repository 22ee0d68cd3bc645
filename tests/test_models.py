"""Architectures, parameter counts and the semantics of the three noise layers."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from networks import create_model

from l2p_jax.methods import METHODS
from l2p_jax.models import (
  DRAWS,
  bnn_kl,
  draw_noise,
  gaussian_kl,
  layers,
  model_apply,
  noise_drawn_ahead,
  project_perturb,
  resnet_layout,
)
from l2p_jax.models.layers import Conv, Dense, FeatureNoise, WeightNoise, resolve_input_gradient

RNGS = {'params': jax.random.key(0), 'noise': jax.random.key(1)}


def init(model, shape=(2, 8, 8, 3)):
  return jax.jit(lambda: model.init(RNGS, jnp.zeros(shape)))()


def flat(tree):
  return traverse_util.flatten_dict(tree)


@pytest.mark.parametrize(
  'arch,width,expected',
  [
    ('resnet20', 1, 269_722),
    ('resnet32', 1, 464_154),
    ('resnet44', 1, 658_586),
    ('resnet56', 1, 853_018),
    ('resnet20', 1.5, 605_026),
    ('resnet20', 2, 1_073_962),
    ('resnet20', 4, 4_286_026),
    ('resnet18', 1, 11_173_962),
  ],
)
def test_parameter_counts_match_the_paper(arch, width, expected):
  for method in METHODS:
    model = create_model(arch, 10, method, width=width)
    shapes = jax.eval_shape(lambda m=model: m.init(RNGS, jnp.zeros((1, 32, 32, 3)), train=True))
    count = sum(x.size for x in jax.tree.leaves(shapes['params']))
    assert count == expected, (arch, width, method)


def test_l2p_perturb_holds_one_map_per_feature_map_and_nothing_else():
  model = create_model('resnet14', 10, 'l2p', width=0.25)  # 2 blocks per stage
  variables = init(model)
  perturb = flat(variables['perturb'])
  expected = {('stem_noise', 'theta'): (8, 8, 4)}
  for stage, (channels, side) in enumerate([(4, 8), (8, 4), (16, 2)]):
    for block in (1, 2):
      expected[(f'stage{stage + 1}_block{block}', 'noise', 'theta')] = (side, side, channels)
  assert {k: v.shape for k, v in perturb.items()} == expected
  assert all(np.all(v == 0.25) for v in perturb.values())


@pytest.mark.parametrize('arch', ['resnet8', 'resnet18'])
def test_pni_has_one_alpha_per_kernel(arch):
  variables = init(create_model(arch, 10, 'pni', width=0.125))
  kernels = {k[:-1] for k in flat(variables['params']) if k[-1] == 'kernel'}
  perturb = flat(variables['perturb'])
  assert set(perturb) == {k + ('kernel_alpha',) for k in kernels}
  assert all(v.shape == () and v == 0.25 for v in perturb.values())
  if arch == 'resnet18':  # projection shortcuts carry noise too
    assert ('stage2_block1', 'shortcut_conv', 'kernel_alpha') in perturb


@pytest.mark.parametrize('mode,shape', [('layer', ()), ('channel', (10,)), ('element', (64, 10))])
def test_pni_alpha_modes(mode, shape):
  variables = init(create_model('resnet8', 10, 'pni', width=1, pni_mode=mode))
  assert variables['perturb']['classifier']['kernel_alpha'].shape == shape


def test_adv_bnn_has_a_log_sigma_for_every_weight_and_bias():
  variables = init(create_model('resnet8', 10, 'adv_bnn', width=0.25, bnn_init_sigma=0.08))
  weights = {
    k: v
    for k, v in flat(variables['params']).items()
    if k[-1] in ('kernel', 'bias') and 'bn' not in k[-2]
  }
  perturb = flat(variables['perturb'])
  assert {k[:-1] + (k[-1] + '_log_sigma',): v.shape for k, v in weights.items()} == {
    k: v.shape for k, v in perturb.items()
  }
  np.testing.assert_allclose(np.exp(np.asarray(jax.tree.leaves(perturb)[0])), 0.08, rtol=1e-6)


@pytest.mark.parametrize('method', ['none', 'vanilla'])
def test_plain_methods_have_no_perturb_collection(method):
  assert 'perturb' not in init(create_model('resnet8', 10, method, width=0.25))


@pytest.mark.parametrize('method', ['l2p', 'pni', 'adv_bnn'])
def test_noise_is_a_function_of_the_key_and_off_means_plain_network(method):
  model = create_model('resnet8', 10, method, width=0.25)
  variables = init(model)
  x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 3))
  apply = jax.jit(
    lambda v, x, k, noise: model.apply(v, x, noise=noise, rngs={'noise': k}), static_argnums=3
  )
  a = apply(variables, x, jax.random.key(3), True)
  b = apply(variables, x, jax.random.key(3), True)
  c = apply(variables, x, jax.random.key(4), True)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  plain = create_model('resnet8', 10, 'none', width=0.25)
  off = apply(variables, x, jax.random.key(3), False)
  reference = jax.jit(plain.apply)(
    {'params': variables['params'], 'batch_stats': variables['batch_stats']}, x
  )
  np.testing.assert_array_equal(off, reference)


@pytest.mark.parametrize('method', ['l2p', 'pni', 'adv_bnn'])
def test_noise_drawn_ahead_is_the_noise_drawn_at_the_call(method):
  """Each key's draws are the same bits whether made ahead, vectorized over the keys, or
  at the call, and its logits the same up to float32 rounding (XLA may fuse the noise
  differently); a key not drawn ahead gives NaN, not another key's noise."""
  model = create_model('resnet8', 10, method, width=0.25)
  variables = init(model)
  x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 3))
  keys = jax.random.split(jax.random.key(5), 3)

  apply = model_apply(model, variables, train=False, noise=True)

  @jax.jit
  def run(keys, other):
    drawn = draw_noise(apply, x, keys)
    ahead = noise_drawn_ahead(apply, drawn, keys)
    at_call = [apply(x, key, None, True) for key in keys]
    return (
      drawn,
      [updates[DRAWS] for _, updates in at_call],
      jnp.stack([ahead(x, key) for key in keys]),
      jnp.stack([logits for logits, _ in at_call]),
      ahead(x, other),
    )

  drawn, draws_at_call, logits_ahead, logits_at_call, unknown = run(keys, jax.random.key(6))
  for k, draws in enumerate(draws_at_call):
    chex.assert_trees_all_equal(jax.tree.map(lambda maps, k=k: maps[k], drawn), draws)
  np.testing.assert_allclose(logits_ahead, logits_at_call, rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits_at_call[0], logits_at_call[1])  # Each key its own noise.
  assert np.isnan(unknown).all()


def test_feature_noise_gradient_is_the_drawn_noise():
  layer = FeatureNoise(init_scale=0.25)
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  variables = layer.init(RNGS, x)
  rngs = {'noise': jax.random.key(7)}

  def total(theta):
    return layer.apply({'perturb': {'theta': theta}}, x, rngs=rngs).sum()

  out = layer.apply(variables, x, rngs=rngs)
  eps = (out - x) / 0.25
  np.testing.assert_allclose(eps[0], eps[1], rtol=1e-5, atol=1e-6)  # one draw shared by the batch
  grad = jax.grad(total)(variables['perturb']['theta'])
  np.testing.assert_allclose(grad, eps.sum(0), rtol=1e-5, atol=1e-6)


def test_feature_noise_per_example_draws_differ_across_the_batch():
  layer = FeatureNoise(per_example=True)
  x = jnp.zeros((2, 4, 4, 2))
  out = layer.apply(layer.init(RNGS, x), x, rngs={'noise': jax.random.key(7)})
  assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize('mode', ['layer', 'element'])
def test_pni_gradients_alpha_gets_noise_and_weight_gets_plain_gradient(mode):
  layer = Dense(3, WeightNoise('pni', pni_mode=mode, pni_init=0.25))
  eye = jnp.eye(4)  # identity batch: the output rows are the noisy kernel
  variables = layer.init(RNGS, eye)
  rngs = {'noise': jax.random.key(5)}

  def total(params, perturb):
    return layer.apply({'params': params, 'perturb': perturb}, eye, rngs=rngs).sum()

  kernel = variables['params']['kernel']
  eta = (layer.apply(variables, eye, rngs=rngs) - kernel) / 0.25
  d_params, d_perturb = jax.grad(total, argnums=(0, 1))(variables['params'], variables['perturb'])
  expected_alpha = eta if mode == 'element' else eta.sum()
  np.testing.assert_allclose(d_perturb['kernel_alpha'], expected_alpha, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_params['kernel'], jnp.ones_like(kernel))
  # The draw is N(0, std(W)^2) with the unbiased std, as PNI's code.
  big = Dense(512, WeightNoise('pni', pni_mode='layer', pni_init=0.25))
  bv = big.init(RNGS, jnp.eye(512))
  noisy = big.apply(bv, jnp.eye(512), rngs=rngs)
  ratio = np.std(noisy - bv['params']['kernel']) / 0.25 / np.std(bv['params']['kernel'], ddof=1)
  assert abs(ratio - 1) < 0.01


def test_adv_bnn_sample_is_reparametrized_and_kl_matches_closed_form():
  layer = Dense(2, WeightNoise('adv_bnn', bnn_init_sigma=0.5))
  x = jnp.concatenate([jnp.eye(3), jnp.zeros((1, 3))])  # rows: kernel, bias
  variables = layer.init(RNGS, x)
  params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros((2,))}
  rngs = {'noise': jax.random.key(1)}

  def total(perturb):
    return layer.apply({'params': params, 'perturb': perturb}, x, rngs=rngs).sum()

  out = layer.apply({'params': params, 'perturb': variables['perturb']}, x, rngs=rngs)
  bias_sample = out[3]
  kernel_sample = out[:3] - bias_sample
  grad = jax.grad(total)(variables['perturb'])
  # d/d(log sigma) of mu + exp(log sigma) * eps is sigma * eps = sample - mu.
  np.testing.assert_allclose(grad['kernel_log_sigma'], kernel_sample - 1.0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad['bias_log_sigma'], 4 * bias_sample, rtol=1e-5, atol=1e-6)
  assert np.std(kernel_sample) > 0.05  # a real draw, not the mean
  # KL(N(1, 0.5^2) || N(0, 1)) = log(1/0.5) + (0.25 + 1) / 2 - 0.5, per element.
  per_element = np.log(2.0) + 1.25 / 2 - 0.5
  np.testing.assert_allclose(
    gaussian_kl(jnp.ones(4), jnp.full(4, np.log(0.5)), 1.0), 4 * per_element, rtol=1e-6
  )
  # Summed over the layer: 6 kernel entries at mean 1, 2 biases at mean 0.
  bias_element = np.log(2.0) + 0.25 / 2 - 0.5
  np.testing.assert_allclose(
    bnn_kl(params, variables['perturb'], prior_sigma=1.0),
    6 * per_element + 2 * bias_element,
    rtol=1e-6,
  )
  assert bnn_kl(params, None, 1.0) == 0.0


def test_project_perturb_floors_only_l2p_maps():
  perturb = {'a': {'theta': jnp.array([-1.0, 0.005, 0.5])}, 'b': {'kernel_alpha': jnp.array(-0.3)}}
  out = project_perturb(perturb, 0.01)
  np.testing.assert_array_equal(out['a']['theta'], np.float32([0.01, 0.01, 0.5]))
  assert out['b']['kernel_alpha'] == -0.3


def test_any_input_size_channels_and_classes():
  model = create_model('resnet8', 100, 'l2p', width=0.25, mean=(0.5,), std=(0.25,))
  variables = model.init(RNGS, jnp.zeros((2, 12, 12, 1)))
  out = model.apply(variables, jnp.ones((2, 12, 12, 1)), rngs={'noise': jax.random.key(0)})
  assert out.shape == (2, 100)
  assert variables['perturb']['stem_noise']['theta'].shape == (12, 12, 4)
  with pytest.raises(ValueError, match=r'1 normalization channels'):
    model.apply(variables, jnp.ones((2, 12, 12, 3)), rngs={'noise': jax.random.key(0)})


def test_train_mode_updates_batch_stats_only_when_asked():
  model = create_model('resnet8', 10, 'none', width=0.25)
  variables = init(model)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  before = variables['batch_stats']['stem_bn']['mean']
  after = updates['batch_stats']['stem_bn']['mean']
  # Flax momentum 0.9 equals PyTorch's momentum 0.1.
  normalized = (x - jnp.array(model.mean)) / jnp.array(model.std)
  stem = nn.Conv(4, (3, 3), use_bias=False).apply(
    {'params': {'kernel': variables['params']['stem_conv']['kernel']}}, normalized
  )
  np.testing.assert_allclose(after, 0.9 * before + 0.1 * stem.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'arch,message',
  [
    ('resnet21', 'Unknown architecture'),
    ('vgg16', 'Unknown architecture'),
    ('resnet2', 'Unknown architecture'),
  ],
)
def test_bad_architecture_names_are_clear_errors(arch, message):
  with pytest.raises(ValueError, match=message):
    resnet_layout(arch)


def test_bad_method_and_width_are_clear_errors():
  with pytest.raises(ValueError, match=r"Unknown method 'l2q'.*'l2p'"):
    create_model('resnet20', 10, 'l2q')
  with pytest.raises(ValueError, match='Width multiplier must be positive'):
    create_model('resnet20', 10, 'none', width=0)
  with pytest.raises(ValueError, match="Unknown PNI mode 'row'"):
    create_model('resnet20', 10, 'pni', pni_mode='row')


@pytest.mark.parametrize('strides', [1, 2])
def test_conv_input_gradient_options_give_the_same_values_and_gradients(strides):
  """The transposed-kernel backward pass (XLA:CPU's fast path) is the same convolution's
  gradient as JAX's own transpose rule, for the input and the kernel."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  cotangent = jax.random.normal(jax.random.key(1), (2, 8 // strides, 8 // strides, 4))
  results = {}
  for option in ('transposed_kernel', 'xla'):
    conv = Conv(4, 3, strides, input_gradient=option)
    variables = conv.init(jax.random.key(2), x)
    out, vjp = jax.vjp(lambda x, v, c=conv: c.apply(v, x, noise=False), x, variables)
    results[option] = (out, *vjp(cotangent))
  for got, want in zip(
    jax.tree.leaves(results['transposed_kernel']), jax.tree.leaves(results['xla'])
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _transposed_copies_and_gradients(model, variables, x):
  """(operand counts of the compiled gradient's transpose fusions, their number of
  conditionals, the gradient) of a training-mode loss of `model`."""

  def loss(params):
    out, _ = model.apply(
      {**variables, 'params': params}, x, train=True, noise=False, mutable=['batch_stats']
    )
    return jnp.sum(out**2)

  grad = jax.jit(jax.grad(loss))
  text = grad.lower(variables['params']).compile().as_text()
  fusions = re.findall(r'%[\w.]*transpose[\w.]* = \S+ fusion\(([^)]*)\)', text)
  return [f.count('%') for f in fusions], text.count(' conditional('), grad(variables['params'])


def test_kernel_gradients_read_their_input_from_a_buffer(monkeypatch):
  """`layers.materialized` keeps XLA:CPU from recomputing a residual stage's BatchNorm,
  ReLU and additions inside the transposed copy each kernel gradient makes of its input
  (BENCHMARKS.md point 12): one conditional per convolution after the stem, and no copy
  made from more than two buffers but the output gradient's; the same gradient as
  without it."""
  model = create_model('resnet8', 10, width=0.5)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  fenced, conditionals, gradient = _transposed_copies_and_gradients(model, variables, x)
  monkeypatch.setattr(layers, 'materialized', lambda value, like: value)
  recomputed, none, unfenced_gradient = _transposed_copies_and_gradients(model, variables, x)
  assert conditionals == 6 and none == 0  # ResNet-8's six block convolutions (not the stem).
  assert len([n for n in fenced if n > 2]) == 1, fenced
  assert len([n for n in recomputed if n > 2]) >= 5, recomputed
  chex.assert_trees_all_close(gradient, unfenced_gradient, rtol=1e-6, atol=1e-6)
  value = jnp.arange(6.0).reshape(2, 3)
  for like in (jnp.ones(2), jnp.full(2, jnp.nan)):  # Either branch returns `value`.
    np.testing.assert_array_equal(layers.materialized(value, like), value)


def test_auto_conv_input_gradient_is_the_workaround_on_cpu_only(monkeypatch):
  """'auto' takes the transposed-kernel gradient on XLA:CPU and JAX's own elsewhere, so
  a GPU program carries no custom_vjp."""
  x = jnp.ones((1, 4, 4, 3))
  conv = Conv(2, 3, 1)  # input_gradient='auto'
  variables = conv.init(jax.random.key(0), x)
  jaxpr = lambda: str(jax.make_jaxpr(lambda x: conv.apply(variables, x, noise=False))(x))
  assert resolve_input_gradient('auto') == 'transposed_kernel'  # The tests run on CPU.
  assert 'custom_vjp_call' in jaxpr()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert resolve_input_gradient('auto') == 'xla'
  assert 'custom_vjp_call' not in jaxpr()
  assert resolve_input_gradient('transposed_kernel') == 'transposed_kernel'
  with pytest.raises(ValueError, match=r"Unknown convolution input gradient 'eigen'.*'xla'"):
    resolve_input_gradient('eigen')
