"""compare_torch: one start, the same batches, draws and PGD starts give the same
training steps here and in the authors' PyTorch step, to rounding."""

import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import networks  # noqa: E402
from test_train import get_config  # noqa: E402

from l2p_jax import attacks, data  # noqa: E402
from l2p_jax.interop.parity import trajectory  # noqa: E402
from l2p_jax.models.layers import DRAWS, FeatureNoise  # noqa: E402

TOLERANCE = 1e-5  # float32 on CPU: one step differs by about 1e-7.


def tiny(method, alternation='paper', random_start=False):
  """ResNet-8 at width 0.5 on 8x8 images, batch 8, PGD-1, PGD training from step 1.
  Weight decay is 1e-3 so that decaying the noise parameters (a wrong variant) moves
  them by about 5e-5 in one step, well above TOLERANCE."""
  config = get_config(f'{method},resnet8,cifar10,tiny')
  config.unlock()
  config.batch_size, config.adv.steps, config.optim.weight_decay = 8, 1, 1e-3
  config.adv.start_epoch = -1 if method == 'none' else 0
  config.adv.random_start = random_start
  config.l2p.alternation = alternation
  return config


def split(n=16):
  rng = np.random.default_rng(0)
  return data.HostSplit(
    'toy',
    'train',
    num_classes=10,
    images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
    labels=rng.integers(0, 10, n).astype(np.int32),
  )


def assert_close(report, collections, tolerance=TOLERANCE):
  for record in report['steps']:
    for collection in collections:
      assert record[collection]['max_abs'] < tolerance, (
        record['step'],
        collection,
        record[collection],
      )
    assert record['loss']['max_abs'] < tolerance * max(1, record['loss']['jax'])


METHODS = [
  ('none', 'paper'),
  ('vanilla', 'paper'),
  ('pni', 'paper'),
  ('adv_bnn', 'paper'),
  ('l2p', 'paper'),
  ('l2p', 'authors_code'),
]


@pytest.mark.parametrize('method,alternation', METHODS)
def test_one_noise_free_step_matches_pytorch(method, alternation):
  report = trajectory.compare(tiny(method, alternation), 1, split(), noise=False)
  record = report['steps'][0]
  assert record['adversarial'] == (method != 'none') and not record['noise']
  assert_close(
    report,
    ['params', 'perturb', 'batch_stats']
    if method != 'none' and method != 'vanilla'
    else ['params', 'batch_stats'],
  )


@pytest.mark.parametrize(
  'method,alternation', [('l2p', 'paper'), ('l2p', 'authors_code'), ('pni', 'paper')]
)
def test_one_step_with_shared_draws_and_pgd_start_matches_pytorch(method, alternation):
  report = trajectory.compare(tiny(method, alternation, random_start=True), 1, split())
  record = report['steps'][0]
  assert record['noise'] and record['adversarial']
  assert_close(report, ['params', 'perturb', 'batch_stats'])
  assert record['pgd']['sign_flip_fraction'] == 0


def test_pgd_on_running_statistics_matches_the_authors_eval_mode():
  """adv.attack_batchnorm=running attacks with BatchNorm's running statistics, as the
  authors' PGD does under model.eval(); at initialization these are far from the batch's,
  so a side attacking in training mode would part at once."""
  config = tiny('vanilla')
  config.adv.attack_batchnorm = 'running'
  report = trajectory.compare(config, 1, split(), noise=False)
  assert_close(report, ['params', 'batch_stats'])
  assert report['steps'][0]['pgd']['sign_flip_fraction'] == 0


def test_twenty_clean_steps_stay_together_and_torch_batch_norm_parts():
  config = tiny('none')
  report = trajectory.compare(config, 20, split(32))  # 4 epochs of 4 steps
  assert [r['epoch'] for r in report['steps']][-1] == 4
  assert_close(report, ['params'], tolerance=1e-3)
  assert report['steps'][-1]['params']['max_abs'] > 0  # rounding, not bit equality
  assert report['first_pgd_sign_flip'] is None


def test_pgd_trace_is_the_training_pgd():
  model = networks.create_model('resnet8', 10, 'l2p', width=0.5)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  variables = model.init({'params': jax.random.key(0), 'noise': jax.random.key(0)}, x)
  logits_fn = lambda inputs, key: model.apply(variables, inputs, rngs={'noise': key})  # noqa: E731
  y = jnp.arange(4)
  kwargs = dict(eps=8 / 255, steps=3, step_size=0.01, random_start=True)
  start, _, signs, last = jax.jit(lambda k: trajectory.pgd_trace(logits_fn, k, x, y, **kwargs))(
    jax.random.key(2)
  )
  expected = jax.jit(lambda k: attacks.pgd(logits_fn, k, x, y, **kwargs).x_adv)(jax.random.key(2))
  np.testing.assert_allclose(last, expected, atol=1e-6)
  assert signs.shape == (3, *x.shape) and np.abs(start - x).max() <= 8 / 255 + 1e-7


def test_draws_are_recorded_and_replayed():
  layer, x = FeatureNoise(), jnp.zeros((2, 4, 4, 3))
  variables = layer.init({'params': jax.random.key(0), 'noise': jax.random.key(0)}, x)
  out, recorded = layer.apply(variables, x, rngs={'noise': jax.random.key(5)}, mutable=[DRAWS])
  replayed = layer.apply({**variables, **recorded}, x, rngs={'noise': jax.random.key(6)})
  np.testing.assert_array_equal(out, replayed)
  assert not np.array_equal(out, layer.apply(variables, x, rngs={'noise': jax.random.key(6)}))
  with pytest.raises(ValueError, match=r'shape \(4, 4, 2\).*needs \(4, 4, 3\)'):
    layer.apply({**variables, DRAWS: {'theta': jnp.zeros((4, 4, 2))}}, x)


def test_unsupported_settings_and_missing_torch_are_clear(monkeypatch):
  config = tiny('l2p')
  config.model.l2p_per_example = True
  with pytest.raises(ValueError, match='l2p_per_example=True'):
    trajectory.compare(config, 1, split())
  code = get_config('adv_bnn,resnet8,cifar10,authors_code,tiny')
  with pytest.raises(
    ValueError,
    match=r"optim.optimizer='adam' \(the PyTorch reference "
    r"has 'sgd' only\).*bnn.kl_scope='classifier'",
  ):
    trajectory.compare(code, 1, split())
  monkeypatch.setitem(sys.modules, 'torch', None)
  monkeypatch.delitem(sys.modules, 'l2p_jax.interop.parity.torch_step', raising=False)
  monkeypatch.delitem(sys.modules, 'l2p_jax.interop.parity.torch_reference', raising=False)
  with pytest.raises(ImportError, match=r'pip install -e "\.\[torch\]"'):
    trajectory.compare(tiny('none'), 1, split())
