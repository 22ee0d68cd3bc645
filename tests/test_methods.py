"""The method registry: every record consistent with the network it builds, one clear
error for an unknown name, and a sixth defense (Gaussian noise on the input) defined in
this file alone that trains, restores and is evaluated like the paper's five."""

import fake_datasets
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar as cifar_configs
from configs import eval as eval_configs
from l2p_jax import checkpointing, data, evaluation, experiment, methods, models
from l2p_jax.training import loop

SIGMA = 0.1
MEAN, STD = data.KNOWN_CHANNEL_STATS['cifar10']


class GaussianInputNoise(nn.Module):
  """A network on its input plus N(0, sigma^2) noise, drawn from the 'noise' stream
  when `noise` is on (randomized smoothing's training-time noise, without the vote)."""

  sigma: float
  network: nn.Module

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, noise: bool = True) -> jax.Array:
    if noise:
      x = x + self.sigma * jax.random.normal(self.make_rng(models.NOISE_RNG), x.shape, x.dtype)
    return self.network(x, train=train, noise=noise)


GAUSSIAN_INPUT = methods.Method(
  'gaussian_input',
  'Gaussian input noise',
  randomized=True,
  network=lambda config, base: GaussianInputNoise(SIGMA, models.ResNet(**base)),
)


@pytest.fixture(scope='module')
def registered():
  """The registry with the sixth method added, for this module's tests only."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(methods, '_REGISTRY', dict(methods._REGISTRY))
    methods.register(GAUSSIAN_INPUT)
    yield


def network(method, arch='resnet8'):
  """The network training builds for `method` from the CIFAR config's defaults."""
  config = cifar_configs.get_config(f'{method},{arch},cifar10,tiny')
  return experiment.build_model(config, methods.get(config.method), 10, MEAN, STD)


def logits_under(model, variables, keys, x, noise=True):
  """The model's inference logits on x under each noise key."""
  apply = jax.jit(lambda k: model.apply(variables, x, train=False, noise=noise, rngs={'noise': k}))
  return [np.asarray(apply(jax.random.key(k))) for k in keys]


@pytest.mark.parametrize('name', methods.METHODS)
def test_every_record_builds_a_network_that_draws_noise_iff_it_is_randomized(name):
  record = methods.get(name)
  model = network(name)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
  variables = model.init({'params': jax.random.key(0), 'noise': jax.random.key(1)}, x)
  first, second = logits_under(model, variables, (2, 3), x)
  assert (not np.allclose(first, second)) == record.randomized
  off = logits_under(model, variables, (2, 3), x, noise=False)
  np.testing.assert_array_equal(off[0], off[1])
  assert record.adversarial == (cifar_configs.get_config(name).adv.start_epoch >= 0)
  config_sections = set(cifar_configs.get_config(name).keys())
  assert record.config_section is None or record.config_section in config_sections


def test_an_unknown_method_is_one_line_naming_the_known_ones():
  with pytest.raises(methods.UnknownMethodError) as error:
    methods.get('l2q')
  message = str(error.value)
  assert '\n' not in message and "'l2q'" in message
  assert all(repr(name) in message for name in methods.METHODS)
  config = cifar_configs.get_config('l2p,resnet8,cifar10,tiny')
  config.method = 'l2q'
  with pytest.raises(experiment.ConfigError, match=r"Unknown method 'l2q'.*'adv_bnn'"):
    experiment.validate_config(config)


def test_a_registered_method_is_known_by_name(registered):
  assert methods.names()[-1] == 'gaussian_input'
  assert methods.get('gaussian_input') is GAUSSIAN_INPUT
  with pytest.raises(methods.UnknownMethodError, match='gaussian_input'):
    methods.get('l2q')


@pytest.fixture(scope='module')
def trained(registered, tmp_path_factory):
  """The sixth method trained for one tiny epoch (PGD from the start) on learnable data."""
  cifar = fake_datasets.write_cifar10(tmp_path_factory.mktemp('cifar'), train=128, test=32)
  config = cifar_configs.get_config('gaussian_input,resnet8,cifar10,tiny')
  config.data.source, config.data.local_dir = 'local', str(cifar)
  config.data.train_examples, config.data.eval_examples = 128, 32
  config.progress_bar, config.num_epochs = False, 1
  workdir = tmp_path_factory.mktemp('gaussian_input')
  state = loop.train_and_evaluate(config, str(workdir))
  return workdir, state


def test_the_sixth_method_trains_and_restores_as_its_own_network(trained):
  workdir, state = trained
  assert int(state.step) == 2  # 128 examples in batches of 64.
  checkpoint = checkpointing.load_checkpoint(str(workdir))
  assert isinstance(checkpoint.model, GaussianInputNoise) and checkpoint.randomized
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 32, 32, 3)), jnp.float32)
  first, second = logits_under(checkpoint.model, checkpoint.variables, (0, 1), x)
  assert not np.allclose(first, second)
  again = logits_under(checkpoint.model, checkpoint.variables, (0,), x)[0]
  np.testing.assert_array_equal(first, again)


def test_the_sixth_method_is_evaluated_as_a_randomized_defense(trained, tmp_path):
  workdir, _ = trained
  config = eval_configs.get_config('tiny')
  config.attacks, config.output_dir = 'clean,pgd', str(tmp_path)
  records = evaluation.evaluate_workdirs(config, str(workdir))['records']
  assert {r['attack'] for r in records} == {'clean', 'pgd'}
  for record in records:
    assert record['randomized'] and record['n'] == config.data.examples
    assert 0 <= record['accuracy'] <= 1
    # Judged under configs/eval.py:tiny's 3 draws, as every randomized model is.
    assert record['judged_draws'] == config.judge.draws == 3
    assert record['accuracy'] == record['correct'] / (record['n'] * 3)
