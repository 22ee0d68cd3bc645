"""The networks the tests build: a method's network as training builds it, from the
CIFAR config's defaults (the one place they are written) with some model fields changed."""

from configs import cifar
from l2p_jax import data, experiment, methods

CIFAR10_MEAN, CIFAR10_STD = data.KNOWN_CHANNEL_STATS['cifar10']


def create_model(
  arch, num_classes, method='none', *, mean=CIFAR10_MEAN, std=CIFAR10_STD, **model_fields
):
  """`experiment.build_model` of `configs/cifar.py:METHOD,ARCH` with `config.model`'s
  `model_fields` (width, pni_mode, bnn_init_sigma, ...) changed; CIFAR-10's statistics
  unless mean/std are given."""
  config = cifar.get_config(f'{method},{arch}')
  config.model.update(model_fields)
  return experiment.build_model(config, methods.get(config.method), num_classes, mean, std)


def imported_on_own_statistics(torch_model, x_nchw, method, *, mean, std):
  """(model, variables): our ResNet-8 x0.5 on the weights of `torch_model`, a PyTorch
  reference ResNet-8 x0.5 of `method`, after one training-mode pass over `x_nchw` with
  BatchNorm momentum 1, so that its running statistics are those images' (predictions
  then vary among them); `torch_model` is left in evaluation mode."""
  import torch  # Only the torch tests call this; the others import this module too.

  from l2p_jax.interop import import_torch_checkpoint

  for module in torch_model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = 1.0
  with torch.no_grad():
    torch_model.train()(x_nchw)
  torch_model.eval()
  variables = import_torch_checkpoint(
    torch_model.state_dict(),
    arch='resnet8',
    num_classes=10,
    method=method,
    width=0.5,
    mean=mean,
    std=std,
  )
  return create_model('resnet8', 10, method, width=0.5, mean=mean, std=std), variables
