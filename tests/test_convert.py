"""convert_torch.py: a PyTorch checkpoint becomes a workdir eval.py can read, and back."""

import pathlib
import subprocess
import sys

import chex
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from test_train import get_config  # noqa: E402

from l2p_jax import checkpointing, experiment, methods  # noqa: E402
from l2p_jax.interop import convert, import_torch_checkpoint  # noqa: E402
from l2p_jax.interop.parity import torch_reference as ref  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the L2P code's


@pytest.fixture(scope='module')
def pni_file(tmp_path_factory):
  """A PNI ResNet-V1(8) with channel-wise alphas, saved as the authors' scripts do."""
  torch.manual_seed(0)
  net = ref.ResNetV1(8, noise='pni', pni_mode='channel', width=0.5)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 1.5)
  model = torch.nn.Sequential(ref.NormalizeLayer(MEAN, STD), net)
  path = tmp_path_factory.mktemp('torch') / 'pni.pth'
  torch.save({'state_dict': model.state_dict(), 'epoch': 3}, path)
  return path, model.state_dict()


def test_cli_import_writes_a_checkpoint_with_the_model_metadata(pni_file, tmp_path):
  path, _ = pni_file
  workdir = tmp_path / 'imported'
  result = subprocess.run(
    [
      sys.executable,
      str(ROOT / 'convert_torch.py'),
      '--torch_checkpoint',
      str(path),
      '--config',
      f'{ROOT}/configs/cifar.py:pni,resnet8,cifar10',
      '--config.model.width=0.5',
      '--workdir',
      str(workdir),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  checkpoints = checkpointing.Checkpoints(str(workdir / 'checkpoints'), read_only=True)
  state, meta = checkpoints.restore(0)
  assert meta['config']['model']['pni_mode'] == 'channel'  # read from the alphas
  np.testing.assert_allclose(meta['std'], STD, rtol=1e-6)  # the file's Normalize layer
  assert meta['num_classes'] == 10 and meta['image_shape'] == [32, 32, 3]
  expected = import_torch_checkpoint(
    str(path), arch='resnet8', num_classes=10, method='pni', width=0.5
  )
  chex.assert_trees_all_equal(
    {name: state[name] for name in ('params', 'perturb', 'batch_stats')},
    {name: expected[name] for name in ('params', 'perturb', 'batch_stats')},
  )
  # The metadata rebuilds a model that takes these variables.
  model = experiment.build_model(
    ml_collections.ConfigDict(meta['config']),
    methods.get(ml_collections.ConfigDict(meta['config']).method),
    meta['num_classes'],
    meta['mean'],
    meta['std'],
  )
  logits = model.apply(
    {k: state[k] for k in ('params', 'perturb', 'batch_stats')},
    np.zeros((2, 32, 32, 3), np.float32),
    noise=False,
  )
  assert logits.shape == (2, 10)

  exported = tmp_path / 'new_folder' / 'back.pth'  # A missing folder is created.
  convert.workdir_to_torch(str(workdir), str(exported), 'pni')
  back = torch.load(exported, weights_only=True)['state_dict']
  _, original = pni_file
  assert set(back) == set(original)
  for key, value in original.items():
    if not key.endswith('num_batches_tracked'):  # not kept; exported as 0
      np.testing.assert_allclose(back[key].numpy(), value.numpy(), rtol=1e-6, err_msg=key)


def test_import_refuses_a_workdir_that_has_checkpoints(pni_file, tmp_path):
  path, _ = pni_file
  config = get_config('pni,resnet8,cifar10')
  config.model.width = 0.5
  convert.torch_to_workdir(str(path), config, str(tmp_path))
  with pytest.raises(FileExistsError, match='already holds checkpoints'):
    convert.torch_to_workdir(str(path), config, str(tmp_path))


def test_export_of_an_empty_workdir_says_how_to_make_one(tmp_path):
  with pytest.raises(FileNotFoundError, match='train one with train.py --workdir'):
    convert.workdir_to_torch(str(tmp_path), str(tmp_path / 'x.pth'), 'l2p')
