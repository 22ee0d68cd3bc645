"""The per-image verdicts beside results.json and the worst case over the attacks that
join it (verdicts.py), on hand-built records: which attacks join is their registry
entries' say, and verdicts.npz reads back what was written or refuses in one message."""

import numpy as np
import pytest
from hand_records import record

from l2p_jax import attacks, evaluation
from l2p_jax.evaluation import intervals, verdicts

EPS = 8 / 255


def test_the_worst_case_takes_each_images_worst_attack_of_the_threat_model():
  """Two draws; image 3 survives PGD but not APGD, image 2 the reverse; C&W (another
  budget) and a radius of the sweep do not count."""
  records = [
    record('clean', 1.0, eps=None),
    record('pgd', 0.5),
    record('apgd_rand', 0.5),
    record('cw', 0.0, eps=None),
    record('pgd', 0.0, name='pgd at 16', eps=16 / 255),
  ]
  right = {'clean': [2, 2, 2, 2], 'pgd': [2, 0, 0, 2], 'apgd_rand': [2, 1, 1, 0]}
  right |= {'cw': [0, 0, 0, 0], 'pgd at 16': [0, 0, 0, 0]}
  stored = {f'{name}.right': np.array(v) for name, v in right.items()}
  [worst] = verdicts.worst_cases(records, stored, 8 / 255)
  assert worst['attacks'] == ['clean', 'pgd', 'apgd_rand']
  assert worst['accuracy'] == (1 + 0 + 0 + 0) / 4  # min(1, 1, 1), min(1, 0, .5), ...
  assert worst['accuracy_all_draws'] == 0.25
  assert worst['accuracy_ci95'] == pytest.approx(
    intervals.accuracy_interval(np.array([1.0, 0, 0, 0]), 2)
  )


def test_the_per_draw_worst_case_needs_an_image_right_under_a_draw_for_every_attack():
  """Two shared draws: image 1 is right under draw 0 for PGD and under draw 1 for APGD,
  half its draws for each (per image 0.5), but under no draw for both (per draw 0). Per
  image 1, 0.5, 0, 0.5 (mean 0.5); per draw right (1, 1), (0, 0), (0, 0), (0, 1): 3/8,
  its interval over those 4 images and the 2 draws' accuracies 1/4 and 2/4. Without
  every attack's bits, or with draws judged the old way, there is no per-draw entry."""
  shared = {'judging': 'shared_draws', 'key': {'seed': 0}, 'batch_size': 8}
  records = [record(a, 0.5, eps=e, **shared) for a, e in (('clean', None), ('pgd', EPS))]
  records.append(record('apgd_rand', 0.5, **shared))
  bits = {
    'clean': [[1, 1]] * 4,
    'pgd': [[1, 1], [1, 0], [0, 0], [1, 1]],
    'apgd_rand': [[1, 1], [0, 1], [1, 1], [0, 1]],
  }
  stored = {}
  for name, b in bits.items():
    b = np.array(b, bool)
    stored |= verdicts.arrays(name, b.sum(1), b.sum(0), b)
  [worst] = verdicts.worst_cases(records, stored, EPS)
  assert worst['accuracy'] == 0.5 and worst['accuracy_per_draw'] == 3 / 8
  assert worst['accuracy_per_draw_ci95'] == pytest.approx(
    intervals.accuracy_interval(np.array([1.0, 0, 0, 0.5]), 2, np.array([0.25, 0.5]))
  )
  np.testing.assert_array_equal(verdicts.draw_bits(stored, records[1]), bits['pgd'])
  without_bits = {k: v for k, v in stored.items() if k != 'pgd.bits'}
  assert 'accuracy_per_draw' not in verdicts.worst_cases(records, without_bits, EPS)[0]
  records[2] = {**records[2], 'judging': None}  # Judged before the draws were shared.
  assert 'accuracy_per_draw' not in verdicts.worst_cases(records, stored, EPS)[0]


def test_verdicts_of_replaced_records_are_dropped():
  stored = verdicts.arrays('a', [1, 2], [3]) | verdicts.arrays('b', [0, 0], [0])
  assert set(verdicts.kept(stored, [{'verdicts': 'b'}])) == {'b.right', 'b.draw_right'}


def _entry(name, worst_case):
  """An L-inf attack registered under `name` (FGSM's function), joining the worst case
  or not."""
  return evaluation.Attack(
    name,
    attacks.fgsm,
    evaluation.LINF,
    lambda p: name,
    column=10 + worst_case,
    presets={name: evaluation.Preset(lambda c, n: [])},
    worst_case=worst_case,
  )


def test_the_registry_entry_says_which_attacks_join_the_worst_case():
  """Image 1 falls only to `joins`, image 2 only to `stays_out`: the worst case counts
  the first and not the second."""
  records = [record('clean', 1.0, eps=None), record('joins', 0.5), record('stays_out', 0.5)]
  right = {'clean': [2, 2, 2, 2], 'joins': [2, 0, 2, 2], 'stays_out': [2, 2, 0, 2]}
  stored = {f'{name}.right': np.array(v) for name, v in right.items()}
  with (
    evaluation.registered(_entry('joins', True)),
    evaluation.registered(_entry('stays_out', False)),
  ):
    [worst] = verdicts.worst_cases(records, stored, 8 / 255)
  assert worst['attacks'] == ['clean', 'joins'] and worst['accuracy'] == 0.75


def test_verdicts_read_back_what_was_written(tmp_path):
  stored = verdicts.arrays('a', [1, 2], [3])
  verdicts.write(str(tmp_path), stored)
  read = verdicts.read(str(tmp_path))
  assert set(read) == {'a.right', 'a.draw_right'}
  np.testing.assert_array_equal(read['a.right'], [1, 2])
  assert read['a.right'].dtype == np.uint32 and verdicts.read(str(tmp_path / 'none')) == {}


def test_an_unreadable_verdicts_file_is_one_message_naming_it(tmp_path):
  (tmp_path / verdicts.VERDICTS_FILE).write_bytes(b'not a zip')
  with pytest.raises(
    verdicts.VerdictsFileError, match='verdicts.npz does not read .*move it aside'
  ):
    verdicts.read(str(tmp_path))
