"""results.md's grouping of records into columns and accuracy-vs-eps curves, on records
written by hand: the eps sweep's PGD (step a fraction of eps) is one curve of its own,
apart from the headline PGD of as many steps, and the two C&W settings are two columns;
its key, small-n warning and sanity results; the plots' legends, bands and axes; the
attacks' curves of accuracy after each iteration and where results.md names them."""

import pytest

from configs import eval as eval_configs
from l2p_jax import evaluation
from l2p_jax.evaluation import builtin_attacks, results_report
from l2p_jax.runtime import plots


def record(attack, eps=None, label='m', accuracy=0.5, **params):
  """A white-box record with the fields the grouping reads."""
  return {
    'label': label,
    'attack': attack,
    'source': None,
    'params': {**params, 'eps': eps, 'examples': 0},
    'accuracy': accuracy,
    'mean_l2': 1.0 if attack == 'cw' else None,
  }


def pgd(eps, steps=10, **step):
  return record('pgd', eps, steps=steps, random_start=True, restarts=1, eot_draws=1, **step)


def test_sweep_pgd_is_its_own_curve_and_stays_out_of_the_headline_table():
  e = 1 / 255
  records = [
    record('fgsm', 4 * e, accuracy=0.4),
    record('fgsm', 8 * e, accuracy=0.3),
    pgd(4 * e, step_fraction=0.25, accuracy=0.2),
    pgd(8 * e, step_fraction=0.25, accuracy=0.1),
    pgd(8 * e, step_size=0.01, accuracy=0.15),  # the headline pgd10 at 8/255
    pgd(8 * e, steps=7, step_size=0.01, accuracy=0.25),
  ]
  assert [results_report.curve_name(r) for r in records] == [
    'FGSM',
    'FGSM',
    'PGD-10 (step eps/4)',
    'PGD-10 (step eps/4)',
    'PGD-10',
    'PGD-7',
  ]
  # Curves need two radii: the headline PGD-10 and PGD-7 (one radius each) are none.
  assert results_report.eps_curves(records) == {
    'FGSM': {'m': [(4 * e, 0.4, 0.4, 0.4), (8 * e, 0.3, 0.3, 0.3)]},
    'PGD-10 (step eps/4)': {'m': [(4 * e, 0.2, 0.2, 0.2), (8 * e, 0.1, 0.1, 0.1)]},
  }
  columns = [results_report.table_column(r, 8 * e) for r in records]
  assert [c and c[1] for c in columns] == [None, 'FGSM', None, None, 'PGD-10', 'PGD-7']


def test_cw_and_its_pni_preset_are_two_columns():
  config = eval_configs.get_config()
  specs, _ = evaluation.plan_attacks(config, 'cw,cw_pni')
  records = [record('cw', **{k: v for k, v in s.describe().items() if k != 'eps'}) for s in specs]
  titles = [results_report.table_column(r, 8 / 255)[1] for r in records]
  assert titles == [builtin_attacks.CW_COLUMN, builtin_attacks.CW_PNI_COLUMN]
  table = results_report._attack_table(
    {
      'records': records,
      'config': {'eps': 8 / 255},
      'checkpoints': [{'label': 'm', 'method': 'none', 'arch': 'resnet8', 'width': 1, 'step': 1}],
    }
  )
  assert '| m (none resnet8, step 1) | 50.00 / 1.000 | 50.00 / 1.000 |' in table


def test_results_md_explains_itself_and_warns_about_few_examples():
  """A key under the summary, and a warning where 12 images make the 95% interval of a
  50% accuracy wider than 20 points (none at 128)."""
  few = [dict(record('clean', accuracy=0.6), n=12, accuracy_ci95=(0.35, 0.82))]
  results = {
    'records': [
      dict(r, dataset='d', split='test', rule='single', draws=1, noise=True) for r in few
    ],
    'config': {'eps': 8 / 255},
    'checkpoints': [{'label': 'm', 'method': 'none', 'arch': 'resnet8', 'width': 1, 'step': 1}],
    'sanity': [
      {'label': 'm', 'name': 'largest_eps', 'passed': None, 'detail': 'stops at 8/255'},
      {'label': 'm', 'name': 'unbounded', 'passed': False, 'detail': 'cw leaves 60%'},
      {'label': 'm', 'name': 'single_step', 'passed': True, 'detail': 'fgsm vs pgd'},
    ],
  }
  text = results_report.markdown(results)
  assert 'Warning: 12 examples are too few' in text and 'is 49 points wide' in text
  for term in ('*[low, high]*', '*Worst case*', '*right under every draw*', '*not applicable*'):
    assert term in text
  assert '## Sanity checks (1 of 3 failed, 1 not applicable)' in text
  rows = [line for line in text.splitlines() if line.startswith('| m | ')]
  assert [row.split(' | ')[2] for row in rows] == ['FAILED', 'not applicable', 'passed']
  lines = results_report.console_lines(results)
  assert 'sanity m largest_eps not applicable: stops at 8/255' in lines
  assert lines[-1].startswith('Warning: 12 examples are too few')
  assert results_report.small_n_warning([{'n': 128}]) is None


def test_plots_have_legends_bands_a_log2_radius_axis_and_noise_from_zero(tmp_path, monkeypatch):
  drawn = []
  monkeypatch.setattr(plots, '_save', lambda fig, path: drawn.append(fig))
  e = 1 / 255
  curves = {'PGD-10': {'m': [(e, 0.9, 0.8, 0.95), (2 * e, 0.7, 0.6, 0.8), (8 * e, 0.2, 0.1, 0.3)]}}
  assert plots.plot_accuracy_vs_eps(curves, str(tmp_path / 'eps.png'))
  noise = [
    {'epoch': k, 'noise': {'a': {'mean': 0.25 + k / 1000}, 'b': {'mean': 0.25}}} for k in range(3)
  ]
  assert plots.plot_noise_evolution(noise, str(tmp_path / 'noise.png'))
  (eps_ax,), (noise_ax,) = (fig.axes for fig in drawn)
  assert eps_ax.get_xscale() == 'log' and list(eps_ax.get_xticks()) == [1, 2, 8]
  assert [t.get_text() for t in eps_ax.get_xticklabels()] == ['1', '2', '8']
  (band,) = eps_ax.collections  # The interval, filled between low and high.
  assert band.get_paths()[0].vertices[:, 1].min() == pytest.approx(10)
  assert [t.get_text() for t in eps_ax.get_legend().get_texts()] == ['m']
  assert noise_ax.get_ylim()[0] == 0
  legend = [t.get_text() for t in noise_ax.get_legend().get_texts()]
  assert legend == ['a', 'b', 'mean over layers (0.25 to 0.251, +0.4%)']


def test_white_box_curves_of_several_iterations_are_drawn_one_line_each(tmp_path, monkeypatch):
  """Legend: checkpoint label and column title, with the radius off the headline eps;
  FGSM's single step, transfer records and records without a curve draw nothing."""
  e = 1 / 255
  records = [
    {**pgd(8 * e, steps=3, step_size=0.01), 'curve': [0.9, 0.5, 0.4, 0.4]},
    {**pgd(4 * e, steps=2, step_fraction=0.25, label='n'), 'curve': [1.0, 0.8, 0.7]},
    {**record('fgsm', 8 * e), 'curve': [0.9, 0.6]},
    {**pgd(8 * e, step_size=0.01), 'curve': [0.9, 0.1, 0.1], 'source': {'label': 'n'}},
    pgd(8 * e, steps=7, step_size=0.01),
  ]
  curves = results_report.convergence_curves(records, 8 * e)
  assert curves == {
    'm: PGD-3': [0.9, 0.5, 0.4, 0.4],
    'n: PGD-2 (step eps/4) at 4/255': [1.0, 0.8, 0.7],
  }
  drawn = []
  monkeypatch.setattr(plots, '_save', lambda fig, path: drawn.append(fig))
  assert plots.plot_convergence(curves, str(tmp_path / 'convergence.png'))
  assert not plots.plot_convergence({}, str(tmp_path / 'none.png'))
  [ax] = drawn[0].axes
  assert [t.get_text() for t in ax.get_legend().get_texts()] == list(curves)
  thin, thick = ax.lines[:2]  # Each curve, then its last quarter drawn thicker.
  assert list(thin.get_ydata()) == pytest.approx([90, 50, 40, 40])
  assert list(thick.get_xdata()) == [2, 3] and thick.get_linewidth() > thin.get_linewidth()
  note = results_report._convergence_note(records)
  assert note.startswith('## Convergence\n\n[convergence.png](convergence.png): ')
  assert results_report._convergence_note(records[2:]) is None
