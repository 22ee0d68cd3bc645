r"""Trains one of the five methods; see configs/cifar.py for the experiments.

  python train.py --config configs/cifar.py:l2p,resnet20,cifar10 --workdir runs/l2p
  python train.py --config configs/cifar.py:l2p,resnet8,fashion_mnist,tiny --workdir /tmp/tiny
  python train.py --config configs/cifar.py:tiny --workdir /tmp/tiny \
      --config.data.local_dir=~/data/cifar
  python train.py --config configs/cifar.py:my_defense,resnet20,cifar10 \
      --config.modules=my_pkg.defense --workdir runs/mine   # registers my_defense

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from l2p_jax import checkpointing
from l2p_jax.runtime import cli, distributed, host_devices, orbax_logging
from l2p_jax.training import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file (FILE.py[:ARG]).', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # Orbax logs every file at INFO; --v=0 shows it.
    logging.set_verbosity(logging.WARNING)
    orbax_logging.quiet_orbax()
  with cli.one_line_errors('train.py', kept=last_good_checkpoint):
    config = FLAGS.config
    devices = host_devices.configure(
      {'batch_size': config.batch_size, 'eval_batch_size': config.eval_batch_size}
    )
    distributed.initialize_from_flags()
    host_devices.log_choice(devices)
    cli.check_writable_folder('--workdir', FLAGS.workdir)
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def last_good_checkpoint() -> str:
  """What a run stopped by a full disk kept: the newest checkpoint that reads."""
  path = checkpointing.newest_readable(os.path.join(FLAGS.workdir, 'checkpoints'))
  return f'the last good checkpoint is {path}' if path else 'no checkpoint was saved yet'


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('train.py'))
