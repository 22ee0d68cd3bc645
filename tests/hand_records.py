"""results.json records written by hand, with the fields the worst case and the sanity
checks read (test_verdicts.py, test_sanity.py)."""


def record(attack, accuracy, name=None, eps=8 / 255, low=None, high=None, **fields):
  """A results.json record with what the worst case and sanity checks read."""
  params = {'eps': eps, 'examples': 0, 'attack_noise': True, **fields.pop('params', {})}
  record = {
    'label': 'm',
    'checkpoint': '/runs/m/checkpoints/10',
    'dataset': 'cifar10',
    'split': 'test',
    'n': 4,
    'rule': 'single',
    'draws': 1,
    'noise': True,
    'attack': attack,
    'name': name or attack,
    'params': params,
    'source': None,
    'accuracy': accuracy,
    'accuracy_ci95': [accuracy if low is None else low, accuracy if high is None else high],
    'judged_draws': 2,
    'verdicts': name or attack,
  }
  return {**record, **fields}
