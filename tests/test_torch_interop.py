"""PyTorch checkpoint interop: same logits, same noise distributions, same FGSM, exact
round trips, and one clear error for everything that does not fit."""

import argparse
import re
import sys

import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402
from networks import create_model, imported_on_own_statistics  # noqa: E402

from l2p_jax.attacks import fgsm  # noqa: E402
from l2p_jax.interop import (  # noqa: E402
  TorchStateDictMismatchError,
  export_torch_state_dict,
  import_torch_checkpoint,
  read_torch_normalization,
  save_torch_checkpoint,
)
from l2p_jax.interop.parity import torch_reference as ref  # noqa: E402
from l2p_jax.models.layers import Conv, Dense, FeatureNoise, WeightNoise  # noqa: E402

# Learn2Perturb's main.py normalization (not CIFAR-10's true statistics).
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def reference(layout, arch, width, size, method, pni_mode='layer', classes=10, seed=0):
  """A randomized PyTorch reference model as its authors run it: wrapped with the
  Normalize layer for 'l2p'/'pni', bare (normalization in the data pipeline) otherwise."""
  torch.manual_seed(seed)
  kwargs = dict(
    num_classes=classes,
    width=width,
    image_size=size,
    noise=method if method in ('l2p', 'pni') else None,
    pni_mode=pni_mode,
  )
  if layout in ('l2p', 'pni') and arch != 'resnet18':
    net = ref.ResNetV1(int(arch[len('resnet') :]), **kwargs)
  else:
    net = ref.ResNetKuangliu(arch, **kwargs)
  with torch.no_grad():  # BatchNorm and noise parameters away from their initial values
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.2)
        module.running_mean.normal_(0, 0.2)
        module.running_var.uniform_(0.5, 1.5)
    for name, param in net.named_parameters():
      if name.endswith(('sigma_map', 'alpha_w')):
        param.uniform_(0.1, 0.5)
  ref.set_noise(net, False)
  if layout in ('l2p', 'pni'):
    return torch.nn.Sequential(ref.NormalizeLayer(MEAN, STD), net)
  return net


def torch_logits(model, x_nhwc, layout):
  """Torch logits for NHWC pixels in [0, 1] (normalized outside the model for torchvision)."""
  x = torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy())
  if layout == 'torchvision':
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
  return model(x)


def images(n, size, seed=1):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3))


# (layout, arch, width, input size, method, pni_mode)
FAMILIES = [
  ('l2p', 'resnet8', 0.5, 16, 'l2p', 'layer'),  # L2P ResNet-V1
  ('pni', 'resnet8', 0.5, 8, 'pni', 'channel'),  # PNI noisy CIFAR ResNet
  ('l2p', 'resnet18', 0.125, 8, 'l2p', 'layer'),  # L2P ResNet-V2(18)
  ('torchvision', 'resnet14', 0.5, 8, 'none', 'layer'),  # akamaster option A
  ('torchvision', 'resnet18', 0.125, 8, 'none', 'layer'),  # kuangliu ResNet18
]


@pytest.mark.parametrize('layout,arch,width,size,method,pni_mode', FAMILIES)
def test_noise_free_logits_and_batch_stats_match_pytorch(
  layout, arch, width, size, method, pni_mode
):
  torch_model = reference(layout, arch, width, size, method, pni_mode)
  before = {k: v.clone() for k, v in torch_model.state_dict().items()}
  variables = import_torch_checkpoint(
    before, arch=arch, num_classes=10, method=method, width=width, mean=MEAN, std=STD
  )  # layout 'auto'
  model = create_model(arch, 10, method, width=width, mean=MEAN, std=STD, pni_mode=pni_mode)
  x = images(8, size)

  @jax.jit
  def ours(variables, x):  # one compilation for both BatchNorm modes
    evaluated = model.apply(variables, x, train=False, noise=False)
    return evaluated, *model.apply(variables, x, train=True, noise=False, mutable=['batch_stats'])

  evaluated, trained, updates = ours(variables, x)
  torch_model.eval()
  with torch.no_grad():
    expected = torch_logits(torch_model, x, layout).numpy()
  np.testing.assert_allclose(evaluated, expected, rtol=0, atol=1e-5)

  # Train mode: batch statistics normalize, running statistics move by momentum 0.1.
  counts = {}
  for name, module in torch_model.named_modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.register_forward_pre_hook(
        lambda m, inputs, name=name: counts.__setitem__(
          name, inputs[0].numel() // inputs[0].shape[1]
        )
      )
  torch_model.train()
  with torch.no_grad():
    expected = torch_logits(torch_model, x, layout).numpy()
  # Batch statistics of 8 images (8 values per channel at ResNet-18's last stage) divide
  # float32 rounding by small standard deviations (1.02e-5 was measured on one CPU), so
  # train mode is held to 1e-4 and eval mode, above, to 1e-5.
  np.testing.assert_allclose(trained, expected, rtol=0, atol=1e-4)
  wrap = dict(mean=MEAN, std=STD) if layout != 'torchvision' else {}
  exported = export_torch_state_dict({**variables, **updates}, layout=layout, **wrap)
  after = torch_model.state_dict()
  assert counts and {f'{n}.running_var' for n in counts} <= set(exported)
  for name, n in counts.items():
    np.testing.assert_allclose(
      exported[f'{name}.running_mean'], after[f'{name}.running_mean'], rtol=0, atol=1e-6
    )
    # torch moves running_var toward the unbiased batch variance, Flax toward the
    # biased one (the one both normalize with): ours = torch's with n/(n-1) undone.
    old, theirs = before[f'{name}.running_var'], after[f'{name}.running_var']
    np.testing.assert_allclose(
      exported[f'{name}.running_var'],
      0.9 * old + (theirs - 0.9 * old) * (n - 1) / n,
      rtol=1e-5,
      atol=1e-6,
    )
  stem = min(counts, key=len)  # the stem BN: the largest n, the difference still shows
  assert not np.allclose(
    exported[f'{stem}.running_var'], after[f'{stem}.running_var'], rtol=0, atol=1e-6
  )


def test_l2p_noise_has_the_authors_distribution():
  torch_model = reference('l2p', 'resnet8', 0.5, 8, 'l2p')
  variables = import_torch_checkpoint(
    torch_model, arch='resnet8', num_classes=10, method='l2p', width=0.5
  )
  theta = variables['perturb']['stem_noise']['theta']  # (H, W, C)
  sigma_map = torch_model[1].cn1_sigma_map.detach()  # (C, H, W)
  np.testing.assert_array_equal(theta, sigma_map.permute(1, 2, 0).numpy())
  draws, zeros = 2000, jnp.zeros((2, *theta.shape))
  layer = FeatureNoise()
  ours = jax.jit(
    jax.vmap(lambda key: layer.apply({'perturb': {'theta': theta}}, zeros, rngs={'noise': key}))
  )(jax.random.split(jax.random.key(0), draws))
  torch.manual_seed(0)
  with torch.no_grad():
    theirs = torch.stack(
      [ref.l2p_noise(torch.zeros(2, *sigma_map.shape), sigma_map) for _ in range(draws)]
    ).numpy()
  for noise, scale in ((np.asarray(ours), np.asarray(theta)), (theirs, sigma_map.numpy())):
    np.testing.assert_array_equal(noise[:, 0], noise[:, 1])  # one draw per batch
    z = noise[:, 0] / scale
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.01, (z.mean(), z.var())


def _our_noisy_kernels(layers, variables, draws):
  """`draws` noisy kernels of each of our layers: a Conv's read off one-hot 3x3 inputs
  (the centre output is the kernel row), a Dense's off the identity; one compilation."""

  def draw(key):
    kernels = []
    for layer, layer_vars in zip(layers, variables):
      kernel = layer_vars['params']['kernel']
      if kernel.ndim == 4:
        h, w, i, _ = kernel.shape
        out = layer.apply(
          layer_vars, jnp.eye(h * w * i).reshape(h * w * i, h, w, i), rngs={'noise': key}
        )
        kernels.append(out[:, 1, 1, :].reshape(kernel.shape))
      else:
        out = layer.apply(layer_vars, jnp.eye(kernel.shape[0]), rngs={'noise': key})
        kernels.append(out - layer_vars['params']['bias'])
    return kernels

  keys = jax.random.split(jax.random.key(0), draws)
  return jax.jit(lambda keys: jax.lax.map(draw, keys))(keys)


@pytest.mark.parametrize('mode', ['layer', 'channel', 'element'])
def test_pni_noise_has_the_authors_distribution(mode):
  torch_model = reference('pni', 'resnet8', 0.125, 8, 'pni', mode, classes=2)
  variables = import_torch_checkpoint(
    torch_model.state_dict(), arch='resnet8', num_classes=2, method='pni', width=0.125
  )
  net, draws, spec = torch_model[1], 4000, WeightNoise('pni', pni_mode=mode, pni_init=0.25)
  ref.set_noise(net, True)
  names = ('stem_conv', 'classifier')
  layer_vars = [
    {'params': variables['params'][name], 'perturb': variables['perturb'][name]} for name in names
  ]
  all_ours = _our_noisy_kernels((Conv(2, 3, 1, spec), Dense(2, spec)), layer_vars, draws)
  torch.manual_seed(0)
  for name, theirs_layer, ours, our_vars in zip(
    names, (net.conv_1_3x3, net.classifier), all_ours, layer_vars
  ):
    kernel = np.asarray(our_vars['params']['kernel'])
    ours = np.asarray(ours) - kernel
    with torch.no_grad():
      weight = theirs_layer.weight
      theirs = torch.stack([theirs_layer.noisy_weight() - weight for _ in range(draws)])
      theirs_z = (theirs / (theirs_layer.alpha_w * weight.std())).numpy()
    ours_z = ours / (np.asarray(our_vars['perturb']['kernel_alpha']) * np.std(kernel, ddof=1))
    for z in (ours_z, theirs_z):  # N(0, 1) after scaling by alpha * unbiased std(W)
      assert abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.03, (name, z.mean(), z.var())
    # Element by element (theirs moved to our axis order), the spreads agree.
    to_ours = (0, 3, 4, 2, 1) if theirs.ndim == 5 else (0, 2, 1)
    np.testing.assert_allclose(ours.std(0) / theirs.numpy().transpose(to_ours).std(0), 1, atol=0.1)
  # The classifier has 16 weights: a biased std would give variance 16/15 above.
  assert np.std(kernel, ddof=1) / np.std(kernel) == pytest.approx(np.sqrt(16 / 15))


def test_fgsm_on_imported_weights_flips_the_same_predictions():
  torch_model = reference('l2p', 'resnet8', 0.5, 16, 'l2p')
  x, eps = images(32, 16, seed=3), 2 / 255
  x_t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  model, variables = imported_on_own_statistics(torch_model, x_t, 'l2p', mean=MEAN, std=STD)
  logits_fn = lambda x, key: model.apply(variables, x, noise=False)  # noqa: E731

  # PyTorch FGSM, as in the authors' attacks/fgsm.py: one signed-gradient step.
  x_t.requires_grad_()
  clean = torch_model(x_t)
  y = clean.argmax(1)
  torch.nn.functional.cross_entropy(clean, y).backward()
  x_adv_t = (x_t + eps * x_t.grad.sign()).clamp(0, 1).detach()
  theirs = torch_model(x_adv_t).argmax(1).numpy()

  @jax.jit
  def attack(x, y):
    x_adv = fgsm(logits_fn, jax.random.key(0), x, y, eps=eps).x_adv
    return x_adv, jnp.argmax(logits_fn(x_adv, None), -1)

  x_adv, ours = attack(x, jnp.asarray(y.numpy()))
  same = np.mean(np.asarray(x_adv).transpose(0, 3, 1, 2) == x_adv_t.numpy())
  assert same > 0.999, same
  np.testing.assert_array_equal(ours, theirs)
  assert 0 < np.sum(theirs != y.numpy()) < len(theirs)


@pytest.mark.parametrize(
  'layout,arch,width,size,method,pni_mode',
  FAMILIES
  + [
    ('pni', 'resnet14', 0.5, 8, 'pni', 'layer'),
    ('pni', 'resnet8', 0.5, 8, 'pni', 'element'),
    ('torchvision', 'resnet8', 0.5, 8, 'l2p', 'layer'),
    ('pni', 'resnet18', 0.125, 8, 'pni', 'channel'),
  ],
)
def test_import_export_round_trip_is_exact(layout, arch, width, size, method, pni_mode):
  torch_model = reference(layout, arch, width, size, method, pni_mode)
  state = torch_model.state_dict()
  variables = import_torch_checkpoint(
    state, arch=arch, num_classes=10, method=method, width=width, layout=layout
  )
  wrap = dict(mean=MEAN, std=STD) if layout != 'torchvision' else {}
  exported = export_torch_state_dict(variables, layout=layout, **wrap)
  assert set(exported) == set(state)
  for key, value in state.items():
    assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
  again = import_torch_checkpoint(
    exported, arch=arch, num_classes=10, method=method, width=width, layout=layout
  )
  flat, flat_again = (traverse_util.flatten_dict(v) for v in (variables, again))
  assert flat.keys() == flat_again.keys()
  for path, value in flat.items():
    np.testing.assert_array_equal(flat_again[path], value)


def test_files_wrappers_and_modules_load(tmp_path):
  torch_model = reference('pni', 'resnet8', 0.5, 8, 'pni', 'channel')
  state = torch_model.state_dict()
  expected = import_torch_checkpoint(state, arch='resnet8', num_classes=10, method='pni', width=0.5)
  np.testing.assert_allclose(read_torch_normalization(state), (MEAN, STD), rtol=1e-6)

  saved = tmp_path / 'ours.pth.tar'
  save_torch_checkpoint(saved, expected, 'pni', mean=MEAN, std=STD)
  loaded = torch.load(saved, weights_only=True)
  torch_model.load_state_dict(loaded['state_dict'], strict=True)

  # DataParallel prefix inside PNI's {'state_dict': ...} with extra entries; a module.
  parallel = {
    'epoch': 3,
    'arch': 'noise_resnet20',
    'state_dict': {f'module.{k}': v for k, v in state.items()},
  }
  torch.save(parallel, tmp_path / 'parallel.pth')
  for source in (tmp_path / 'parallel.pth', str(saved), torch_model):
    got = import_torch_checkpoint(
      source, arch='resnet8', num_classes=10, method='pni', width=0.5, mean=MEAN, std=STD
    )
    jax.tree.map(np.testing.assert_array_equal, got, expected)

  # PNI's full checkpoints pickle Python objects; weights_only=True refuses them.
  torch.save({**parallel, 'recorder': argparse.Namespace(epochs=3)}, tmp_path / 'pni.pth')
  with pytest.raises(
    ValueError,
    match=r'is not a PyTorch state dict checkpoint that loads '
    r'without running code',
  ) as error:
    import_torch_checkpoint(
      tmp_path / 'pni.pth', arch='resnet8', num_classes=10, method='pni', width=0.5
    )
  assert 'weights_only=False' not in str(error.value)  # Unsafe advice for a stray file.


def test_every_misfit_is_listed_in_one_error():
  state = dict(reference('l2p', 'resnet8', 0.5, 16, 'l2p').state_dict())
  state['1.stage_9.0.conv_a.weight'] = torch.zeros(3, 3)
  del state['1.bn_1.running_var']
  state['1.classifier.weight'] = torch.zeros(10, 7)
  with pytest.raises(TorchStateDictMismatchError) as error:
    import_torch_checkpoint(
      state,
      arch='resnet8',
      num_classes=10,
      method='l2p',
      width=0.5,
      mean=MEAN,
      std=(0.25, 0.25, 0.25),
    )
  message = str(error.value)
  assert error.value.unexpected == ['stage_9.0.conv_a.weight']
  assert error.value.missing == ['bn_1.running_var']
  assert error.value.shape_mismatches == [('classifier.weight', (10, 32), (10, 7))]
  for text in (
    'stage_9.0.conv_a.weight (3, 3)',
    'bn_1.running_var (8,)',
    'batch_stats/stem_bn/var',
    'classifier.weight: expected (10, 32), got (10, 7)',
    'std [0.25, 0.25, 0.25]',
  ):
    assert text in message


def test_wrong_architecture_lists_every_key():
  state = reference('l2p', 'resnet14', 0.5, 8, 'l2p').state_dict()
  keys = {key[2:] for key in state if key.startswith('1.')}

  def misfit(arch, width=0.5, method='l2p'):
    with pytest.raises(TorchStateDictMismatchError) as error:
      import_torch_checkpoint(
        state, arch=arch, num_classes=10, method=method, width=width, layout='l2p'
      )
    return error.value

  # resnet8 has one block per stage fewer: all 3 x 13 tensors of stage_s.1 are unexpected.
  found = misfit('resnet8')
  assert set(found.unexpected) == {k for k in keys if re.match(r'stage_\d\.1\.', k)}
  assert len(found.unexpected) == 39 and not found.missing
  # resnet20 has one more: its 3 x 11 tensors are missing (BN counters are optional).
  found = misfit('resnet20')
  assert len(found.missing) == 33 and not found.unexpected
  assert all(re.match(r'stage_\d\.2\.', key) for key in found.missing)
  # Twice as wide: every tensor but the classifier's bias has the wrong shape.
  found = misfit('resnet14', width=1.0)
  assert len(found.shape_mismatches) == 73
  assert ('conv_1_3x3.weight', (16, 3, 3, 3), (8, 3, 3, 3)) in found.shape_mismatches
  # The wrong method: L2P's 7 sigma maps are unexpected, PNI's 14 alphas missing.
  found = misfit('resnet14', method='none')
  assert sorted(found.unexpected) == sorted(k for k in keys if k.endswith('sigma_map'))
  found = misfit('resnet14', method='pni')
  assert len(found.unexpected) == 7 and len(found.missing) == 14
  assert all(key.endswith('.alpha_w') for key in found.missing)


def test_unsupported_requests_are_clear_errors():
  state = reference('torchvision', 'resnet8', 0.5, 8, 'none').state_dict()
  kwargs = dict(arch='resnet8', num_classes=10, method='none', width=0.5)
  with pytest.raises(ValueError, match="Unknown layout 'caffe'"):
    import_torch_checkpoint(state, layout='caffe', **kwargs)
  bayes = jax.eval_shape(
    lambda: create_model('resnet8', 10, 'adv_bnn', width=0.5).init(
      {'params': jax.random.key(0), 'noise': jax.random.key(0)}, jnp.zeros((1, 8, 8, 3))
    )
  )
  bayes = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), bayes)
  with pytest.raises(ValueError, match='Bayesian'):
    export_torch_state_dict(bayes, layout='l2p')
  odd = jax.tree.map(
    lambda s: np.zeros(s.shape, s.dtype),
    jax.eval_shape(
      lambda: create_model('resnet8', 10, 'none', width=0.3).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3))
      )
    ),
  )
  with pytest.raises(ValueError, match='cannot express stage 2 going from 5 to 10'):
    export_torch_state_dict(odd, layout='torchvision')


def test_missing_torch_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` fail
  with pytest.raises(ImportError, match=r"pip install 'l2p-jax\[torch\]'"):
    export_torch_state_dict({'params': {}}, layout='l2p')
