"""The authors' training iteration of each method in PyTorch, on `torch_reference`'s networks.

The networks are Learn2Perturb's `L2P_ResNet_V1` / `L2P_ResNet_V2` and PNI's noisy
layers (`l2p_jax.interop.parity.torch_reference`); Adv-BNN's Bayesian layers are added here.
One iteration does what Learn2Perturb's train.py does: a clean forward pass whose
prediction PGD attacks (noise on, training-mode BatchNorm), the 0.5/0.5
clean/adversarial cross-entropy (+ KL for Adv-BNN, - gamma/tau sum sqrt(theta) for
L2P), and SGD-Nesterov updates of the weights and of the noise parameters (L2P
alternating as `alternation` says, theta floored after updates). Noise draws and the
PGD start can be given, so that a run can follow another framework's exactly
(`l2p_jax.interop.parity.trajectory`); `benchmarks/run.py` times it. Needs the `torch` extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from l2p_jax import data
from l2p_jax.interop.parity import torch_reference as ref

# Names of the noise parameters: L2P maps, PNI alphas, Bayesian log-sigmas.
PERTURB_NAMES = ('sigma_map', 'alpha_w', 'log_sigma')
BATCH_NORMS = ('authors', 'ours')
ALTERNATIONS = ('paper', 'authors_code')


class _Bayes:
  """Adv-BNN's mean-field Gaussian weights: `weight` (and `bias`) hold the means, a
  log-sigma per element, a fresh reparametrized sample on every forward pass."""

  def _init_sigma(self, init_sigma: float) -> None:
    self.weight_log_sigma = nn.Parameter(torch.full_like(self.weight, math.log(init_sigma)))
    self.bias_log_sigma = (
      None if self.bias is None else nn.Parameter(torch.full_like(self.bias, math.log(init_sigma)))
    )
    self.w_noise = True  # `torch_reference.set_noise` switches it, as PNI's flag.

  def sampled(self) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fresh (weight, bias) sample, differentiable in the means and log-sigmas
    (the means themselves with noise off)."""
    if not self.w_noise:
      return self.weight, self.bias

    def sample(name: str, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
      return mean + log_sigma.exp() * ref.standard_normal(self, name, mean)

    bias = None if self.bias is None else sample('bias', self.bias, self.bias_log_sigma)
    return sample('weight', self.weight, self.weight_log_sigma), bias

  def kl(self, prior_sigma: float) -> torch.Tensor:
    """KL of this layer's posterior from the prior N(0, prior_sigma^2), as l2p_jax's."""
    pairs = [(self.weight, self.weight_log_sigma)]
    if self.bias is not None:
      pairs.append((self.bias, self.bias_log_sigma))
    return sum(
      torch.sum(
        0.5 * ((2 * s).exp() / prior_sigma**2 + m**2 / prior_sigma**2 - 1)
        - s
        + math.log(prior_sigma)
      )
      for m, s in pairs
    )


class BayesConv2d(nn.Conv2d, _Bayes):
  """Adv-BNN's RandConv2d."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    weight, bias = self.sampled()
    return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class BayesLinear(nn.Linear, _Bayes):
  """Adv-BNN's RandLinear."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, *self.sampled())


class FlaxStatsBatchNorm2d(nn.BatchNorm2d):
  """BatchNorm2d whose running statistics move as Flax's do: toward the biased batch
  variance, and only in the passes whose `update_stats` is True (the loss's, not
  PGD's); it normalizes exactly as BatchNorm2d."""

  update_stats = True

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.training:
      return super().forward(x)
    if self.update_stats:
      with torch.no_grad():
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
        self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
    return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _replace_modules(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> None:
  """Replaces, in place, every child `c` of `model` with make(c) where that is not None,
  carrying its state over."""
  for module in list(model.modules()):
    for name, child in module.named_children():
      new = make(child)
      if new is not None:
        new.load_state_dict(child.state_dict(), strict=False)
        setattr(module, name, new)


def bayesianize(model: nn.Module, init_sigma: float) -> nn.Module:
  """Replaces every Conv2d and Linear of `model` by its Bayesian version, in place."""

  def make(child):
    if type(child) is nn.Conv2d:
      new = BayesConv2d(
        child.in_channels,
        child.out_channels,
        child.kernel_size,
        child.stride,
        child.padding,
        bias=child.bias is not None,
      )
    elif type(child) is nn.Linear:
      new = BayesLinear(child.in_features, child.out_features, bias=child.bias is not None)
    else:
      return None
    new._init_sigma(init_sigma)
    return new

  _replace_modules(model, make)
  return model


def build_model(
  method: str,
  arch: str,
  *,
  num_classes: int = 10,
  width: float = 1.0,
  image_size: int = 32,
  in_channels: int = 3,
  mean=data.KNOWN_CHANNEL_STATS['cifar10'][0],
  std=data.KNOWN_CHANNEL_STATS['cifar10'][1],
  pni_mode: str = 'layer',
  bnn_init_sigma: float = 0.08,
  batch_norm: str = 'authors',
) -> nn.Module:
  """The authors' network for `method` and `arch` (resnet<6n+2>: L2P_ResNet_V1 /
  PNI's CifarResNet; resnet18: L2P_ResNet_V2), behind their input normalization.

  batch_norm: 'authors' keeps torch's BatchNorm2d (running statistics moved by every
  training-mode pass, PGD's included, toward the unbiased variance); 'ours' moves them
  as l2p_jax does (`FlaxStatsBatchNorm2d`).
  """
  if batch_norm not in BATCH_NORMS:
    raise ValueError(f'Unknown batch_norm {batch_norm!r}; expected one of {BATCH_NORMS}.')
  noise = {'l2p': 'l2p', 'pni': 'pni'}.get(method)
  kwargs = dict(
    num_classes=num_classes,
    width=width,
    image_size=image_size,
    noise=noise,
    pni_mode=pni_mode,
    in_channels=in_channels,
  )
  if arch == 'resnet18':
    net = ref.ResNetKuangliu(arch, **kwargs)
  else:
    net = ref.ResNetV1(int(arch.removeprefix('resnet')), **kwargs)
  if method == 'adv_bnn':
    bayesianize(net, bnn_init_sigma)
  if batch_norm == 'ours':
    _replace_modules(
      net,
      lambda child: (
        FlaxStatsBatchNorm2d(child.num_features) if type(child) is nn.BatchNorm2d else None
      ),
    )
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


def pgd(
  model: nn.Module,
  x: torch.Tensor,
  y: torch.Tensor,
  *,
  eps: float,
  steps: int,
  step_size: float,
  start: torch.Tensor | None = None,
  before_step: Callable[[int], None] | None = None,
  signs: list[torch.Tensor] | None = None,
) -> torch.Tensor:
  """L-inf PGD on the summed cross-entropy, input gradients only (torch.autograd.grad),
  as `l2p_jax.attacks.pgd`: from `start`, else a uniform random start.

  before_step(i) runs before step i's forward pass (to inject its noise draws); each
  step's gradient sign is appended to `signs` when given.
  """
  x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) if start is None else start
  for i in range(steps):
    if before_step is not None:
      before_step(i)
    x_adv = x_adv.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), y, reduction='sum')
    (grad,) = torch.autograd.grad(loss, x_adv)
    if signs is not None:
      signs.append(grad.sign())
    x_adv = x_adv.detach() + step_size * grad.sign()
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
  return x_adv.detach()


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
  """(weights, noise parameters) of a model, the two collections of `l2p_jax.training.optim`."""
  weights, perturb = [], []
  for name, p in model.named_parameters():
    if p.requires_grad:
      (perturb if name.rsplit('.', 1)[-1].endswith(PERTURB_NAMES) else weights).append(p)
  return weights, perturb


def _set_update_stats(model: nn.Module, on: bool) -> None:
  """Whether the next passes move the running statistics (FlaxStatsBatchNorm2d only)."""
  for module in model.modules():
    if isinstance(module, FlaxStatsBatchNorm2d):
      module.update_stats = on


def make_train_step(
  model: nn.Module,
  *,
  pgd_steps: int,
  eps: float = 8 / 255,
  step_size: float = 0.01,
  clean_weight: float = 0.5,
  adv_weight: float = 0.5,
  alternation: str = 'paper',
  momentum: float = 0.9,
  nesterov: bool = True,
  weight_decay: float = 1e-4,
  kl_weight: float = 1 / 50000,
  prior_sigma: float = 0.08,
  theta_floor: float = 0.01,
  attack_labels: str = 'prediction',
  attack_batchnorm: str = 'batch',
) -> Callable[..., torch.Tensor]:
  """A function step(x, labels, *, lr, ...) -> loss doing one training iteration on
  `model` (from `build_model`), keeping its optimizers between calls.

  step's keywords: lr; reg_weight (L2P's gamma / tau); noise, adversarial,
  train_perturb (the phase, as `l2p_jax.training.schedule.Phase`); pgd_start (PGD's start, else
  random); draws ({'clean': d, 'adv': d, 'pgd': [d per PGD step]}, each d a
  `torch_reference.inject_draws` dict; None draws afresh); signs (a list receiving
  each PGD step's gradient sign). Adv-BNN's KL is `kl_weight` times the KL of every
  Bayesian layer. attack_batchnorm='running' runs PGD in eval mode (BatchNorm's running
  statistics, the noise still on), as the authors' attacks/pgd.py does.
  """
  if alternation not in ALTERNATIONS:
    raise ValueError(f'Unknown alternation {alternation!r}; expected one of {ALTERNATIONS}.')
  return _TrainStep(
    model,
    pgd_steps=pgd_steps,
    eps=eps,
    step_size=step_size,
    clean_weight=clean_weight,
    adv_weight=adv_weight,
    alternation=alternation,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
    kl_weight=kl_weight,
    prior_sigma=prior_sigma,
    theta_floor=theta_floor,
    attack_labels=attack_labels,
    attack_batchnorm=attack_batchnorm,
  )


def make_train_step_for_config(
  model: nn.Module, config: Any, kl_weight: float
) -> Callable[..., torch.Tensor]:
  """`make_train_step` with every setting taken from a training config (configs/cifar.py),
  so the PyTorch step trains as l2p_jax's `train_step` does for that config."""
  return make_train_step(
    model,
    pgd_steps=config.adv.steps,
    eps=config.adv.eps,
    step_size=config.adv.step_size,
    clean_weight=config.adv.clean_weight,
    adv_weight=config.adv.adv_weight,
    alternation=config.l2p.alternation,
    momentum=config.optim.momentum,
    nesterov=config.optim.nesterov,
    weight_decay=config.optim.weight_decay,
    kl_weight=kl_weight,
    prior_sigma=config.bnn.prior_sigma,
    theta_floor=config.l2p.theta_floor,
    attack_labels=config.adv.labels,
    attack_batchnorm=config.adv.attack_batchnorm,
  )


class _TrainStep:
  """The authors' training iteration on one model with its two SGD optimizers (see
  make_train_step); calling it does one step."""

  def __init__(
    self, model: nn.Module, *, momentum: float, nesterov: bool, weight_decay: float, **settings: Any
  ):
    self.model, self.net = model, model[1]
    self.settings = settings
    weights, self.perturb = split_parameters(model)

    def sgd(params, decay):
      return torch.optim.SGD(
        params, lr=0.0, momentum=momentum, nesterov=nesterov, weight_decay=decay
      )

    self.opt_weights = sgd(weights, weight_decay)
    self.opt_perturb = sgd(self.perturb, 0.0) if self.perturb else None
    self.thetas = [p for n, p in model.named_parameters() if n.endswith('sigma_map')]
    self.bayes = [m for m in model.modules() if isinstance(m, _Bayes)]

  def descend(self, optimizers: Sequence[torch.optim.Optimizer], objective: torch.Tensor) -> None:
    """One step of `optimizers` on `objective`, L2P's maps floored after."""
    # Gradients of the updated collections only, as XLA computes only what is used.
    params = [p for opt in optimizers for group in opt.param_groups for p in group['params']]
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    for p, g in zip(params, grads):  # Unused (theta with noise off): zero, as in JAX.
      p.grad = torch.zeros_like(p) if g is None else g
    for opt in optimizers:
      opt.step()
    with torch.no_grad():
      for t in self.thetas:
        t.clamp_(min=self.settings['theta_floor'])

  def prepare(
    self, draws: dict[str, Any], site: str, update_stats: bool, index: int | None = None
  ) -> None:
    """Injects the draws of pass `site` (PGD step `index`) and sets BatchNorm's mode."""
    site_draws = draws.get(site, {})
    ref.inject_draws(
      self.net, site_draws[index] if index is not None and site_draws else site_draws
    )
    _set_update_stats(self.model, update_stats)

  def forward(
    self, inputs: torch.Tensor, draws: dict[str, Any], site: str, update_stats: bool
  ) -> torch.Tensor:
    self.prepare(draws, site, update_stats)
    return self.model(inputs)

  def loss_of(
    self,
    clean: torch.Tensor,
    x_adv: torch.Tensor | None,
    labels: torch.Tensor,
    draws: dict[str, Any],
    update_stats: bool,
  ) -> torch.Tensor:
    """The mixed clean/adversarial cross-entropy, plus Adv-BNN's weighted KL."""
    s = self.settings
    loss = F.cross_entropy(clean, labels)
    if x_adv is not None:
      adv = self.forward(x_adv, draws, 'adv', update_stats)
      loss = s['clean_weight'] * loss + s['adv_weight'] * F.cross_entropy(adv, labels)
    if self.bayes:
      loss = loss + s['kl_weight'] * sum(m.kl(s['prior_sigma']) for m in self.bayes)
    return loss

  def __call__(
    self,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    reg_weight: float = 0.0,
    noise: bool = True,
    adversarial: bool = True,
    train_perturb: bool = True,
    pgd_start: torch.Tensor | None = None,
    draws: dict[str, Any] | None = None,
    signs: list[torch.Tensor] | None = None,
  ) -> torch.Tensor:
    s = self.settings
    self.model.train()
    ref.set_noise(self.net, noise)
    for opt in (self.opt_weights, self.opt_perturb):
      for group in opt.param_groups if opt else ():
        group['lr'] = lr
    draws = draws or {}
    l2p = bool(self.thetas) and train_perturb
    paper = l2p and s['alternation'] == 'paper'
    regularizer = lambda: -reg_weight * sum(t.sqrt().sum() for t in self.thetas)  # noqa: E731
    if l2p and not paper:  # The authors' code: a theta step on the regularizer alone.
      self.descend([self.opt_perturb], regularizer())
    clean = self.forward(x, draws, 'clean', not paper)
    x_adv = None
    if adversarial:
      target = labels if s['attack_labels'] == 'true' else clean.detach().argmax(1)
      self.model.train(s['attack_batchnorm'] != 'running')
      x_adv = pgd(
        self.model,
        x,
        target,
        eps=s['eps'],
        steps=s['pgd_steps'],
        step_size=s['step_size'],
        start=pgd_start,
        signs=signs,
        before_step=lambda i: self.prepare(draws, 'pgd', False, i),
      )
      self.model.train()
    loss = self.loss_of(clean, x_adv, labels, draws, not paper)
    if paper:  # theta with W fixed, then W at the new theta (same draws, same x_adv).
      self.descend([self.opt_perturb], loss + regularizer())
      self.descend(
        [self.opt_weights],
        self.loss_of(self.forward(x, draws, 'clean', True), x_adv, labels, draws, True),
      )
    else:
      self.descend(
        [self.opt_weights] + ([self.opt_perturb] if self.perturb and train_perturb else []), loss
      )
    return loss.detach()
