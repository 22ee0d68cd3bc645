"""PyTorch reference CIFAR ResNets in the authors' published layouts.

The interop tests check our models against these, and `l2p_jax.interop.parity.torch_step`
trains them with the authors' step semantics. Needs the `torch` extra.
Written here after the published code (module names, parameter shapes, forward passes):
- `ResNetV1`: Learn2Perturb's `L2P_ResNet_V1` (models/resnet_v1.py) and PNI's
  `CifarResNet` (code/models/noisy_resnet_cifar.py): fb.resnet.torch names, option-A
  `DownsampleA` (stride-2 subsampling, zero channels appended).
- `ResNetKuangliu`: Learn2Perturb's `L2P_ResNet_V2` (models/resnet_v2.py, the names of
  kuangliu/pytorch-cifar's ResNet18 plus sigma maps) and akamaster's CIFAR ResNet-V1
  (option A as a parameter-free shortcut padding planes//4 zero channels on both sides).
- `noise='l2p'`: x + sigma_map * eps, one eps (C, H, W) per forward pass shared by the
  batch, on the stem after BN and on each block's sum; `noise='pni'`: the `noise_Conv2d`
  / `noise_Linear` of code/models/noise_layer.py, W + alpha_w * N(0, W.std()^2).
- `NormalizeLayer`: the authors' `Normalize_layer` (mean/std as (C, 1, 1) Parameters,
  so they appear in the state_dict); they run `nn.Sequential(Normalize_layer, net)`.

Generalized only where the originals hard-code CIFAR-10 at 32x32 with width 1: channel
counts follow `width` as in `l2p_jax.models.resnet_layout`, sigma maps follow
`image_size`, the input channels `in_channels`, and the final pooling is global (theirs:
AvgPool2d(8) / avg_pool2d(4), the same thing on 32x32 inputs). Every noise site draws
through `standard_normal`, so a draw made elsewhere can be injected (`inject_draws`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from l2p_jax.models import resnet_layout


class NormalizeLayer(nn.Module):
  """The authors' input normalization inside the model: (x - mean) / std."""

  def __init__(self, mean, std):
    super().__init__()
    self.mean = nn.Parameter(torch.Tensor(mean).unsqueeze(1).unsqueeze(1), requires_grad=False)
    self.std = nn.Parameter(torch.Tensor(std).unsqueeze(1).unsqueeze(1), requires_grad=False)

  def forward(self, x):
    return x.sub(self.mean).div(self.std)


def standard_normal(module: nn.Module, name: str, like: torch.Tensor) -> torch.Tensor:
  """N(0, 1) shaped like `like` for the noise of `module`'s parameter `name`: the draw
  `inject_draws` left for it, else a fresh one from torch's generator."""
  injected = getattr(module, 'injected_draws', {}).get(name)
  return like.detach().clone().normal_(0, 1) if injected is None else injected


def inject_draws(net: nn.Module, draws: dict[str, torch.Tensor]) -> None:
  """Makes the next forward passes of `net` use `draws` (state_dict key of the
  parameter whose noise it is -> standard-normal tensor) instead of drawing; keys not
  given draw afresh, and an empty dict restores fresh draws everywhere."""
  modules = dict(net.named_modules())
  for module in modules.values():
    module.injected_draws = {}
  for key, value in draws.items():
    owner, _, name = key.rpartition('.')
    modules[owner].injected_draws[name] = value


def l2p_noise(
  x: torch.Tensor, sigma_map: torch.Tensor, owner: nn.Module | None = None, name: str = 'sigma_map'
) -> torch.Tensor:
  """Learn2Perturb's perturbation: one N(0, 1) draw of the map's shape for the batch."""
  normal_noise = (
    sigma_map.clone().normal_(0, 1) if owner is None else standard_normal(owner, name, sigma_map)
  )
  return x + (normal_noise * sigma_map).expand(x.size())


class _PNIWeight:
  """PNI's alpha_w and noisy weight, shared by the conv and linear layers."""

  def _init_alpha(self, pni_mode: str) -> None:
    if pni_mode == 'layer':
      alpha = torch.Tensor([0.25])
    elif pni_mode == 'channel':
      alpha = torch.ones(self.weight.size(0)).view(-1, *[1] * (self.weight.dim() - 1)) * 0.25
    else:
      alpha = torch.ones(self.weight.size()) * 0.25
    self.alpha_w = nn.Parameter(alpha, requires_grad=True)
    self.w_noise = True

  def noisy_weight(self) -> torch.Tensor:
    with torch.no_grad():
      std = self.weight.std().item()
      noise = standard_normal(self, 'weight', self.weight) * std
    return self.weight + self.alpha_w * noise * self.w_noise


class NoiseConv2d(nn.Conv2d, _PNIWeight):
  """PNI's noise_Conv2d."""

  def __init__(self, *args, pni_mode: str = 'layer', **kwargs):
    super().__init__(*args, **kwargs)
    self._init_alpha(pni_mode)

  def forward(self, x):
    return F.conv2d(
      x, self.noisy_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
    )


class NoiseLinear(nn.Linear, _PNIWeight):
  """PNI's noise_Linear."""

  def __init__(self, *args, pni_mode: str = 'layer', **kwargs):
    super().__init__(*args, **kwargs)
    self._init_alpha(pni_mode)

  def forward(self, x):
    return F.linear(x, self.noisy_weight(), self.bias)


def _layers(noise: str | None, pni_mode: str):
  """(conv, linear) constructors: PNI's noisy ones or torch's."""
  if noise == 'pni':
    return (
      lambda *a, **k: NoiseConv2d(*a, pni_mode=pni_mode, **k),
      lambda *a, **k: NoiseLinear(*a, pni_mode=pni_mode, **k),
    )
  return nn.Conv2d, nn.Linear


class DownsampleA(nn.Module):
  """L2P's and PNI's option-A shortcut: stride-2 subsampling, zero channels appended."""

  def __init__(self, stride: int):
    super().__init__()
    self.avg = nn.AvgPool2d(kernel_size=1, stride=stride)

  def forward(self, x):
    x = self.avg(x)
    return torch.cat((x, x.mul(0)), 1)


class PadBothSides(nn.Module):
  """akamaster's option-A LambdaLayer: F.pad(x[:, :, ::2, ::2], planes//4 on each side)."""

  def __init__(self, planes: int):
    super().__init__()
    self.planes = planes

  def forward(self, x):
    pad = self.planes // 4
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), 'constant', 0)


class BlockV1(nn.Module):
  """L2P_Basicblock_V1 / PNI's ResNetBasicblock."""

  def __init__(self, inplanes, planes, stride, downsample, noise, pni_mode, map_hw):
    super().__init__()
    conv, _ = _layers(noise, pni_mode)
    self.add_noise = False
    self.conv_a = conv(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
    self.bn_a = nn.BatchNorm2d(planes)
    self.conv_b = conv(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn_b = nn.BatchNorm2d(planes)
    self.downsample = downsample
    if noise == 'l2p':
      self.sigma_map = nn.Parameter(torch.ones((planes, *map_hw)) * 0.25)

  def forward(self, x):
    residual = x
    basicblock = F.relu(self.bn_a(self.conv_a(x)))
    basicblock = self.bn_b(self.conv_b(basicblock))
    if self.downsample is not None:
      residual = self.downsample(x)
    out = residual + basicblock
    if self.add_noise and hasattr(self, 'sigma_map'):
      out = l2p_noise(out, self.sigma_map, self)
    return F.relu(out)


class ResNetV1(nn.Module):
  """L2P_ResNet_V1 (noise='l2p'), PNI's noisy CifarResNet (noise='pni') or the plain
  CIFAR ResNet they both start from (noise=None)."""

  def __init__(
    self,
    depth,
    num_classes=10,
    width=1.0,
    image_size=32,
    noise=None,
    pni_mode='layer',
    in_channels=3,
  ):
    super().__init__()
    layout = resnet_layout(f'resnet{depth}', width)
    conv, linear = _layers(noise, pni_mode)
    self.add_noise = False
    stem = layout['stem_features']
    self.conv_1_3x3 = conv(in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn_1 = nn.BatchNorm2d(stem)
    if noise == 'l2p':
      self.cn1_sigma_map = nn.Parameter(torch.ones((stem, image_size, image_size)) * 0.25)
    inplanes, side = stem, image_size
    for stage, (blocks, planes) in enumerate(zip(layout['stage_sizes'], layout['stage_features'])):
      layers = []
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        side //= stride
        downsample = DownsampleA(stride) if stride != 1 or inplanes != planes else None
        layers.append(BlockV1(inplanes, planes, stride, downsample, noise, pni_mode, (side, side)))
        inplanes = planes
      setattr(self, f'stage_{stage + 1}', nn.Sequential(*layers))
    self.num_stages = len(layout['stage_sizes'])
    self.classifier = linear(inplanes, num_classes)

  def forward(self, x):
    x = self.bn_1(self.conv_1_3x3(x))
    if self.add_noise and hasattr(self, 'cn1_sigma_map'):
      x = l2p_noise(x, self.cn1_sigma_map, self, 'cn1_sigma_map')
    x = F.relu(x)
    for stage in range(self.num_stages):
      x = getattr(self, f'stage_{stage + 1}')(x)
    x = F.avg_pool2d(x, x.size()[3])
    return self.classifier(x.view(x.size(0), -1))


class BlockKuangliu(nn.Module):
  """L2P_Basicblock_V2 / kuangliu's BasicBlock / akamaster's BasicBlock."""

  def __init__(self, in_planes, planes, stride, shortcut, noise, pni_mode, map_hw):
    super().__init__()
    conv, _ = _layers(noise, pni_mode)
    self.add_noise = False
    self.conv1 = conv(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = (
        PadBothSides(planes)
        if shortcut == 'A'
        else nn.Sequential(
          conv(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )
      )
    if noise == 'l2p':
      self.sigma_map = nn.Parameter(torch.ones((planes, *map_hw)) * 0.25)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out = out + self.shortcut(x)
    if self.add_noise and hasattr(self, 'sigma_map'):
      out = l2p_noise(out, self.sigma_map, self)
    return F.relu(out)


class ResNetKuangliu(nn.Module):
  """L2P_ResNet_V2 for arch 'resnet18' (projection shortcuts), akamaster's ResNet-V1 for
  'resnet<6n+2>' (symmetric zero padding), with the noise of `noise`."""

  def __init__(
    self,
    arch,
    num_classes=10,
    width=1.0,
    image_size=32,
    noise=None,
    pni_mode='layer',
    in_channels=3,
  ):
    super().__init__()
    layout = resnet_layout(arch, width)
    conv, linear = _layers(noise, pni_mode)
    self.add_noise = False
    stem = layout['stem_features']
    if noise == 'l2p':
      self.cn1_sigma_map = nn.Parameter(torch.ones((stem, image_size, image_size)) * 0.25)
    self.conv1 = conv(in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(stem)
    in_planes, side = stem, image_size
    for stage, (blocks, planes) in enumerate(zip(layout['stage_sizes'], layout['stage_features'])):
      layers = []
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        side //= stride
        layers.append(
          BlockKuangliu(
            in_planes, planes, stride, layout['shortcut'], noise, pni_mode, (side, side)
          )
        )
        in_planes = planes
      setattr(self, f'layer{stage + 1}', nn.Sequential(*layers))
    self.num_stages = len(layout['stage_sizes'])
    self.linear = linear(in_planes, num_classes)

  def forward(self, x):
    out = self.bn1(self.conv1(x))
    if self.add_noise and hasattr(self, 'cn1_sigma_map'):
      out = l2p_noise(out, self.cn1_sigma_map, self, 'cn1_sigma_map')
    out = F.relu(out)
    for stage in range(self.num_stages):
      out = getattr(self, f'layer{stage + 1}')(out)
    out = F.avg_pool2d(out, out.size()[3])
    return self.linear(out.view(out.size(0), -1))


def set_noise(model: nn.Module, on: bool) -> None:
  """The authors' put_noise(mode) for L2P modules, and PNI's w_noise flag."""
  for module in model.modules():
    if hasattr(module, 'add_noise'):
      module.add_noise = on
    if hasattr(module, 'w_noise'):
      module.w_noise = on
