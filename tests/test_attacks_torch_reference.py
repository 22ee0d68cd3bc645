"""Our C&W and few-pixel attacks against independent implementations, torchattacks' `CW`
and `OnePixel`, on the same weights: a PyTorch reference ResNet-8 imported into our model,
both attacked on the same images, the reference's verdicts taken on the PyTorch model."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchattacks = pytest.importorskip('torchattacks')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from networks import imported_on_own_statistics  # noqa: E402

from l2p_jax import attacks  # noqa: E402
from l2p_jax.interop.parity import torch_reference as ref  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
SIZE, IMAGES = 16, 64
# Added to every logit on both sides (no prediction or margin changes): torchattacks'
# C&W loss reads the best other logit as max((1 - one_hot) * z), which is max_{j!=y} z_j
# only when that is positive (a zeroed entry wins otherwise).
SHIFT = 100.0


class Counted(torch.nn.Module):
  """A model's logits plus SHIFT, counting forward passes (torchattacks' C&W runs one per
  iteration, so the count says where its early stop ended it)."""

  def __init__(self, model):
    super().__init__()
    self.model, self.forwards = model, 0

  def forward(self, x):
    self.forwards += 1
    return self.model(x) + SHIFT


def nchw(x):
  """NHWC pixels as the NCHW tensor PyTorch takes."""
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope='module')
def reference():
  """(PyTorch model, our logits function on its imported weights, NHWC images, labels):
  a ResNet-8 x0.5 on 16x16 inputs whose BatchNorm holds the statistics of these very
  images (so that predictions vary among them), labels its clean predictions. Images
  stay inside (0.05, 0.95): torchattacks starts C&W from atanh(2x - 1) unclipped, which
  is infinite at 0 and 1, where ours clips to 1 - 1e-6. PyTorch runs on one thread."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  torch.manual_seed(0)
  torch_model = torch.nn.Sequential(
    ref.NormalizeLayer(MEAN, STD), ref.ResNetV1(8, num_classes=10, width=0.5, image_size=SIZE)
  )
  x = np.random.default_rng(0).uniform(0.05, 0.95, (IMAGES, SIZE, SIZE, 3)).astype(np.float32)
  model, variables = imported_on_own_statistics(torch_model, nchw(x), 'none', mean=MEAN, std=STD)
  with torch.no_grad():
    y = torch_model(nchw(x)).argmax(1)
  yield torch_model, lambda x, key: model.apply(variables, x), x, y
  torch.set_num_threads(threads)


def fools_torch(torch_model, x_adv, y):
  """Whether the PyTorch model misclassifies each NHWC input."""
  with torch.no_grad():
    return (torch_model(nchw(x_adv)).argmax(1) != y).numpy()


def test_cw_matches_torchattacks_with_one_binary_step(reference):
  """torchattacks' CW is one C&W run at a fixed c: the same loss, ||x' - x||^2 +
  c * max(z_y - max_{j!=y} z_j, -kappa) summed over the batch, from the same w =
  atanh(2x - 1), with PyTorch's Adam (optax's: the same betas and eps), keeping per
  example the smallest-L2 iterate that fools the model, judged before each update, as
  ours. Ours runs one binary step at c_init = c. torchattacks also stops when the batch's
  cost rose since its check steps // 10 iterations earlier (here after 46 of 50); ours
  runs as many iterations as it did (counted), so both end together.

  Tolerance: only float32 rounding differs (XLA's and ATen's kernels, logits ~1e-7
  apart). At a fixed c the iterates bounce across the decision boundary, and where one
  lands within rounding of it (measured: margins -6e-5 and +1e-4 at one iteration) the
  two verdicts differ and the trajectories become different bounces of the same
  oscillation, whose fooling iterates differ in L2 by a few percent. Measured over 4
  models x c in {0.05, 0.1, 0.3}: the same fooled sets, at most one example of 32 whose
  L2 differs by more than 1e-3 (at most 1.2%), mean L2 within 0.1%. So: equal sets, at
  most 2 examples past 1e-3, none past 5%, the mean within 0.5%."""
  torch_model, logits_fn, x, y = reference
  x, y, c, lr, steps = x[:32], y[:32], 0.1, 0.01, 50
  counted = Counted(torch_model).eval()
  theirs = torchattacks.CW(counted, c=c, kappa=0, steps=steps, lr=lr)(nchw(x), y).numpy()
  iterations = counted.forwards
  assert 1 < iterations <= steps
  attack = functools.partial(
    attacks.cw_l2,
    lambda x, key: logits_fn(x, key) + SHIFT,
    c_init=c,
    learning_rate=lr,
    kappa=0.0,
    binary_steps=1,
    steps=iterations,
  )
  ours = jax.jit(attack)(jax.random.key(0), jnp.asarray(x), jnp.asarray(y.numpy()))
  fooled = fools_torch(torch_model, theirs.transpose(0, 2, 3, 1), y)
  assert 8 <= fooled.sum() <= 24  # c is where some examples fool and some do not
  np.testing.assert_array_equal(np.asarray(ours.success), fooled)
  np.testing.assert_array_equal(fools_torch(torch_model, np.asarray(ours.x_adv), y), fooled)
  theirs_l2 = np.sqrt(np.sum(np.square(theirs - nchw(x).numpy()), axis=(1, 2, 3)))
  ours_l2 = np.asarray(ours.l2)
  np.testing.assert_array_equal(ours_l2[~fooled], 0.0)  # x itself, in both
  np.testing.assert_array_equal(theirs_l2[~fooled], 0.0)
  relative = np.abs(ours_l2 - theirs_l2)[fooled] / theirs_l2[fooled]
  assert np.sum(relative > 1e-3) <= 2 and relative.max() < 0.05, relative
  assert ours_l2[fooled].mean() == pytest.approx(theirs_l2[fooled].mean(), rel=5e-3)


def changed_pixels(x_adv, x):
  """How many pixels (any channel) of each image differ from x."""
  return np.sum(np.any(np.asarray(x_adv) != x, axis=-1), axis=(1, 2))


def test_one_pixel_succeeds_as_often_as_torchattacks(reference):
  """Both are differential evolutions over (row, column, RGB) with the same population
  (torchattacks' popsize 20 makes 20 members of 5 dimensions), generations and crossover
  (1: the trial is the mutant), from a uniform random population, minimising the true
  class's probability; they differ in the mutation (ours DE/rand/1 with F = 0.5, theirs
  best1 with F drawn in [0.5, 1) every generation) and the stop (ours: the first fooling
  candidate of any member; theirs: the best member fooling after a generation), and
  draw different random numbers, so they agree only statistically.

  Tolerance: McNemar's test on the images the two judge differently. If both attacks are
  equally strong, each of these n discordant images is one that ours alone fooled with
  probability 1/2, so b (ours alone) - c (theirs alone) has mean 0 and standard
  deviation sqrt(n); |b - c| <= 3 sqrt(n) fails a correct pair about 0.3% of the time
  (normal approximation), while an attack that finds half as many is far outside it.
  Measured: ours fools 29 of 64, theirs 22, b = 10, c = 3 (|b - c| = 7 <= 10.8).
  Independently of the reference, every example ours calls fooled fools the PyTorch
  model and at most one pixel differs from x."""
  torch_model, logits_fn, x, y = reference
  population, generations = 20, 10
  state = np.random.get_state()  # torchattacks' DE draws from NumPy's global generator
  np.random.seed(0)
  try:
    theirs = torchattacks.OnePixel(torch_model, pixels=1, steps=generations, popsize=population)(
      nchw(x), y
    )
  finally:
    np.random.set_state(state)
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  attack = functools.partial(
    attacks.few_pixel,
    logits_fn,
    n_pixels=1,
    population=population,
    iterations=generations,
    chunk_size=population,
  )
  ours = jax.jit(attack)(jax.random.key(0), jnp.asarray(x), jnp.asarray(y.numpy()))
  success = np.asarray(ours.success)
  assert fools_torch(torch_model, np.asarray(ours.x_adv), y)[success].all()
  assert changed_pixels(ours.x_adv, x).max() <= 1 and changed_pixels(theirs, x).max() <= 1
  theirs_fooled = fools_torch(torch_model, theirs, y)
  assert 0 < theirs_fooled.sum() < IMAGES and 0 < success.sum() < IMAGES
  b, c = np.sum(success & ~theirs_fooled), np.sum(~success & theirs_fooled)
  assert abs(b - c) <= 3 * np.sqrt(b + c), (success.sum(), theirs_fooled.sum(), b, c)


def mcnemar_agrees(ours, theirs):
  """McNemar's 3-sigma bound on the images only one of two equally strong attacks fools
  (test_one_pixel_succeeds_as_often_as_torchattacks explains it)."""
  b, c = np.sum(ours & ~theirs), np.sum(~ours & theirs)
  return abs(b - c) <= 3 * np.sqrt(b + c)


def ours_on(attack, logits_fn, x, y, **params):
  """Our `attack` on the NHWC images x, labels y (a torch tensor), key 0."""
  attack = jax.jit(functools.partial(attack, logits_fn, **params))
  return attack(jax.random.key(0), jnp.asarray(x), jnp.asarray(y.numpy()))


def torch_on(attack, x, y):
  """A torchattacks attack's examples on the NHWC images x, as NHWC NumPy."""
  return attack(nchw(x), y).detach().numpy().transpose(0, 2, 3, 1)


EPS = 0.003  # Where APGD fools about half of the images (9 of 20).


def test_apgd_t_fools_as_many_images_as_torchattacks(reference):
  """torchattacks' APGDT ports AutoAttack's APGD-T (targeted DLR towards the 9 highest
  other classes in turn, one restart each); ours follows the same paper and code with
  other random starts (apgd.py lists the departures), so on 20 images the counts of
  images fooled may differ by one. Measured at 20 steps: 10 and 10 (APGD-CE: 9, 9).
  Every image ours calls fooled fools the PyTorch model."""
  torch_model, logits_fn, x, y = reference
  x, y = x[:20], y[:20]
  theirs = fools_torch(
    torch_model, torch_on(torchattacks.APGDT(torch_model, eps=EPS, steps=20, n_classes=10), x, y), y
  )
  ours = ours_on(attacks.apgd_targeted, logits_fn, x, y, eps=EPS, steps=20)
  fooled = fools_torch(torch_model, np.asarray(ours.x_adv), y)
  assert fooled[np.asarray(ours.success)].all()
  assert 0 < theirs.sum() < 20 and abs(int(fooled.sum()) - int(theirs.sum())) <= 1
  assert np.abs(np.asarray(ours.x_adv) - x).max() <= EPS + 1e-6


def test_square_fools_as_often_as_torchattacks(reference):
  """torchattacks' Square ports the authors' L-inf Square Attack (striped start, random
  squares of +-2 eps on the p_init schedule, margin loss); ours draws other random
  numbers and each image's own square place: McNemar's 3-sigma bound on 64 images at 300
  queries. Measured: 13 and 13, no image fooled by one alone."""
  torch_model, logits_fn, x, y = reference
  square = torchattacks.Square(torch_model, eps=EPS, n_queries=300, seed=0)
  theirs = fools_torch(torch_model, torch_on(square, x, y), y)
  ours = ours_on(attacks.square, logits_fn, x, y, eps=EPS, queries=300)
  fooled = fools_torch(torch_model, np.asarray(ours.x_adv), y)
  np.testing.assert_array_equal(np.asarray(ours.success), fooled)
  assert 0 < theirs.sum() < IMAGES and mcnemar_agrees(fooled, theirs)
  assert np.abs(np.asarray(ours.x_adv) - x).max() <= EPS + 1e-6


def test_autoattack_cascade_leaves_the_robust_accuracy_of_torchattacks(reference):
  """The standard cascade without FAB-T (ours builds none): torchattacks' MultiAttack
  runs APGD-CE, APGD-T and Square, each on the images the earlier left robust, as ours
  does; the final robust accuracy on 64 images agrees within McNemar's bound."""
  torch_model, logits_fn, x, y = reference
  cascade = torchattacks.MultiAttack(
    [
      torchattacks.APGD(torch_model, eps=EPS, steps=20),
      torchattacks.APGDT(torch_model, eps=EPS, steps=20, n_classes=10),
      torchattacks.Square(torch_model, eps=EPS, n_queries=300, seed=0),
    ]
  )
  theirs = fools_torch(torch_model, torch_on(cascade, x, y), y)
  ours = ours_on(attacks.autoattack, logits_fn, x, y, eps=EPS, steps=20, queries=300)
  fooled = fools_torch(torch_model, np.asarray(ours.x_adv), y)
  assert fooled[np.asarray(ours.success)].all()
  assert 0 < theirs.sum() < IMAGES and mcnemar_agrees(fooled, theirs), (fooled.sum(), theirs.sum())
