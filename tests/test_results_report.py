"""results.md's grouping of records into columns and accuracy-vs-eps curves, on records
written by hand: the eps sweep's PGD (step a fraction of eps) is one curve of its own,
apart from the headline PGD of as many steps, and the two C&W settings are two columns."""

from configs import eval as eval_configs
from l2p_jax import evaluation
from l2p_jax.evaluation import builtin_attacks, results_report


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
    'FGSM': {'m': [(4 * e, 0.4), (8 * e, 0.3)]},
    'PGD-10 (step eps/4)': {'m': [(4 * e, 0.2), (8 * e, 0.1)]},
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
