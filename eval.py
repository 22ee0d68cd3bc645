r"""Evaluates trained checkpoints under attack; see configs/eval.py for the attacks.

  python eval.py --workdir runs/l2p_r20
  python eval.py --workdir runs/l2p_r20,runs/pni_r20 --config.attacks=clean,pgd,transfer
  python eval.py --workdir runs/l2p_r20 --checkpoint runs/l2p_r20/checkpoints/175000
  python eval.py --workdir runs/mine --config.modules=my_pkg.defense   # a user's defense

Writes results.json, results.md and plots to WORKDIR/eval (of the first --workdir).
"""

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from l2p_jax import evaluation
from l2p_jax.runtime import cli, distributed, host_devices, orbax_logging

FLAGS = flags.FLAGS
try:  # With a default file, config_flags applies the overrides here, at import.
  config_flags.DEFINE_config_file(
    'config',
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'eval.py'),
    'Evaluation config file (FILE.py[:ARG]).',
    lock_config=True,
  )
except (AttributeError, KeyError) as error:
  raise SystemExit(cli.unknown_field_message('eval.py', error, sys.argv)) from None
flags.DEFINE_list('workdir', None, 'Training run folder(s) to evaluate, comma-separated.')
flags.DEFINE_list(
  'checkpoint',
  [],
  'Checkpoint to evaluate instead of the latest, one '
  'per --workdir: a checkpoints/ folder or one of its step folders.',
)
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # Orbax logs every file at INFO; --v=0 shows it.
    logging.set_verbosity(logging.WARNING)
    orbax_logging.quiet_orbax()
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # Stops like Ctrl-C.
  with cli.one_line_errors('eval.py'):
    devices = host_devices.configure({'config.batch_size': FLAGS.config.batch_size})
    distributed.initialize_from_flags()
    host_devices.log_choice(devices)
    cli.import_modules(cli.listed(FLAGS.config.modules))  # Set in a config file, not a flag.
    try:
      evaluation.evaluate_workdirs(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
    except evaluation.EvaluationInterrupted as error:
      cli.exit_at_once(f'eval.py: {error}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('eval.py'))
