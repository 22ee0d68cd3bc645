r"""Converts PyTorch checkpoints to this project's workdirs and back.

Import (then `python eval.py --workdir DIR` attacks it):
  python convert_torch.py --torch_checkpoint l2p_resnet20.pth \
      --config configs/cifar.py:l2p,resnet20,cifar10 --workdir runs/imported_l2p
Export the latest checkpoint of a training run in the authors' key layout:
  python convert_torch.py --export --workdir runs/l2p_r20 \
      --torch_checkpoint l2p_r20.pth --layout l2p
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from l2p_jax.interop import LAYOUTS, convert
from l2p_jax.runtime import cli, orbax_logging

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Config naming method, arch, dataset (for import).', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Workdir to write (import) or read (export).')
flags.DEFINE_string('torch_checkpoint', None, 'PyTorch checkpoint to read or write.')
flags.DEFINE_bool('export', False, 'Write the workdir as a PyTorch checkpoint.')
flags.DEFINE_enum('layout', 'auto', ('auto', *LAYOUTS), 'PyTorch key layout.')
flags.DEFINE_integer(
  'num_classes', None, 'Classes, if the dataset is not CIFAR-10/100, MNIST or Fashion-MNIST.'
)
flags.DEFINE_list(
  'image_shape',
  [],
  "Input HEIGHT,WIDTH,CHANNELS (e.g. 28,28,1); default: the dataset's, where known.",
)
flags.DEFINE_bool('overwrite', False, 'With --export, replace an existing file.')
flags.mark_flags_as_required(['workdir', 'torch_checkpoint'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # Orbax logs every file at INFO; --v=0 shows it.
    logging.set_verbosity(logging.WARNING)
    orbax_logging.quiet_orbax()
  # The interop modules raise ValueError and the file errors for what the user can fix.
  with cli.one_line_errors(
    'convert_torch.py', also=(ValueError, FileExistsError, FileNotFoundError, ImportError)
  ):
    convert_as_flagged()


def image_shape() -> list[int] | None:
  """--image_shape as three positive integers; None when not given."""
  if not FLAGS.image_shape:
    return None
  try:
    shape = [int(v) for v in FLAGS.image_shape]
  except ValueError:
    shape = []
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(
      f'--image_shape={",".join(FLAGS.image_shape)} must be three positive integers, '
      'HEIGHT,WIDTH,CHANNELS (e.g. 28,28,1).'
    )
  return shape


def convert_as_flagged() -> None:
  """Imports or exports as the flags say, printing the path written."""
  if FLAGS.export:
    if FLAGS.layout == 'auto':
      raise app.UsageError(f'--export needs --layout, one of {LAYOUTS}.')
    cli.check_writable_folder(
      '--torch_checkpoint', os.path.dirname(os.path.abspath(FLAGS.torch_checkpoint))
    )
    print(
      convert.workdir_to_torch(
        FLAGS.workdir, FLAGS.torch_checkpoint, FLAGS.layout, overwrite=FLAGS.overwrite
      )
    )
  else:
    if FLAGS.config is None:
      raise app.UsageError('Importing needs --config (method, arch and dataset).')
    cli.check_writable_folder('--workdir', FLAGS.workdir)
    print(
      convert.torch_to_workdir(
        FLAGS.torch_checkpoint,
        FLAGS.config,
        FLAGS.workdir,
        layout=FLAGS.layout,
        num_classes=FLAGS.num_classes,
        image_shape=image_shape(),
      )
    )


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('convert_torch.py'))
