r"""Trains a run here and the authors' PyTorch step from the same start and reports,
step by step, how far they part (needs the torch extra: pip install -e ".[torch]").

  python compare_torch.py --config configs/cifar.py:l2p,resnet20,cifar10,tiny --steps 50
  python compare_torch.py --config configs/cifar.py:pni,resnet8,fashion_mnist,tiny \
      --config.data.source=local --config.data.local_dir=~/data/fashion-mnist \
      --output docs/trajectories/pni

Writes OUTPUT.json (the per-step report) and OUTPUT.png (divergence against step).
"""

import json
import os

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from l2p_jax import experiment, methods
from l2p_jax.interop.parity import trajectory, trajectory_report
from l2p_jax.runtime import cli, files
from l2p_jax.runtime.plots import plot_divergence

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file (FILE.py[:ARG]).', lock_config=True
)
flags.DEFINE_integer('steps', 50, 'Optimizer steps to take in each framework.')
flags.DEFINE_enum(
  'batch_norm',
  'ours',
  ('ours', 'authors'),
  "PyTorch's running statistics: moved as ours, or as torch's "
  "BatchNorm2d in the authors' code (PGD passes too, unbiased variance).",
)
flags.DEFINE_string(
  'output',
  None,
  'Path prefix of the JSON and PNG; default trajectories/METHOD (L2P: METHOD_ALTERNATION).',
)
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # trajectory raises ValueError for a config the reference cannot follow, and
  # ImportError (with the install hint) without torch.
  with cli.one_line_errors('compare_torch.py', also=(ValueError, ImportError)):
    compare(FLAGS.config)


def compare(config: ml_collections.ConfigDict) -> None:
  """Runs both frameworks as the flags say and writes the report and its plot."""
  alternates = methods.get(config.method).noise_update is not None  # L2P's alternation.
  name = config.method + (f'_{config.l2p.alternation}' if alternates else '')
  output = FLAGS.output or os.path.join('trajectories', name)
  cli.check_writable_folder('--output', os.path.dirname(os.path.abspath(output)))
  split, _, split_size = experiment.load_data(config)
  report = trajectory.compare(
    config, FLAGS.steps, split, batch_norm=FLAGS.batch_norm, train_split_size=split_size
  )
  os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
  files.write_with(output + '.json', lambda f: json.dump(report, f, indent=1))
  plot_divergence(report, output + '.png')
  print(trajectory_report.summarize(report))
  print(f'Wrote {output}.json and {output}.png')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('compare_torch.py'))
