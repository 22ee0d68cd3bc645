"""The networks: CIFAR ResNet-V1(6n+2) at any width and ResNet-V2(18), and the layers
that randomize them.

`resnet_settings` turns an architecture name and width into a plain ResNet's settings;
which randomization a network carries is its method's choice (`l2p_jax.methods`).
"""

from l2p_jax.models.architectures import (
  ARCHITECTURES_HELP,
  draw_noise,
  inference_logits,
  model_apply,
  noise_drawn_ahead,
  resnet_layout,
  resnet_settings,
)
from l2p_jax.models.layers import (
  BNN_MEAN_INITS,
  CONV_INPUT_GRADIENTS,
  DRAWS,
  KL_SCOPES,
  NOISE_RNG,
  PERTURB,
  PNI_MODES,
  FeatureNoise,
  FeatureNoiseSpec,
  WeightNoise,
  bnn_kl,
  gaussian_kl,
  project_perturb,
  resolve_input_gradient,
)
from l2p_jax.models.resnet import ResNet

__all__ = [
  'draw_noise',
  'inference_logits',
  'model_apply',
  'noise_drawn_ahead',
  'BNN_MEAN_INITS',
  'KL_SCOPES',
  'PNI_MODES',
  'ResNet',
  'WeightNoise',
  'FeatureNoise',
  'FeatureNoiseSpec',
  'CONV_INPUT_GRADIENTS',
  'DRAWS',
  'resolve_input_gradient',
  'resnet_settings',
  'bnn_kl',
  'gaussian_kl',
  'project_perturb',
  'PERTURB',
  'NOISE_RNG',
  'resnet_layout',
]
