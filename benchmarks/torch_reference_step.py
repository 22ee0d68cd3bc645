"""PyTorch reference of one training iteration of each method, for side-by-side timing.

The networks are `tests/torch_reference.py`'s modules in the authors' layouts
(Learn2Perturb's `L2P_ResNet_V1` / `L2P_ResNet_V2`, PNI's noisy layers); Adv-BNN's
Bayesian layers are added here. One iteration does what `l2p_jax.train.train_step`
does in its all-on phase: CIFAR augmentation of a uint8 batch, PGD examples against the
model's clean prediction (noise on, training-mode BatchNorm as in the authors' code),
the 0.5/0.5 clean/adversarial cross-entropy (+ KL for Adv-BNN, - gamma/tau sum
sqrt(theta) for L2P), and SGD-Nesterov updates of the weights and of the noise
parameters (L2P alternating as `l2p.alternation` says, theta floored after updates).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Names of the noise parameters: L2P maps, PNI alphas, Bayesian log-sigmas.
PERTURB_NAMES = ('sigma_map', 'alpha_w', 'log_sigma')


def reference_modules():
  """tests/torch_reference.py, the PyTorch networks the interop tests check ours against."""
  if 'torch_reference' not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        'torch_reference', ROOT / 'tests' / 'torch_reference.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules['torch_reference'] = module
  return sys.modules['torch_reference']


class _Bayes:
  """Adv-BNN's mean-field Gaussian weights: `weight` (and `bias`) hold the means, a
  log-sigma per element, a fresh reparametrized sample on every forward pass."""

  def _init_sigma(self, init_sigma: float) -> None:
    self.weight_log_sigma = nn.Parameter(torch.full_like(self.weight, math.log(init_sigma)))
    self.bias_log_sigma = (None if self.bias is None else
                           nn.Parameter(torch.full_like(self.bias, math.log(init_sigma))))

  def sampled(self) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fresh (weight, bias) sample, differentiable in the means and log-sigmas."""
    sample = lambda mean, log_sigma: mean + log_sigma.exp() * torch.randn_like(mean)  # noqa: E731
    bias = None if self.bias is None else sample(self.bias, self.bias_log_sigma)
    return sample(self.weight, self.weight_log_sigma), bias

  def kl(self, prior_sigma: float) -> torch.Tensor:
    """KL of this layer's posterior from the prior N(0, prior_sigma^2), as l2p_jax's."""
    pairs = [(self.weight, self.weight_log_sigma)]
    if self.bias is not None:
      pairs.append((self.bias, self.bias_log_sigma))
    return sum(torch.sum(0.5 * ((2 * s).exp() / prior_sigma**2 + m**2 / prior_sigma**2 - 1)
                         - s + math.log(prior_sigma)) for m, s in pairs)


class BayesConv2d(nn.Conv2d, _Bayes):
  """Adv-BNN's RandConv2d."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    weight, bias = self.sampled()
    return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class BayesLinear(nn.Linear, _Bayes):
  """Adv-BNN's RandLinear."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, *self.sampled())


def bayesianize(model: nn.Module, init_sigma: float) -> nn.Module:
  """Replaces every Conv2d and Linear of `model` by its Bayesian version, in place."""
  for module in list(model.modules()):
    for name, child in module.named_children():
      if type(child) is nn.Conv2d:
        new = BayesConv2d(child.in_channels, child.out_channels, child.kernel_size,
                          child.stride, child.padding, bias=child.bias is not None)
      elif type(child) is nn.Linear:
        new = BayesLinear(child.in_features, child.out_features, bias=child.bias is not None)
      else:
        continue
      new.load_state_dict(child.state_dict())
      new._init_sigma(init_sigma)
      setattr(module, name, new)
  return model


def build_model(method: str, arch: str, *, num_classes: int = 10, width: float = 1.0,
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                pni_mode: str = 'layer', bnn_init_sigma: float = 0.08) -> nn.Module:
  """The authors' network for `method` and `arch` (resnet<6n+2>: L2P_ResNet_V1 /
  PNI's CifarResNet; resnet18: L2P_ResNet_V2), behind their input normalization."""
  ref = reference_modules()
  noise = {'l2p': 'l2p', 'pni': 'pni'}.get(method)
  if arch == 'resnet18':
    net = ref.ResNetKuangliu(arch, num_classes, width, noise=noise, pni_mode=pni_mode)
  else:
    net = ref.ResNetV1(int(arch.removeprefix('resnet')), num_classes, width, noise=noise,
                       pni_mode=pni_mode)
  if method == 'adv_bnn':
    bayesianize(net, bnn_init_sigma)
  ref.set_noise(net, noise is not None)
  return nn.Sequential(ref.NormalizeLayer(mean, std), net)


def augment(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
  """Random crop with `pad`-pixel zero padding and random horizontal flip, per example,
  of an NCHW uint8 batch, returned as floats in [0, 1]."""
  x = images.float() / 255
  n, c, h, w = x.shape
  padded = F.pad(x, (pad,) * 4)
  dy, dx = torch.randint(0, 2 * pad + 1, (2, n), device=x.device)
  rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
  cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
  batch = torch.arange(n, device=x.device)[:, None, None, None]
  channel = torch.arange(c, device=x.device)[None, :, None, None]
  cropped = padded[batch, channel, rows, cols]
  flip = torch.rand(n, device=x.device) < 0.5
  return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
        step_size: float) -> torch.Tensor:
  """L-inf PGD from a uniform random start on the summed cross-entropy, input gradients
  only (torch.autograd.grad), as `l2p_jax.attacks.pgd`."""
  x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
  for _ in range(steps):
    x_adv.requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), y, reduction='sum')
    grad, = torch.autograd.grad(loss, x_adv)
    x_adv = x_adv.detach() + step_size * grad.sign()
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
  return x_adv.detach()


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
  """(weights, noise parameters) of a model, the two collections of `l2p_jax.optim`."""
  weights, perturb = [], []
  for name, p in model.named_parameters():
    if p.requires_grad:
      (perturb if name.rsplit('.', 1)[-1].endswith(PERTURB_NAMES) else weights).append(p)
  return weights, perturb


def make_train_step(model: nn.Module, method: str, *, adversarial: bool, pgd_steps: int,
                    eps: float = 8 / 255, step_size: float = 0.01,
                    clean_weight: float = 0.5, adv_weight: float = 0.5,
                    alternation: str = 'paper', lr: float = 0.1,
                    weight_decay: float = 1e-4, reg_weight: float = 1e-4,
                    kl_weight: float = 1 / 50000, prior_sigma: float = 0.08,
                    theta_floor: float = 0.01
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
  """A function (uint8 NCHW images, labels) -> loss doing one training iteration of
  `method` on `model`, with the optimizers it keeps between calls."""
  weights, perturb = split_parameters(model)
  sgd = lambda params, decay: torch.optim.SGD(  # noqa: E731
      params, lr=lr, momentum=0.9, nesterov=True, weight_decay=decay)
  opt_weights = sgd(weights, weight_decay)
  opt_perturb = sgd(perturb, 0.0) if perturb else None
  thetas = [p for n, p in model.named_parameters() if n.endswith('sigma_map')]
  bayes = [m for m in model.modules() if isinstance(m, _Bayes)]

  def regularizer() -> torch.Tensor:
    return -reg_weight * sum(t.sqrt().sum() for t in thetas)

  def floor_thetas() -> None:
    with torch.no_grad():
      for t in thetas:
        t.clamp_(min=theta_floor)

  def descend(optimizers, objective: torch.Tensor) -> None:
    # Gradients of the updated collections only, as XLA computes only what is used.
    params = [p for opt in optimizers for group in opt.param_groups for p in group['params']]
    for p, g in zip(params, torch.autograd.grad(objective, params)):
      p.grad = g
    for opt in optimizers:
      opt.step()
    floor_thetas()

  def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.train()
    x = augment(images)
    x_adv = None
    if adversarial:
      with torch.no_grad():
        target = model(x).argmax(1)
      x_adv = pgd(model, x, target, eps=eps, steps=pgd_steps, step_size=step_size)

    def loss_fn() -> torch.Tensor:
      loss = F.cross_entropy(model(x), labels)
      if x_adv is not None:
        loss = clean_weight * loss + adv_weight * F.cross_entropy(model(x_adv), labels)
      if bayes:
        loss = loss + kl_weight * sum(m.kl(prior_sigma) for m in bayes)
      return loss

    if thetas and alternation == 'paper':
      loss = loss_fn()
      descend([opt_perturb], loss + regularizer())
      descend([opt_weights], loss_fn())
    else:
      if thetas:
        descend([opt_perturb], regularizer())
      loss = loss_fn()
      descend([opt_weights] + ([opt_perturb] if opt_perturb else []), loss)
    return loss.detach()

  return step
