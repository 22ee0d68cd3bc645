"""Progress a person can follow: each built-in attack's registry cost against counts made
by hand, the estimate's arithmetic on made-up timings, the ticks the attacks send from
inside one compiled call (PGD: steps x restarts, C&W: binary steps x steps; on one
device and on two), nothing compiled in without them, and the same records either way."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_models

from benchmarks import eval_projection
from l2p_jax import attacks, evaluation
from l2p_jax.attacks import progress as attack_progress
from l2p_jax.evaluation import estimate, judging
from l2p_jax.evaluation.attack_registry import Cost
from l2p_jax.evaluation.judged_model import JudgedModel

ROOT = pathlib.Path(__file__).resolve().parents[1]


def spec(attack, eps=8 / 255, **params):
  return evaluation.AttackSpec(attack, tuple(params.items()), eps)


@pytest.mark.parametrize(
  'attack, params, cost',
  [
    ('clean', {}, Cost(0, 0, 0)),
    ('fgsm', {}, Cost(1, 0, 1)),
    ('pgd', dict(steps=10, restarts=1, eot_draws=1), Cost(10, 0, 10, 'pgd7')),
    ('pgd', dict(steps=7, restarts=2, eot_draws=3), Cost(7 * 2 * 3, 0, 14, 'eot_pgd')),
    ('cw', dict(binary_steps=9, steps=10), Cost(90, 0, 90)),
    # In expectation: every Adam step's gradient and the fresh draws judging it, per draw.
    ('cw', dict(binary_steps=9, steps=10, eot_draws=5), Cost(450, 450, 90, 'eot_pgd')),
    ('apgd_rand', dict(steps=100, eot_draws=20), Cost(2 * 101 * 20, 0, 200, 'apgd')),
    ('apgd_t', dict(steps=10, target_classes=3), Cost(3 * 11, 0, 30, 'apgd')),
    ('apgd_t', dict(steps=10, target_classes=3, eot_draws=2), Cost(3 * 11 * 2, 0, 30, 'apgd')),
    (
      'autoattack',
      dict(version='standard', steps=10, target_classes=3, queries=50),
      Cost(4 * 11, 50, 4 * 10 + 50, 'apgd'),
    ),
    ('autoattack', dict(version='rand', steps=10, eot_draws=2), Cost(2 * 11 * 2, 0, 20, 'apgd')),
    ('square', dict(queries=100, p_init=0.8), Cost(0, 100, 100, 'forward')),
    ('square', dict(queries=100, p_init=0.8, eot_draws=4), Cost(0, 400, 100, 'forward')),
    (
      'few_pixel',
      dict(n_pixels=1, population=400, iterations=75),
      Cost(0, 400 * 76, 75, 'forward'),
    ),
  ],
)
def test_every_built_in_attack_costs_what_its_loops_run(attack, params, cost):
  assert spec(attack, **params).cost == cost
  assert eval_projection.attack_cost(spec(attack, **params)) == cost._asdict()


@pytest.fixture
def unpriced():
  """A registered attack without a cost, as a third party may register one."""
  entry = dataclasses.replace(
    evaluation.attack_entry('clean'), name='toy', presets={'toy': evaluation.Preset(None)}, column=9
  )
  entry = dataclasses.replace(entry, cost=None)
  with evaluation.registered(entry):
    yield evaluation.AttackSpec('toy')


def test_an_attack_without_a_cost_is_unpriced_and_an_error_only_where_a_cost_is_needed(unpriced):
  assert unpriced.cost is None
  with pytest.raises(evaluation.EvaluationError, match='give its registry entry .* a `cost`'):
    eval_projection.attack_cost(unpriced)
  [head, line] = estimate.estimate_lines([estimate.Planned('toy', unpriced, 10, 2)], 1.0, 1.0)
  assert head.endswith(', 1 unpriced attacks not counted.') and '~0 s in all' in head
  assert line == '  toy: unpriced (its registry entry has no cost)'


def test_the_estimate_prices_gradients_forwards_and_judging_per_image():
  pgd = spec('pgd', steps=10, restarts=1, eot_draws=1, step_size=0.01, random_start=True)
  square = spec('square', queries=100, p_init=0.8)
  planned = [estimate.Planned('a', pgd, 100, 6), estimate.Planned('b', square, 50, 2)]
  head, a, b = estimate.estimate_lines(planned, gradient=0.002, forward=0.0005)
  # 100 x (10 x 2 ms + 6 x 0.5 ms) = 2.3 s; 50 x (100 + 2) x 0.5 ms = 2.55 s.
  assert a == '  a: ~2.3 s (100 images x 10 gradients and 6 forward passes)'
  assert b == '  b: ~2.55 s (50 images x 0 gradients and 102 forward passes)'
  assert head.startswith('estimate: ~4.85 s in all, from a gradient at 2 ms/image (a ')
  assert head.endswith('an upper bound where an attack stops early, compiling not counted.')


def test_an_attack_recorded_by_an_earlier_run_is_not_priced():
  pgd = spec('pgd', steps=10, restarts=1, eot_draws=1, step_size=0.01, random_start=True)
  planned = [estimate.Planned('a', pgd, 100, 6), estimate.Planned('b', pgd, 100, 6, recorded=True)]
  head, a, b = estimate.estimate_lines(planned, gradient=0.002, forward=0.0005)
  assert head.startswith('estimate: ~2.3 s in all')  # a's 100 x (10 x 2 ms + 6 x 0.5 ms) only.
  assert a.startswith('  a: ~2.3 s')
  assert b == '  b: already recorded in the output folder, not priced'


def test_judging_costs_a_forward_pass_per_judged_draw_and_prediction_draw_and_clean_once():
  config = evaluation.default_config('tiny')
  config.judge.draws = 3
  model = lambda randomized, rule: JudgedModel(None, None, randomized, rule, {})  # noqa: E731
  noisy, plain = model(True, ('vote', 10)), model(False, ('single', 1))
  assert estimate.judge_forwards(config, [noisy]) == 3 * 10
  assert estimate.judge_forwards(config, [noisy, plain]) == 30 + 1
  clean = estimate.clean_judging('noisy', 40, config, noisy)
  assert (clean.images, clean.forwards) == (40, 30)
  pgd = spec('pgd', steps=3, restarts=1, eot_draws=1)
  head, _, line = estimate.estimate_lines(
    [estimate.Planned('a', pgd, 40, 30)], gradient=0.001, forward=0.001, clean=[clean]
  )
  # The attack: 40 x (3 x 1 ms + 30 x 1 ms) = 1.32 s; the clean images once: 40 x 30 x 1 ms.
  assert line == (
    '  judging the clean images of noisy, once for all its attacks: ~1.2 s '
    '(40 images x 30 forward passes)'
  )
  assert head.startswith('estimate: ~2.52 s in all')
  assert (
    estimate.planned('x', dataclasses.replace(pgd, examples=5), 12, config, [plain]).images == 5
  )
  assert estimate.planned('x', pgd, 12, config, [plain]).images == 12


def toy_logits(variables, noise, x, key):
  """The evaluation's Logits of the toy noisy model (its noise on or off)."""
  del variables
  return toy_models.noisy(x, key) if noise else toy_models.linear(x, key)


PGD = (('steps', 5), ('step_size', 0.05), ('random_start', True), ('restarts', 2))
CW = (('binary_steps', 3), ('steps', 4), ('learning_rate', 0.05))


def attack_batch(attack, params, ticks, x=toy_models.X):
  heard = []
  with attack_progress.listening(lambda done, total: heard.append((done, total))):
    result = judging._attack_batch(
      None,
      x,
      toy_models.Y,
      jnp.ones(len(x), bool),
      jax.random.key(1),
      jnp.float32(0.1) if attack is attacks.pgd else None,
      logits=toy_logits,
      attack=attack,
      params=params,
      noise=True,
      ticks=ticks,
    )
    jax.block_until_ready(result)
    jax.effects_barrier()
  return result, heard


@pytest.mark.parametrize(
  'attack, params, iterations', [(attacks.pgd, PGD, 10), (attacks.cw_l2, CW, 12)]
)
def test_the_ticks_count_every_iteration_of_one_compiled_call_and_change_no_bit(
  attack, params, iterations
):
  (x_adv, curve), heard = attack_batch(attack, params, ticks=True)
  assert sorted(heard) == [(k, iterations) for k in range(1, iterations + 1)]
  (x_plain, curve_plain), none = attack_batch(attack, params, ticks=False)
  assert none == [] and np.array_equal(x_adv, x_plain)
  assert (curve is None and curve_plain is None) or np.array_equal(curve, curve_plain)


def test_a_long_loop_calls_back_every_total_over_ticks_iterations_and_at_its_end():
  steps = 2 * attack_progress.TICKS + 5  # Every 2nd iteration, and the last.
  params = (('steps', steps), ('step_size', 0.05), ('random_start', True), ('restarts', 1))
  _, heard = attack_batch(attacks.pgd, params, ticks=True)
  assert sorted(heard) == [(k, steps) for k in (*range(2, steps, 2), steps)]


def test_without_ticks_the_attack_compiles_no_callback():
  lower = lambda ticks: judging._attack_batch.lower(  # noqa: E731
    None,
    toy_models.X,
    toy_models.Y,
    jnp.ones(32, bool),
    jax.random.key(1),
    jnp.float32(0.1),
    logits=toy_logits,
    attack=attacks.pgd,
    params=PGD,
    noise=True,
    ticks=ticks,
  ).as_text()
  assert 'callback' not in lower(False) and 'callback' in lower(True)


TWO_DEVICES = """
  import json, sys
  sys.path.insert(0, 'tests')
  import jax
  import test_progress as t
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = jax.sharding.Mesh(jax.devices(), ('data',))
  x = jax.device_put(t.toy_models.X, NamedSharding(mesh, PartitionSpec('data')))
  _, heard = t.attack_batch(t.attacks.pgd, t.PGD, True, x)
  print(json.dumps({'devices': jax.device_count(), 'heard': heard}))
"""


def test_on_two_devices_the_largest_tick_is_the_whole_attack():
  env = {k: v for k, v in os.environ.items() if k != 'JAX_NUM_CPU_DEVICES'}
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(TWO_DEVICES)],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out['devices'] == 2
  assert max(out['heard']) == [10, 10] and {d for d, _ in out['heard']} == set(range(1, 11))


def test_a_record_with_the_ticks_equals_the_record_without(tmp_path):
  records = []
  for ticks in (True, False):
    config = evaluation.default_config('tiny')
    config.progress_bar = ticks
    results = evaluation.evaluate(
      toy_models.noisy,
      np.asarray(toy_models.X),
      np.asarray(toy_models.Y),
      randomized=True,
      attacks='clean,fgsm,pgd,cw,apgd,square',
      config=config,
    )
    times = ('seconds', 'judge_seconds')
    records.append([{k: v for k, v in r.items() if k not in times} for r in results['records']])
  assert len(records[0]) == 6 and records[0] == records[1]
