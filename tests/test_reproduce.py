"""reproduce.py end to end on a tiny grid (vanilla and PNI, ResNet-8 x0.5, fake CIFAR-10,
the main table and the transfer matrix): the plan, skipping what finished, resuming a
grid stopped midway to the same report, the report's measured and published cells,
and the SLURM script."""

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import fake_datasets
import pytest

from configs import cifar as cifar_configs
from configs import eval as eval_configs
from l2p_jax.evaluation import plan_attacks
from l2p_jax.methods import METHODS
from l2p_jax.reproduction import grid_runner, paper_grid, paper_report, report_markdown, scales
from l2p_jax.runtime import plots

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_plan(workdir, **kwargs):
  """paper_grid.make_plan of this checkout, as reproduce.py calls it."""
  return paper_grid.make_plan(
    str(workdir), root=str(ROOT), get_config=cifar_configs.get_config, **kwargs
  )


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
  return fake_datasets.write_cifar10(tmp_path_factory.mktemp('cifar'), train=128, test=32)


def tiny_plan(workdir, cifar, **kwargs):
  return make_plan(
    workdir, scale='tiny', methods=['vanilla', 'pni'], local_dir=str(cifar), **kwargs
  )


@pytest.fixture(scope='module')
def grid(tmp_path_factory, cifar):
  """The tiny grid run without interruption, and its report."""
  plan = tiny_plan(tmp_path_factory.mktemp('grid'), cifar)
  ran = grid_runner.run_plan(plan, progress_bar=False)
  paper_report.write(plan)
  return plan, ran


def read(path):
  return pathlib.Path(path).read_text()


# --- the plan -----------------------------------------------------------------------


def test_full_plan_lists_every_run_of_the_paper(tmp_path):
  plan = make_plan(tmp_path)
  names = [job.name for job in plan.jobs]
  settings = [
    'resnet20',
    'resnet32',
    'resnet44',
    'resnet56',
    'resnet20x1.5',
    'resnet20x2',
    'resnet20x4',
    'resnet18',
  ]
  expected = (
    [f'{m}-{a}-cifar10-s0' for a in settings for m in METHODS]
    + [f'{m}-resnet18-cifar100-s0' for m in METHODS]
    + ['transfer-resnet20-cifar10-s0', 'transfer-resnet18-cifar10-s0']
  )
  assert sorted(names) == sorted(expected)
  assert names[-2:] == ['transfer-resnet20-cifar10-s0', 'transfer-resnet18-cifar10-s0']
  jobs = {job.name: job for job in plan.jobs}
  # V1(20) is in the main table, few-pixel and transfer; V1(32) only in the main table.
  steps = [s.command for s in jobs['l2p-resnet20-cifar10-s0'].steps]
  assert steps[0][:4] == ('python', 'train.py', '--config', 'configs/cifar.py:l2p,resnet20,cifar10')
  assert [c[c.index('--workdir') + 2] for c in steps[1:]] == [
    '--config.attacks=clean,fgsm,pgd,pgd20,pgd100,eot_pgd,apgd,cw',
    '--config.attacks=few_pixel',
  ]
  assert len(jobs['l2p-resnet32-cifar10-s0'].steps) == 2
  assert '--config.model.width=4.0' in jobs['pni-resnet20x4-cifar10-s0'].steps[0].command
  assert jobs['transfer-resnet18-cifar10-s0'].needs == tuple(
    f'{m}-resnet18-cifar10-s0' for m in ('vanilla', 'pni', 'adv_bnn', 'l2p')
  )
  narrowed = make_plan(
    tmp_path, tables=['main'], methods=['l2p', 'pni'], archs=['resnet20x2'], seeds=2
  )
  assert [j.name for j in narrowed.jobs] == [
    'pni-resnet20x2-cifar10-s0',
    'l2p-resnet20x2-cifar10-s0',
    'pni-resnet20x2-cifar10-s1',
    'l2p-resnet20x2-cifar10-s1',
  ]


def test_plan_command_prints_one_line_per_job(tmp_path):
  result = subprocess.run(
    [sys.executable, 'reproduce.py', '--workdir', str(tmp_path), '--scale', 'small', '--plan'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  lines = result.stdout.splitlines()
  plan = make_plan(tmp_path, scale='small')
  assert lines == paper_grid.plan_lines(plan)
  assert len(lines) == 2 * 6  # Five methods and the transfer matrix.
  train = lines[1].split(' && ')[0]
  assert train.startswith('python train.py --config configs/cifar.py:none,resnet8,fashion_mnist')
  assert '--config.data.local_dir=/usr/share/datasets/fashion-mnist' in train
  # Few-pixel attacks 200 images: data.examples (128 for the main table) would cap it.
  main_eval, few_pixel_eval = lines[1].split(' && ')[1:]
  assert '--config.data.examples=128' in main_eval
  # C&W's distance in w (lr x iterations) as the default's, at a tenth of the iterations.
  assert '--config.cw.learning_rate=0.1 --config.cw.steps=100' in main_eval
  assert '--config.data.examples=200 --config.few_pixel.examples=200' in few_pixel_eval
  bad = subprocess.run(
    [
      sys.executable,
      'reproduce.py',
      '--workdir',
      str(tmp_path),
      '--tables',
      'main,table9',
      '--plan',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert bad.returncode == 1
  assert bad.stderr.strip() == (
    "reproduce.py: Unknown table 'table9'; accepted: main, few_pixel, transfer, figure1, figures23."
  )


def test_study_plan_has_its_seeds_images_and_judged_draws(tmp_path):
  """The study of RESULTS.md: every method over seeds 0..2 by default, trained on 4,096
  images for 10 epochs; 512 test images for the attacks that rank the defences (Square
  among them), judged over 10 draws (Adv-BNN's 50-draw predictions over 3); C&W,
  few-pixel and AutoAttack on 64."""
  plan = make_plan(tmp_path, scale='study')
  assert plan.seeds == 3 and plan.tables == ('main', 'few_pixel', 'figure1')
  assert [j.name for j in plan.jobs] == [
    f'{m}-resnet8x0.5-fashion_mnist-s{seed}' for seed in range(3) for m in METHODS
  ]
  for job in plan.jobs:
    train, main, few = (step.command for step in job.steps)
    assert {
      '--config.data.train_examples=4096',
      '--config.num_epochs=10',
      f'--config.seed={job.run.seed}',
      '--config.data.local_dir=/usr/share/datasets/fashion-mnist',
    } <= set(train)
    draws = 3 if job.run.method == 'adv_bnn' else 10
    assert {
      '--config.attacks=clean,fgsm,pgd20,eot_pgd,apgd,noise_off_pgd20,square',
      '--config.data.examples=512',
      f'--config.judge.draws={draws}',
      f'--config.seed={job.run.seed}',
    } <= set(main)
    assert {
      '--config.attacks=cw,few_pixel,autoattack',
      '--config.data.examples=64',
      '--config.few_pixel.examples=64',
      f'--config.judge.draws={draws}',
    } <= set(few)
  tables = [c.table for c in plan.cells]
  assert tables.count('main') == tables.count('few_pixel') == 15
  assert sorted((c.seed, *c.runs) for c in plan.cells if c.table == 'figure1') == [
    (seed, m) for seed in range(3) for m in ('l2p', 'pni')
  ]
  assert len(make_plan(tmp_path, scale='study', seeds=1).jobs) == 5  # --seeds still wins.


def test_a_grid_inside_the_checkout_is_named_relative_to_it(tmp_path):
  """Commands run in the checkout, so a grid folder inside it is named relative to it
  there: its markers, which hold the commands, stay valid in a clone elsewhere (the
  study's results/ in git); files are still opened at absolute paths."""
  plans = [
    paper_grid.make_plan(
      str(clone / 'results' / 'study'),
      root=str(clone),
      get_config=cifar_configs.get_config,
      scale='study',
    )
    for clone in (tmp_path / 'one', tmp_path / 'two')
  ]
  assert paper_grid.plan_lines(plans[0]) == paper_grid.plan_lines(plans[1])
  train, main, _ = plans[0].jobs[0].steps
  run = 'results/study/runs/none-resnet8x0.5-fashion_mnist-s0'
  assert train.command[train.command.index('--workdir') + 1] == run
  assert f'--config.output_dir={run}/eval/main' in main.command
  assert main.marker == str(tmp_path / 'one' / run / 'eval' / 'main' / 'done.json')
  assert plans[0].cells[0].results == str(tmp_path / 'one' / run / 'eval' / 'main' / 'results.json')
  outside = make_plan(tmp_path / 'grid', scale='study')  # Outside the checkout: absolute.
  command = outside.jobs[0].steps[0].command
  assert command[command.index('--workdir') + 1] == str(
    tmp_path / 'grid' / 'runs' / run.split('/')[-1]
  )


def test_small_schedule_keeps_the_papers_phases_at_the_same_fractions():
  l2p = cifar_configs.get_config('l2p,resnet8,fashion_mnist')
  # 350 epochs -> 8: lr drops at 150 * 8/350 = 3.4 and 250 * 8/350 = 5.7; noise at
  # 10 * 8/350 = 0.2 and PGD at 0.5 still start after epoch 0 and after each other.
  assert scales.scaled_schedule(l2p, 8) == {
    'num_epochs': 8,
    'optim.lr_boundaries': (3, 6),
    'l2p.noise_start_epoch': 1,
    'adv.start_epoch': 2,
  }
  pni = cifar_configs.get_config('pni,resnet8,fashion_mnist')  # PNI's 160 epochs.
  assert scales.scaled_schedule(pni, 8) == {
    'num_epochs': 8,
    'optim.lr_boundaries': (4, 6),
    'l2p.noise_start_epoch': 0,
    'adv.start_epoch': 1,
  }
  none = cifar_configs.get_config('none,resnet8,fashion_mnist')
  assert scales.scaled_schedule(none, 8)['adv.start_epoch'] == -1
  with pytest.raises(ValueError, match='at least 2 epochs, got 1'):
    scales.scaled_schedule(l2p, 1)


def test_plan_takes_its_configs_and_checkout_from_the_caller(tmp_path):
  # The library reads no file of the repository (an installed l2p_jax has none beside
  # it): the small scale's schedules come from the get_config given, and the commands
  # run in the checkout given.
  asked = []

  def get_config(argument):
    asked.append(argument)
    return cifar_configs.get_config(argument)

  checkout = tmp_path / 'checkout'
  plan = paper_grid.make_plan(
    str(tmp_path), root=str(checkout), get_config=get_config, scale='small'
  )
  assert sorted(asked) == sorted(f'{m},resnet8,fashion_mnist' for m in METHODS)
  assert paper_grid.plan_lines(plan) == paper_grid.plan_lines(make_plan(tmp_path, scale='small'))
  missing = re.escape(f'{checkout / "train.py"} is missing')
  with pytest.raises(grid_runner.ReproduceError, match=missing):
    grid_runner.run_plan(plan, progress_bar=False)


# --- running, skipping, resuming ----------------------------------------------------


def test_finished_steps_are_skipped_by_their_markers(grid):
  plan, ran = grid
  assert ran == 5  # Two trainings, two main-table evaluations, one transfer matrix.
  launched = []

  def record(command, log):
    launched.append(command)

  assert grid_runner.run_plan(plan, launch=record, progress_bar=False) == 0
  assert launched == []
  # A marker of another command (here: a different attack list) does not count.
  step = plan.jobs[0].steps[1]
  other = paper_grid.Step(step.command[:-1] + ('--config.data.examples=9',), step.marker)
  assert grid_runner.is_done(step) and not grid_runner.is_done(other)
  # Without its marker, only that step runs again (the checkpoint alone does not count).
  os.remove(step.marker)
  assert not grid_runner.is_done(step)
  assert grid_runner.run_plan(plan, launch=record, progress_bar=False) == 1
  assert launched == [step.command]


def test_grid_stopped_midway_resumes_to_the_same_report(grid, cifar, tmp_path):
  plan = tiny_plan(tmp_path, cifar)
  calls = []

  def dies_on_third(command, log):
    calls.append(command)
    if len(calls) == 3:
      raise grid_runner.ReproduceError('killed')
    grid_runner.launch_subprocess(command, log, plan.root)

  with pytest.raises(grid_runner.ReproduceError, match='killed'):
    grid_runner.run_plan(plan, launch=dies_on_third, progress_bar=False)
  done = [grid_runner.is_done(s) for job in plan.jobs for s in job.steps]
  assert done == [True, True, False, False, False]
  assert grid_runner.run_plan(plan, progress_bar=False) == 3
  paper_report.write(plan)
  uninterrupted = grid[0].workdir
  assert read(tmp_path / 'report.json') == read(os.path.join(uninterrupted, 'report.json'))
  assert read(tmp_path / 'REPORT.md') == read(os.path.join(uninterrupted, 'REPORT.md'))


def test_a_failing_command_stops_the_grid_naming_it_and_its_log(tmp_path):
  log = str(tmp_path / 'train.log')
  command = (
    'python',
    'train.py',
    '--config',
    'configs/cifar.py:bogus',
    '--workdir',
    str(tmp_path / 'run'),
  )
  with pytest.raises(grid_runner.ReproduceError) as error:
    grid_runner.launch_subprocess(command, log, str(ROOT))
  message = str(error.value)
  assert message.startswith(f'train.py exited with status 1; its output is in {log}')
  assert "Unknown method 'bogus'" in message
  assert message.endswith('Rerun the same reproduce.py command to continue from there.')


# --- the report ---------------------------------------------------------------------


def white_box_record(plan, method, attack):
  run = f'{method}-resnet8x0.5-cifar10-s0'
  with open(os.path.join(plan.workdir, 'runs', run, 'eval', 'main', 'results.json')) as f:
    [record] = [r for r in json.load(f)['records'] if r['attack'] == attack]
  return record


def white_box_accuracy(plan, method, attack):
  return 100 * white_box_record(plan, method, attack)['accuracy']


def test_report_holds_measured_cells_beside_published_numbers(grid):
  plan, _ = grid
  content = json.loads(read(os.path.join(plan.workdir, 'report.json')))
  main = content['sections']['main']
  assert main['columns'] == ['Clean', 'FGSM', 'PGD-2', 'Worst case']
  rows = {r['method']: r['cells'] for r in main['rows']}
  assert list(rows) == ['vanilla', 'pni']
  for method in rows:
    assert rows[method]['Clean']['measured']['mean'] == white_box_accuracy(plan, method, 'clean')
    assert rows[method]['FGSM']['measured']['mean'] == white_box_accuracy(plan, method, 'fgsm')
    # The images that survive every attack: at most the fewest any one attack leaves.
    worst = rows[method]['Worst case']['measured']['mean']
    assert worst <= min(rows[method][c]['measured']['mean'] for c in ('Clean', 'FGSM', 'PGD-2'))
  # PNI Table 3, ResNet-V1(20): vanilla 83.8 / 46.6, PNI-W 84.9 / 54.5 (clean / FGSM);
  # the tiny grid's PGD-2 is not the paper's PGD-7.
  assert rows['vanilla']['Clean']['published'] == 83.8
  assert rows['pni']['FGSM']['published'] == 54.5
  assert rows['pni']['PGD-2']['published'] is None
  assert rows['pni']['FGSM']['mean_l2'] is None  # Only C&W cells show the L2.
  assert main['examples'] == [8]
  with open(
    os.path.join(plan.workdir, 'transfer', 'transfer-resnet8x0.5-cifar10-s0', 'results.json')
  ) as f:
    records = json.load(f)['records']
  [cell] = [
    r
    for r in records
    if r['source']
    and r['source']['label'].startswith('vanilla')
    and r['label'].startswith('pni')
    and r['attack'] == 'fgsm'
  ]
  transfer = {r['source']: r['cells'] for r in content['sections']['transfer']['rows']}
  assert transfer['vanilla']['pni FGSM']['measured']['mean'] == 100 * cell['accuracy']
  assert transfer['vanilla']['pni FGSM']['published'] == [60.32, 0.05]  # Table 2.
  assert transfer['vanilla']['vanilla PGD']['published'] is None
  text = read(os.path.join(plan.workdir, 'REPORT.md'))
  # One seed: the cell's interval is the evaluation's own over images and judged draws.
  clean = white_box_record(plan, 'vanilla', 'clean')
  low, high = (100 * v for v in clean['accuracy_ci95'])
  cell = f'{100 * clean["accuracy"]:.2f} [{low:.2f}, {high:.2f}] (paper 83.8)'
  assert f'| resnet8x0.5 (for ResNet-V1(20)) | Vanilla | {cell} |' in text
  assert '(not published)' in text and 'paper 60.32 +- 0.05' in text
  assert '3 of 3 jobs finished' in text
  # The main table drawn with its intervals, one PNG per network.
  figure = 'figures/accuracy_main_resnet20.png'
  assert os.path.getsize(os.path.join(plan.workdir, figure)) > 0
  assert f'![accuracy_main_resnet20.png]({figure})' in text


def test_cells_over_seeds_are_means_with_intervals_and_pairs_with_differences(grid, tmp_path):
  """Three seeds per method: each cell is the mean with Student's interval over the
  seeds (by hand: 52, 54, 56 -> 54 +- 4.302653 * 2 / sqrt(3)); each pair of methods has
  Welch's interval of its difference, in bold where it excludes 0; every evaluation's
  sanity checks are counted."""
  plan = make_plan(tmp_path, scale='tiny', tables=['main'], methods=['vanilla', 'pni'], seeds=3)
  accuracies = {'vanilla': (0.52, 0.54, 0.56), 'pni': (0.49, 0.50, 0.51)}
  sources = {}
  for method in accuracies:
    run = f'{method}-resnet8x0.5-cifar10-s0'
    with open(os.path.join(grid[0].workdir, 'runs', run, 'eval', 'main', 'results.json')) as f:
      sources[method] = json.load(f)
  for cell in plan.cells:
    [(method, run)] = cell.runs.items()
    results = sources[method]
    accuracy = accuracies[method][run.seed]
    os.makedirs(os.path.dirname(cell.results))
    records = [{**r, 'label': run.name, 'accuracy': accuracy} for r in results['records']]
    with open(cell.results, 'w') as f:
      json.dump({**results, 'records': records}, f)
  content = paper_report.assemble(plan)
  main = content['sections']['main']
  clean = {r['method']: r['cells']['Clean']['measured'] for r in main['rows']}
  half = 4.302652729911275 * 2 / math.sqrt(3)
  assert clean['vanilla']['values'] == pytest.approx([52, 54, 56])
  assert clean['vanilla']['mean'] == pytest.approx(54)
  assert clean['vanilla']['std'] == pytest.approx(2)
  assert clean['vanilla']['ci95'] == pytest.approx([54 - half, 54 + half])
  [pair] = main['differences']
  assert pair['methods'] == ['pni', 'vanilla']  # The later of METHODS minus the earlier.
  assert pair['cells']['Clean'] == pytest.approx([-4, -4 - 4.1554, -4 + 4.1554], abs=1e-4)
  text = report_markdown.markdown(content, plan, {})
  assert f'| Vanilla | 54.00 [{54 - half:.2f}, {54 + half:.2f}] (paper 83.8) |' in text
  assert '| PNI-W - Vanilla | -4.00 [-8.16, +0.16] |' in text  # Includes 0: not bold.
  per_file = len(sources['vanilla']['sanity']) + len(sources['pni']['sanity'])
  assert per_file > 0 and len(content['sanity']) == 3 * per_file
  failed = sum(e['passed'] is False for e in content['sanity'])
  assert f'## Sanity checks ({failed} of {3 * per_file} failed' in text


def test_a_randomized_models_version_of_a_planned_attack_is_paired_with_the_deterministic_one():
  """The study's tables pair EOT-PGD with PGD-7, Square with and without EOT, C&W in
  expectation with C&W and AutoAttack's two versions; the full scale's main table, which
  runs PGD-7 on the randomized models too, keeps EOT-PGD-7 apart from it."""
  study = scales.SCALES['study']
  assert paper_report.randomized_columns(study, 'main') == {
    'EOT-PGD-7 (5 draws)': 'PGD-7',
    'Square (EOT, 20 draws)': 'Square',
  }
  assert paper_report.randomized_columns(study, 'few_pixel') == {
    'EOT-C&W (10 draws, z 2, mean abort) acc / L2': 'C&W acc / L2',
    'AutoAttack-rand': 'AutoAttack',
  }
  full = paper_report.randomized_columns(scales.SCALES['full'], 'main')
  assert 'PGD-7' not in full.values() and 'EOT-C&W (10 draws, z 2, mean abort) acc / L2' in full
  assert paper_report.randomized_columns(scales.SCALES['tiny'], 'transfer') == {}


def test_both_versions_of_a_planned_attack_share_a_column_and_its_differences(grid, tmp_path):
  """Vanilla's PGD and PNI's EOT-PGD (eot_pgd on each) fill one column, named with both
  titles, with the seeds' means and the pair's Welch interval as any column's."""
  plan = make_plan(tmp_path, scale='tiny', tables=['main'], methods=['vanilla', 'pni'], seeds=3)
  scale = dataclasses.replace(plan.scale, attacks={'main': 'clean,eot_pgd'})
  plan = dataclasses.replace(plan, scale=scale)
  [(randomized, deterministic)] = paper_report.randomized_columns(scale, 'main').items()
  config = eval_configs.get_config('tiny')
  [_, eot_pgd] = plan_attacks(config, 'clean,eot_pgd')[0]
  run = 'vanilla-resnet8x0.5-cifar10-s0'
  with open(os.path.join(grid[0].workdir, 'runs', run, 'eval', 'main', 'results.json')) as f:
    source = json.load(f)
  [clean] = [r for r in source['records'] if r['attack'] == 'clean']
  accuracies = {'vanilla': (0.52, 0.54, 0.56), 'pni': (0.49, 0.50, 0.51)}
  for cell in plan.cells:
    [(method, run)] = cell.runs.items()
    params = eot_pgd.for_model(config, method == 'pni').describe()
    attacked = {**clean, 'attack': 'pgd', 'params': params}
    records = [{**r, 'label': run.name, 'accuracy': accuracies[method][run.seed]}
               for r in (clean, attacked)]  # fmt: skip
    os.makedirs(os.path.dirname(cell.results))
    with open(cell.results, 'w') as f:
      json.dump({**source, 'records': records, 'worst_case': []}, f)
  content = paper_report.assemble(plan)
  main = content['sections']['main']
  assert main['columns'] == ['Clean', deterministic]
  assert main['randomized_columns'] == {deterministic: randomized}
  values = {r['method']: r['cells'][deterministic]['measured']['values'] for r in main['rows']}
  assert values == {'vanilla': pytest.approx([52, 54, 56]), 'pni': pytest.approx([49, 50, 51])}
  [pair] = main['differences']
  assert pair['cells'][deterministic] == pytest.approx([-4, -4 - 4.1554, -4 + 4.1554], abs=1e-4)
  text = report_markdown.markdown(content, plan, {})
  assert f'| network | method | Clean | {deterministic} (randomized: {randomized}) |' in text
  assert f'| network | methods | Clean | {deterministic} (randomized: {randomized}) |' in text


def test_a_difference_outside_its_interval_is_bold():
  section = {
    'columns': ['PGD-20'],
    'differences': [
      {'setting': ['resnet20', 1.0], 'methods': ['l2p', 'pni'], 'cells': {'PGD-20': [3, 1, 5]}},
      {'setting': ['resnet20', 1.0], 'methods': ['l2p', 'none'], 'cells': {'PGD-20': None}},
    ],
  }
  plan = make_plan('unused', scale='small', tables=['main'])
  text = '\n'.join(report_markdown._differences_markdown(section, plan))
  assert (
    '| resnet8x0.5 (for ResNet-V1(20)) | Learn2Perturb - PNI-W | **+3.00 [+1.00, +5.00]** |' in text
  )
  assert 'No defence' not in text  # A pair without two seeds a side is left out.


# --- SLURM --------------------------------------------------------------------------


def test_slurm_script_has_one_array_task_per_job_and_writes_markers(cifar, tmp_path):
  plan = make_plan(tmp_path / 'paper')
  script = grid_runner.slurm_script(plan, 'python reproduce.py --workdir X --assemble')
  assert '#SBATCH --array=0-46' in script
  assert [f'  {i})  # {job.name}' for i, job in enumerate(plan.jobs)] == [
    line for line in script.splitlines() if line.startswith('  ') and ')  # ' in line
  ]
  assert '#   sbatch --array=45-46 --dependency=afterok:$jobid THIS_FILE' in script
  # Run task 0 of a tiny grid planned by a `python` that only succeeds (the script puts
  # its folder first on PATH): its markers say done.
  plan = tiny_plan(tmp_path / 'tiny', cifar)
  path = tmp_path / 'grid.sbatch'
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  shutil.copy('/bin/true', bin_dir / 'python')
  path.write_text(
    grid_runner.slurm_script(plan, 'python reproduce.py --assemble', python=str(bin_dir / 'python'))
  )
  env = {**os.environ, 'SLURM_ARRAY_TASK_ID': '0'}
  subprocess.run(['bash', str(path)], env=env, check=True)
  assert [grid_runner.is_done(s) for job in plan.jobs for s in job.steps] == [
    True,
    True,
    False,
    False,
    False,
  ]


def test_slurm_script_asks_for_the_scales_resources_and_activates_the_environment(tmp_path):
  venv = tmp_path / 'venv' / 'bin'
  venv.mkdir(parents=True)
  (venv / 'activate').write_text('')
  full = grid_runner.slurm_script(
    make_plan(tmp_path / 'paper'),
    'python reproduce.py --assemble',
    '--time=6:00:00 --partition=gpu',
    python=str(venv / 'python'),
  )
  options = [line for line in full.splitlines() if line.startswith('#SBATCH --')][3:]
  assert options == [
    '#SBATCH --time=6:00:00',
    '#SBATCH --gpus=1',
    '#SBATCH --cpus-per-task=8',
    '#SBATCH --mem=32G',
    '#SBATCH --partition=gpu',
  ]
  assert f'source {venv}/activate' in full.splitlines()
  small = grid_runner.slurm_script(
    make_plan(tmp_path / 'small', scale='small'), 'python reproduce.py --assemble'
  )
  assert '#SBATCH --gpus=0' in small and '#SBATCH --cpus-per-task=2' in small
  with pytest.raises(grid_runner.ReproduceError, match="got '6:00:00'"):
    grid_runner.slurm_options(('--time=1:00:00',), '--time 6:00:00')


def test_nothing_measured_draws_no_accuracy_figure(tmp_path):
  path = tmp_path / 'accuracy.png'
  assert not plots.plot_accuracy_intervals({'Vanilla': {}}, str(path))
  assert not path.exists()
  measured = {'PNI-W': {}, 'Vanilla': {'Clean': (50, 45, 55, [49, 51])}}  # PNI not yet.
  assert plots.plot_accuracy_intervals(measured, str(path))
  assert path.stat().st_size > 0
