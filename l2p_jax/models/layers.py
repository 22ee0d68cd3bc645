"""Layers that make a network randomized: L2P feature noise, PNI weight noise, Bayesian weights.

Every noise parameter lives in the `perturb` variable collection, apart from the
network weights in `params`, so optimizers can treat the two differently by a mask.
Noise is drawn from the `noise` RNG stream and can be switched off per call; every
draw goes through `draw_normal`, which can record it or replay a given one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

PERTURB = 'perturb'
NOISE_RNG = 'noise'
DRAWS = 'draws'

WEIGHT_NOISE_KINDS = ('none', 'pni', 'adv_bnn')
PNI_MODES = ('layer', 'channel', 'element')
# Initial means of Bayesian weights: He-normal as every other method here, or the
# Adv-BNN code's (conv/dense uniform(+-1/sqrt(fan_in)), BatchNorm scale uniform(0, 1)).
BNN_MEAN_INITS = ('kaiming_normal', 'adv_bnn_code')
# How a convolution's input gradient is computed: 'transposed_kernel' (`conv_same`, fast
# on XLA:CPU), 'xla' (JAX's own transpose rule), or 'auto': the first on CPU, else the second.
CONV_INPUT_GRADIENTS = ('auto', 'transposed_kernel', 'xla')

# He-normal as torch.nn.init.kaiming_normal_ (fan_in, untruncated), used by the
# authors' and PNI's CIFAR ResNets.
kaiming_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


@dataclasses.dataclass(frozen=True)
class WeightNoise:
  """How the kernels of conv and dense layers are randomized.

  kind: 'none' (plain weights), 'pni' (W + alpha * N(0, std(W)^2), He et al. 2019)
    or 'adv_bnn' (mean-field Gaussian weights, Adv-BNN, Liu et al. 2019).
  pni_mode: shape of PNI's alpha: one scalar per layer, one per output channel, or
    one per weight element.
  pni_init: initial value of alpha (required for 'pni').
  bnn_init_sigma: initial standard deviation of each Bayesian weight (required for
    'adv_bnn'); the initial values come from the config, which holds their defaults.
  bnn_mean_init: initial means of Bayesian weights, one of BNN_MEAN_INITS.
  bnn_batchnorm: BatchNorm's scale and bias are Bayesian too (Adv-BNN's code).
  """

  kind: str = 'none'
  pni_mode: str = 'layer'
  pni_init: float | None = None
  bnn_init_sigma: float | None = None
  bnn_mean_init: str = 'kaiming_normal'
  bnn_batchnorm: bool = False

  def __post_init__(self):
    if self.kind not in WEIGHT_NOISE_KINDS:
      raise ValueError(
        f'Unknown weight noise kind {self.kind!r}; expected one of {WEIGHT_NOISE_KINDS}.'
      )
    needed = {'pni': 'pni_init', 'adv_bnn': 'bnn_init_sigma'}.get(self.kind)
    if needed and getattr(self, needed) is None:
      raise ValueError(f'Weight noise {self.kind!r} needs {needed}.')
    if self.pni_mode not in PNI_MODES:
      raise ValueError(f'Unknown PNI mode {self.pni_mode!r}; expected one of {PNI_MODES}.')
    if self.bnn_mean_init not in BNN_MEAN_INITS:
      raise ValueError(
        f'Unknown Bayesian mean init {self.bnn_mean_init!r}; expected one of {BNN_MEAN_INITS}.'
      )

  def init(self, default: Callable[..., jax.Array], fan_in: int) -> Callable[..., jax.Array]:
    """The initializer of a conv/dense weight or bias of `fan_in` inputs: `default`,
    except Adv-BNN code's uniform(+-1/sqrt(fan_in)) for its Bayesian means."""
    if self.kind == 'adv_bnn' and self.bnn_mean_init == 'adv_bnn_code':
      bound = fan_in**-0.5
      return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
      )
    return default


@dataclasses.dataclass(frozen=True)
class FeatureNoiseSpec:
  """Whether Learn2Perturb's noise modules follow the stem and every block, and how.

  init_scale: initial value of every theta (required when enabled); per_example: one
  draw per example instead of one per call shared by the batch (the authors' code).
  """

  enabled: bool = False
  init_scale: float | None = None
  per_example: bool = False

  def __post_init__(self):
    if self.enabled and self.init_scale is None:
      raise ValueError('Feature noise needs init_scale.')


def gaussian_kl(mean: jax.Array, log_sigma: jax.Array, prior_sigma: float) -> jax.Array:
  """KL(N(mean, exp(log_sigma)^2) || N(0, prior_sigma^2)), summed over elements."""
  var_ratio = jnp.exp(2.0 * log_sigma) / prior_sigma**2
  return jnp.sum(
    0.5 * (var_ratio + mean**2 / prior_sigma**2 - 1.0) - log_sigma + jnp.log(prior_sigma)
  )


def draw_normal(
  module: nn.Module, name: str, shape: Sequence[int], dtype: Any = jnp.float32
) -> jax.Array:
  """A standard-normal draw for the noise of variable `name` of `module`.

  It comes from the `noise` RNG stream, unless the `draws` collection holds an array
  under `name` for this module: then that array is the draw (to replay draws made
  elsewhere, e.g. by PyTorch). When `draws` is mutable in `apply` (not `init`, whose
  variables would then replay it forever), each draw is recorded there.
  """
  if module.has_variable(DRAWS, name):
    value = module.get_variable(DRAWS, name)
    if value.shape != tuple(shape):
      raise ValueError(
        f'The {DRAWS!r} collection holds a draw of shape {value.shape} '
        f'for {module.name}/{name}, which needs {tuple(shape)}.'
      )
    return value.astype(dtype)
  value = jax.random.normal(module.make_rng(NOISE_RNG), tuple(shape), dtype)
  if module.is_mutable_collection(DRAWS) and not module.is_initializing():
    module.put_variable(DRAWS, name, value)
  return value


def _pni_alpha_shape(mode: str, weight_shape: Sequence[int]) -> tuple[int, ...]:
  """Shape of PNI's alpha for a kernel whose last axis is the output channel."""
  if mode == 'layer':
    return ()
  if mode == 'channel':
    return (weight_shape[-1],)
  return tuple(weight_shape)


def perturbed_weight(
  module: nn.Module,
  name: str,
  shape: Sequence[int],
  init: Callable[..., jax.Array],
  spec: WeightNoise,
  noise: bool,
  perturb_with_pni: bool = True,
) -> jax.Array:
  """Creates weight `name` (in `params`) and returns it, randomized as `spec` says.

  PNI: the draw and std(W) are constants for the gradient (as in PNI's code,
  `weight.std().item()`, which is the unbiased std); alpha gets d/d(alpha) = eta.
  Bayes: `params` holds the mean and `perturb` the log standard deviation; a fresh
  reparametrized sample is drawn per call.
  `perturb_with_pni` is False for biases, which PNI leaves clean.
  """
  weight = module.param(name, init, tuple(shape))
  if spec.kind == 'pni' and perturb_with_pni:
    alpha = module.variable(
      PERTURB,
      f'{name}_alpha',
      lambda: jnp.full(_pni_alpha_shape(spec.pni_mode, shape), spec.pni_init, jnp.float32),
    ).value
    if noise:
      std = jax.lax.stop_gradient(jnp.std(weight, ddof=1))
      eta = draw_normal(module, name, weight.shape, weight.dtype) * std
      weight = weight + alpha * eta
  elif spec.kind == 'adv_bnn':
    log_sigma = module.variable(
      PERTURB,
      f'{name}_log_sigma',
      lambda: jnp.full(tuple(shape), jnp.log(spec.bnn_init_sigma), jnp.float32),
    ).value
    if noise:
      eps = draw_normal(module, name, weight.shape, weight.dtype)
      weight = weight + jnp.exp(log_sigma) * eps
  return weight


def _conv(x: jax.Array, kernel: jax.Array, strides: int, kernel_layout: str = 'HWIO') -> jax.Array:
  """'SAME'-padded NHWC convolution of an odd-sized square kernel."""
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(strides, strides),
    padding=((pad, pad), (pad, pad)),
    dimension_numbers=('NHWC', kernel_layout, 'NHWC'),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_same(
  x: jax.Array, kernel: jax.Array, strides: int, materialized_input: bool = True
) -> jax.Array:
  """`_conv` with an HWIO kernel, differentiated through an explicitly transposed kernel.

  JAX's own gradient of a convolution with respect to its input is a convolution
  whose kernel has input and output features swapped (HWOI). XLA:CPU brings such a
  convolution to its fast Eigen form only in a program's entry computation; inside a
  while loop (a rolled PGD/APGD/EOT `fori_loop`) it falls back to a naive loop nest,
  which made a rolled PGD-7 training step about 4x slower than an unrolled one.
  Here the backward pass convolves with the materialized HWOI copy of the kernel,
  so the input-gradient convolution is in the canonical form everywhere; the values
  are the same convolution's gradient. The kernel gradient reads its input through
  `materialized` (see there) if `materialized_input`.
  """
  return _conv(x, kernel, strides)


def _conv_same_fwd(x: jax.Array, kernel: jax.Array, strides: int, materialized_input: bool):
  return _conv(x, kernel, strides), (x, kernel)


def _conv_same_bwd(
  strides: int, materialized_input: bool, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
  x, kernel = residuals
  swapped = jnp.swapaxes(kernel, 2, 3)  # HWOI; its transpose rule convolves with HWIO.
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, swapped, strides, 'HWOI'), x)
  x = materialized(x, kernel) if materialized_input else x
  _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, strides), kernel)
  return input_vjp(g)[0], kernel_vjp(g)[0]


def materialized(x: jax.Array, like: jax.Array) -> jax.Array:
  """`x` out of a conditional, which XLA does not fuse across, so its consumers read it
  from a buffer instead of recomputing it.

  The kernel gradient convolves a transposed copy of its input (batch and features
  swapped). XLA:CPU fuses that transpose with the elementwise ops that made the input,
  and in a residual stage those are every earlier block's BatchNorm, ReLU and addition,
  recomputed for each transposed copy (fusions of up to 21 operands in ResNet-20's step;
  BENCHMARKS.md point 12). `jax.lax.optimization_barrier` does not stop it: XLA:CPU
  turns barriers into scheduling constraints before it fuses. Both branches return `x`
  (x * 1 is x in IEEE arithmetic); they are written differently because a conditional
  of identical branches is removed, and the predicate is read from `like` at run time
  because one known at compile time is folded; `like` is the kernel, on every device
  whole, since an element of a batch-sharded array would cost a cross-device sum.
  `tests/test_models.py` checks the fusion.
  """
  return jax.lax.cond(
    jnp.isfinite(like.ravel()[0]), lambda value: value, lambda value: value * 1, x
  )


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def resolve_input_gradient(option: str) -> str:
  """The convolution gradient `option` names on this backend: 'auto' is
  'transposed_kernel' on XLA:CPU, where it is measured to help (benchmarks/), and
  'xla' elsewhere, where nothing is gained by forcing it."""
  if option not in CONV_INPUT_GRADIENTS:
    raise ValueError(
      f'Unknown convolution input gradient {option!r}; expected one of {CONV_INPUT_GRADIENTS}.'
    )
  if option == 'auto':
    return 'transposed_kernel' if jax.default_backend() == 'cpu' else 'xla'
  return option


class Conv(nn.Module):
  """Bias-free 'SAME' convolution whose kernel may carry PNI or Bayesian noise;
  `input_gradient` (one of CONV_INPUT_GRADIENTS) picks how it is differentiated, with
  the same values either way; `materialized_input` False keeps `conv_same`'s kernel
  gradient from reading its input through `materialized` (for a network's first
  convolution, whose input is the image: see `resnet.ResNet`)."""

  features: int
  kernel_size: int
  strides: int = 1
  weight_noise: WeightNoise = WeightNoise()
  dtype: Any = jnp.float32
  input_gradient: str = 'auto'
  materialized_input: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, noise: bool = True) -> jax.Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    init = self.weight_noise.init(kaiming_normal, self.kernel_size**2 * x.shape[-1])
    kernel = perturbed_weight(self, 'kernel', shape, init, self.weight_noise, noise)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if resolve_input_gradient(self.input_gradient) == 'transposed_kernel':
      return conv_same(x, kernel, self.strides, self.materialized_input)
    return _conv(x, kernel, self.strides)


class Dense(nn.Module):
  """Dense layer whose kernel (and, for Bayes, bias) may carry noise."""

  features: int
  weight_noise: WeightNoise = WeightNoise()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, noise: bool = True) -> jax.Array:
    spec, fan_in = self.weight_noise, x.shape[-1]
    kernel = perturbed_weight(
      self, 'kernel', (fan_in, self.features), spec.init(kaiming_normal, fan_in), spec, noise
    )
    bias = perturbed_weight(
      self,
      'bias',
      (self.features,),
      spec.init(nn.initializers.zeros, fan_in),
      spec,
      noise,
      perturb_with_pni=False,
    )
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class BayesBatchNorm(nn.Module):
  """BatchNorm with Bayesian scale and bias (Adv-BNN's code, `RandBatchNorm2d`).

  The normalization and its running statistics are Flax's (kept under `stats`); the
  scale's and bias's means are in `params` and their log standard deviations in
  `perturb`, sampled afresh per call like the Bayesian kernels.
  """

  use_running_average: bool
  weight_noise: WeightNoise
  noise: bool = True  # Draws fresh scale and bias; off, their means.
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.BatchNorm(
      use_running_average=self.use_running_average,
      momentum=self.momentum,
      epsilon=self.epsilon,
      use_scale=False,
      use_bias=False,
      dtype=self.dtype,
      name='stats',
    )(x)
    spec, shape = self.weight_noise, (x.shape[-1],)
    scale_init = (
      nn.initializers.uniform(1.0) if spec.bnn_mean_init == 'adv_bnn_code' else nn.initializers.ones
    )
    scale = perturbed_weight(self, 'scale', shape, scale_init, spec, self.noise)
    bias = perturbed_weight(self, 'bias', shape, nn.initializers.zeros, spec, self.noise)
    return y * scale.astype(y.dtype) + bias.astype(y.dtype)


class FeatureNoise(nn.Module):
  """Learn2Perturb's perturbation-injection module: x + theta * eps, eps ~ N(0, 1).

  theta has the shape of one feature map (H, W, C) and lives in `perturb`. By
  default one eps of that shape is drawn per call and shared by the whole batch,
  as in the authors' code; `per_example=True` draws one per example.
  """

  init_scale: float = 0.25
  per_example: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, noise: bool = True) -> jax.Array:
    theta = self.variable(
      PERTURB, 'theta', lambda: jnp.full(x.shape[1:], self.init_scale, jnp.float32)
    ).value
    if not noise:
      return x
    shape = x.shape if self.per_example else x.shape[1:]
    eps = draw_normal(self, 'theta', shape)
    return x + (theta * eps).astype(x.dtype)


def project_perturb(perturb: Any, theta_floor: float = 0.01) -> Any:
  """Clips every L2P noise map from below at `theta_floor` (applied after each update).

  Other perturbation parameters (PNI alphas, Bayesian log-sigmas) pass unchanged.
  """

  def clip(path, leaf):
    name = getattr(path[-1], 'key', None)
    return jnp.maximum(leaf, theta_floor) if name == 'theta' else leaf

  return jax.tree_util.tree_map_with_path(clip, perturb)


KL_SCOPES = ('all', 'classifier')


def bnn_kl(params: Any, perturb: Any, prior_sigma: float, scope: str = 'all') -> jax.Array:
  """Total KL of the Bayesian weights' posterior from the prior N(0, prior_sigma^2).

  Pairs each `<name>_log_sigma` in `perturb` with the mean `<name>` at the same
  place in `params`; zero for a network without Bayesian layers. `scope='all'` sums
  every layer (the Adv-BNN paper's ELBO); 'classifier' only the final dense layer's,
  which is what Adv-BNN's code adds to its loss (its VGG returns the last layer's KL).
  """
  if scope not in KL_SCOPES:
    raise ValueError(f'Unknown KL scope {scope!r}; expected one of {KL_SCOPES}.')
  flat_params = traverse_util.flatten_dict(params)
  total = jnp.zeros((), jnp.float32)
  for path, log_sigma in traverse_util.flatten_dict(perturb or {}).items():
    if scope == 'classifier' and path[0] != 'classifier':
      continue
    if path[-1].endswith('_log_sigma'):
      mean = flat_params[path[:-1] + (path[-1][: -len('_log_sigma')],)]
      total = total + gaussian_kl(mean, log_sigma, prior_sigma)
  return total
