r"""Reproduces the paper's tables and figures: trains and evaluates every run through
train.py and eval.py, then writes REPORT.md; see l2p_jax/reproduction/paper_tables.py for
the tables and paper_grid.py for the grid.

  python reproduce.py --workdir runs/paper --scale full
  python reproduce.py --workdir runs/small --scale small     # Fashion-MNIST, 2-core CPU
  python reproduce.py --workdir results/study --scale study  # 3 seeds, 512 images: RESULTS.md
  python reproduce.py --workdir runs/paper --tables main --methods l2p,pni --archs resnet20
  python reproduce.py --workdir runs/paper --plan            # the commands, one per run
  python reproduce.py --workdir runs/paper --slurm paper.sbatch
  python reproduce.py --workdir runs/paper --assemble        # only REPORT.md

Rerunning the same command skips finished steps and resumes interrupted ones. The
commands run in this file's checkout, with its configs/ (the library reads no file of
the repository itself, so an installed l2p_jax serves any checkout).
"""

import os
import shlex

from absl import app, flags, logging

from configs import cifar
from l2p_jax.errors import UserError
from l2p_jax.methods import METHODS
from l2p_jax.reproduction import grid_runner, paper_grid, paper_report, paper_tables, scales
from l2p_jax.runtime import cli, files

ROOT = os.path.dirname(os.path.abspath(__file__))  # This checkout: train.py, eval.py, configs/.

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder of the grid: runs/, transfer/, REPORT.md.')
flags.DEFINE_enum(
  'scale',
  'full',
  list(scales.SCALES),
  'full: as published; small: Fashion-MNIST on ResNet-V1(8) x0.5 for '
  'a 2-core CPU; study: the same with 3 seeds, 512 test images and judged draws, '
  'about 2 hours there; tiny: for tests.',
)
flags.DEFINE_list(
  'tables', [], f"Tables to reproduce (default: the scale's): {', '.join(paper_tables.TABLES)}."
)
flags.DEFINE_list('methods', [], f'Only these methods: {", ".join(METHODS)}.')
flags.DEFINE_list(
  'archs', [], "Only these of the paper's networks: resnet20, resnet20x1.5, resnet18, ..."
)
flags.DEFINE_integer(
  'seeds',
  None,
  "Runs per cell (seeds 0..N-1; default: the scale's, 3 for study, else 1); cells "
  'report the mean over seeds and its 95% interval.',
)
flags.DEFINE_string(
  'local_dir',
  None,
  "Folder with the dataset's original files (idx or CIFAR archives), as train.py's "
  '--config.data.local_dir; default: /usr/share/datasets/fashion-mnist at the small and '
  "study scales, TFDS at the full scale; '' reads TFDS.",
)
flags.DEFINE_string('data_dir', None, 'Old name of --local_dir (warns).')
flags.DEFINE_bool('plan', False, 'Print every job as one command line and stop.')
flags.DEFINE_string('slurm', None, 'Write a SLURM array script (one task per job) here and stop.')
flags.DEFINE_string(
  'slurm_args',
  '',
  "sbatch options of every task, replacing the scale's defaults of the same name "
  '(full: --time=48:00:00 --gpus=1 --cpus-per-task=8 --mem=32G; small, study: '
  '--time=2:00:00 --gpus=0 --cpus-per-task=2 --mem=8G), e.g. "--time=6:00:00 --partition=gpu".',
)
flags.DEFINE_bool('assemble', False, 'Only write REPORT.md from what has finished.')
flags.mark_flags_as_required(['workdir'])


def assemble_command() -> str:
  """This command line with --assemble instead of --plan/--slurm."""
  words = ['python', 'reproduce.py', '--workdir', FLAGS.workdir, '--scale', FLAGS.scale]
  if FLAGS.seeds is not None:
    words.append(f'--seeds={FLAGS.seeds}')
  for name in ('tables', 'methods', 'archs'):
    if FLAGS[name].value:
      words.append(f'--{name}={",".join(FLAGS[name].value)}')
  if FLAGS.local_dir is not None:
    words.append(f'--local_dir={FLAGS.local_dir}')
  return shlex.join(words + ['--assemble'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.data_dir is not None and FLAGS.local_dir is None:
    logging.warning('reproduce.py: --data_dir is now --local_dir; the old name still works.')
    FLAGS.local_dir = FLAGS.data_dir
  with cli.one_line_errors('reproduce.py'):
    try:
      plan = paper_grid.make_plan(
        FLAGS.workdir,
        root=ROOT,
        get_config=cifar.get_config,
        scale=FLAGS.scale,
        tables=FLAGS.tables,
        methods=FLAGS.methods,
        archs=FLAGS.archs,
        seeds=FLAGS.seeds,
        local_dir=FLAGS.local_dir,
      )
    except ValueError as error:
      raise UserError(str(error)) from None
    if FLAGS.plan:
      print('\n'.join(paper_grid.plan_lines(plan)))
      return
    cli.check_writable_folder('--workdir', plan.workdir)
    if FLAGS.slurm:
      os.makedirs(os.path.join(plan.workdir, 'slurm'), exist_ok=True)  # Tasks' output.
      files.write_text(
        FLAGS.slurm, grid_runner.slurm_script(plan, assemble_command(), FLAGS.slurm_args)
      )
      print(f'Wrote {FLAGS.slurm}: {len(plan.jobs)} array tasks.')
      return
    if not FLAGS.assemble:
      grid_runner.check_local_data(plan, FLAGS.local_dir)
      try:
        grid_runner.run_plan(plan)
      except KeyboardInterrupt:
        raise UserError('interrupted; rerun the same command to continue.') from None
    for path in paper_report.write(plan):
      print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main)
