r"""The paper's CIFAR experiments: any method on any CIFAR ResNet and dataset.

The argument is `METHOD,ARCH,DATASET[,authors_code][,tiny]` (each part optional, in
that order), or just `tiny`; defaults are Learn2Perturb on ResNet-V1(20) and CIFAR-10:

  python train.py --config configs/cifar.py:l2p,resnet20,cifar10 --workdir runs/l2p_r20
  python train.py --config configs/cifar.py:pni,resnet18,cifar100 --workdir runs/pni_r18
  python train.py --config configs/cifar.py:vanilla,resnet20,cifar10 \
      --config.model.width=4 --workdir runs/vanilla_r20x4
  python train.py --config configs/cifar.py:adv_bnn,resnet20,cifar10,authors_code \
      --workdir runs/adv_bnn_code_r20
  python train.py --config configs/cifar.py:l2p,resnet8,fashion_mnist,tiny --workdir /tmp/tiny

METHOD is one of none, vanilla, pni, adv_bnn, l2p; ARCH is resnet<6n+2> (ResNet-V1)
or resnet18 (ResNet-V2(18)); DATASET is any TFDS image-classification name. The
schedules are the papers': supplementary 1.4 for l2p, vanilla and none; PNI's own
for pni; Adv-BNN's paper (PGD-10, prior 0.08, the KL of every layer at 1/N) for
adv_bnn. `authors_code` (adv_bnn only) switches every field in which Adv-BNN's code
(xuanqing94/BayesianDefense) differs from its paper to the code's value (see
_ADV_BNN_CODE). `tiny` shrinks model, data and schedule so that a run finishes in
about a minute on a 2-core CPU (ResNet-8 unless ARCH is given).
"""

import ml_collections

from l2p_jax import methods
from l2p_jax.models import resnet_layout

MODIFIERS = ('authors_code', 'tiny')

# Per-method changes to the supplementary's schedule (section 1.4), whose PGD training
# starts at epoch 0 (for methods that train adversarially).
_METHOD_OVERRIDES = {
  'l2p': dict(noise_start_epoch=10, adv_start_epoch=20),
  # PNI (He et al. 2019): 160 epochs, lr x0.1 at 80 and 120, wd 3e-4, AT after 5.
  'pni': dict(num_epochs=160, lr_boundaries=(80, 120), weight_decay=3e-4, adv_start_epoch=5),
  # Adv-BNN (Liu et al. 2019): prior and initial sigma 0.08, PGD-10 in training.
  'adv_bnn': dict(adv_start_epoch=0, adv_steps=10),
}

# Adv-BNN's code (main_adv_vi.py, models/layers/*.py, utils/loss.py) where it differs
# from its paper: only the classifier's KL reaches the loss (its VGG returns the last
# layer's KL, issue #5 there); Adam at lr 0.01, made anew with lr / 10 after stages of
# 80, 60, 40 and 20 epochs, no weight decay; means uniform(+-1/sqrt(fan_in)), Bayesian
# BatchNorm (scale mean uniform(0, 1)); the loss is the adversarial cross-entropy alone,
# on true labels; PGD-10 of step 0.007 without random start, run with net.eval()
# (BatchNorm's running statistics).
_ADV_BNN_CODE = {
  'model.bnn_mean_init': 'adv_bnn_code',
  'model.bnn_batchnorm': True,
  'bnn.kl_scope': 'classifier',
  'optim.optimizer': 'adam',
  'optim.learning_rate': 0.01,
  'optim.lr_boundaries': (80, 140, 180),
  'optim.restart_at_boundaries': True,
  'optim.weight_decay': 0.0,
  'num_epochs': 200,
  'adv.clean_weight': 0.0,
  'adv.adv_weight': 1.0,
  'adv.labels': 'true',
  'adv.step_size': 0.007,
  'adv.random_start': False,
  'adv.attack_batchnorm': 'running',
}


def get_config(arg: str = 'l2p,resnet20,cifar10') -> ml_collections.ConfigDict:
  """The experiment named by `arg` (see the module docstring)."""
  parts = [p for p in arg.split(',') if p]
  modifiers = {p for p in parts if p in MODIFIERS}
  parts = [p for p in parts if p not in MODIFIERS]
  defaults = ['l2p', 'resnet20', 'cifar10']
  if len(parts) > 3:
    raise ValueError(
      f'Config argument {arg!r} has too many parts; expected '
      'METHOD,ARCH,DATASET[,authors_code][,tiny].'
    )
  method, arch, dataset = parts + defaults[len(parts) :]
  if method not in methods.names():
    raise methods.UnknownMethodError(
      f'Unknown method {method!r} in config argument {arg!r}; expected one of {methods.names()}.'
    )
  if 'authors_code' in modifiers and method != 'adv_bnn':
    raise ValueError(
      f'authors_code in config argument {arg!r} applies to adv_bnn only; '
      'for l2p use --config.l2p.alternation=authors_code.'
    )
  resnet_layout(arch)  # An unknown ARCH fails here, naming the accepted ones.
  over = dict(
    num_epochs=350,
    lr_boundaries=(150, 250),
    weight_decay=1e-4,
    noise_start_epoch=0,
    adv_steps=7,
    adv_start_epoch=0 if methods.get(method).adversarial else -1,
  )
  over.update(_METHOD_OVERRIDES.get(method, {}))

  c = ml_collections.ConfigDict()
  c.method = method  # A registered method (l2p_jax.methods): none | vanilla | pni | adv_bnn | l2p
  c.seed = 0  # Root of every random key: init, data order, augmentation, noise, PGD.

  c.model = ml_collections.ConfigDict()
  c.model.arch = arch  # resnet<6n+2> (ResNet-V1, option-A shortcuts) | resnet18 (V2)
  c.model.width = 1.0  # Channel multiplier (1.5, 2, 4 in the paper's width study).
  c.model.l2p_init = 0.25  # Initial value of every L2P noise parameter theta.
  c.model.l2p_per_example = False  # False: one noise draw per batch (authors' code).
  c.model.pni_mode = 'layer'  # PNI alpha per layer | channel | element.
  c.model.pni_init = 0.25  # Initial PNI alpha.
  c.model.bnn_init_sigma = 0.08  # Adv-BNN initial weight std.
  c.model.bnn_mean_init = 'kaiming_normal'  # Adv-BNN means: kaiming_normal | adv_bnn_code.
  c.model.bnn_batchnorm = False  # Adv-BNN: BatchNorm scale and bias Bayesian too.
  c.model.dtype = 'float32'  # Compute dtype: float32 | bfloat16 (params stay float32).
  # Convolution input gradients: auto (transposed_kernel on XLA:CPU, where it is faster;
  # xla elsewhere) | transposed_kernel | xla. The values are the same either way.
  c.model.conv_input_gradient = 'auto'

  c.data = ml_collections.ConfigDict()
  c.data.dataset = dataset  # TFDS name: cifar10, cifar100, fashion_mnist, ...
  # auto: local_dir if set, else TFDS if prepared (or download), else the folder a system
  # package installs (Debian's dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)
  # | tfds (prepared under data_dir) | local (original archives in local_dir).
  c.data.source = 'auto'
  c.data.data_dir = ''  # TFDS's own data directory; '' means the TFDS default.
  c.data.local_dir = ''  # Folder with the original archives (source=local or auto).
  c.data.download = False  # Allow TFDS to download and prepare the dataset.
  c.data.train_split = 'train'  # Split to train on.
  c.data.eval_split = 'test'  # Split evaluated after every epoch.
  c.data.train_examples = 0  # Use only the first N training examples (0: all).
  c.data.eval_examples = 0  # Evaluate on the first N examples (0: all).
  c.data.normalization = 'dataset'  # dataset (true stats) | l2p_code | pni_code.
  c.data.on_device = True  # Keep the training split on every device (CIFAR: 150 MB);
  # False gathers batches on the host and transfers each (for splits that don't fit).

  c.num_epochs = over['num_epochs']  # Length of training.
  c.batch_size = 128  # Global batch, split over all devices.
  c.eval_batch_size = 256  # Global evaluation batch.

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = 'sgd'  # sgd (momentum below) | adam (PyTorch's defaults).
  c.optim.learning_rate = 0.1  # Initial learning rate (weights and noise alike).
  c.optim.lr_boundaries = over['lr_boundaries']  # Epochs where lr is multiplied...
  c.optim.lr_decay = 0.1  # ...by this factor.
  c.optim.momentum = 0.9  # SGD momentum.
  c.optim.nesterov = True  # Nesterov momentum.
  c.optim.weight_decay = over['weight_decay']  # Weight decay on `params` only.
  c.optim.restart_at_boundaries = False  # Fresh optimizer state at every lr boundary.

  c.adv = ml_collections.ConfigDict()
  c.adv.start_epoch = over['adv_start_epoch']  # First adversarial epoch; -1 never.
  c.adv.eps = 8 / 255  # L-inf radius of training PGD.
  c.adv.steps = over['adv_steps']  # PGD steps in training.
  c.adv.step_size = 0.01  # PGD step size.
  c.adv.random_start = True  # Uniform random start in the eps-ball.
  c.adv.labels = 'prediction'  # Attack the model's clean prediction (codes) | true.
  c.adv.clean_weight = 0.5  # alpha: weight of the clean cross-entropy.
  c.adv.adv_weight = 0.5  # beta: weight of the adversarial cross-entropy.
  c.adv.attack_batchnorm = 'batch'  # BatchNorm statistics PGD sees: batch | running.
  c.adv.unroll = False  # Unroll the PGD loop (much faster on XLA:CPU, slower compile).
  c.adv.draw_noise_ahead = True  # Draw PGD's noise before its loop (same draws, faster).

  c.l2p = ml_collections.ConfigDict()
  c.l2p.noise_start_epoch = over['noise_start_epoch']  # First epoch with noise on.
  c.l2p.gamma = 1e-4  # Weight of the harmonic regularizer -gamma/tau(t) sum sqrt(theta).
  c.l2p.theta_floor = 0.01  # theta is clipped from below after every update.
  c.l2p.alternation = 'paper'  # paper: theta step, then W step | authors_code.

  c.bnn = ml_collections.ConfigDict()
  c.bnn.prior_sigma = 0.08  # Std of the Gaussian prior on every weight.
  c.bnn.kl_scope = 'all'  # Layers whose KL enters the loss: all (paper) | classifier.
  c.bnn.kl_alpha = 1.0  # The loss adds kl_alpha / N * KL (the ELBO at 1).
  # N of that weight; None: the size of the whole training split (data.train_examples
  # does not change it, so a subset run keeps the prior of the full one).
  c.bnn.kl_examples = ml_collections.config_dict.placeholder(int)

  c.eval = ml_collections.ConfigDict()
  c.eval.pgd_steps = 7  # PGD steps of the per-epoch robust accuracy (eps as training).
  c.eval.every_epochs = 1  # Evaluate every N epochs (and after the last).

  c.checkpoint_every_steps = 500  # Also checkpoint mid-epoch (crash loses less).
  c.keep_checkpoints = 2  # Checkpoints kept on disk.
  c.log_every_steps = 50  # Scalars to TensorBoard and the non-finite check.
  c.progress_bar = True  # tqdm bar with rate and ETA.
  # Comma-separated modules train.py imports before it builds this config: a user's
  # defense registered there (l2p_jax.methods.register) can be named as METHOD.
  c.modules = ''

  if 'authors_code' in modifiers:
    for field, value in _ADV_BNN_CODE.items():
      section, _, name = field.rpartition('.')
      (c[section] if section else c)[name] = value

  if 'tiny' in modifiers:
    c.model.arch = arch if len(parts) >= 2 else 'resnet8'  # An explicit ARCH stays.
    c.model.width = 0.5
    c.data.train_examples = 512
    c.data.eval_examples = 128
    c.num_epochs = 3
    c.batch_size = 64
    c.eval_batch_size = 128
    c.optim.lr_boundaries = (2,)
    c.adv.steps = 2
    c.eval.pgd_steps = 2
    c.adv.start_epoch = min(c.adv.start_epoch, 1)
    c.l2p.noise_start_epoch = min(c.l2p.noise_start_epoch, 0)
    c.checkpoint_every_steps = 4
    c.log_every_steps = 4

  c.lock()  # train.py's flag locks it as well; a mistyped key is an error.
  return c
