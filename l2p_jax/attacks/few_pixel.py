"""Few-pixel attack (Su, Vargas & Sakurai 2019) by differential evolution, batched.

A candidate is n_pixels times (row, column, colour channels), every coordinate scaled to
[0, 1] (row = floor(u * H), colour values are pixel values). Each example has its own
population; one generation evaluates every trial of every example in chunks of
`chunk_size` candidates (chunk_size x batch inputs per forward pass) so memory stays
bounded. Choices (Su et al. leave them open or differ from scipy's defaults):

* DE/rand/1 with F = `mutation` (Su et al.: 0.5; scipy: best1bin with dithering);
  mutants are clipped to the bounds.
* Binomial crossover with probability `crossover`; the default 1.0 makes the trial the
  mutant, i.e. no crossover, as in Su et al. (scipy's default is 0.7).
* Uniform random initial population (Su et al. draw colours from a Gaussian; scipy uses
  a Latin hypercube); generations update synchronously (scipy's 'deferred' updating).
* A trial replaces its parent when its fitness is no worse (`<=`), so populations drift
  across the flat regions a softmax saturates into.
* Fitness is the probability of the true class under the generation's noise draw;
  parents keep the fitness they were evaluated with (as in plain DE).
* An example is done as soon as any evaluated candidate is misclassified: its result
  freezes, and the generation loop stops when every example is done.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from l2p_jax.attacks import core, progress


def _mutation_draws(key: jax.Array, n: int, population: int, dims: int):
  """For each (example, candidate i): three population indices distinct from each other
  and from i (DE/rand/1's r1, r2, r3), and the dimension crossover must take.

  One draw gives offsets o1 in [1, P), o2 in [1, P-1), o3 in [1, P-2) from i; each
  later offset skips, in increasing order, the values already taken, which makes the
  three a uniform draw without replacement from the P - 1 others.
  """
  low = jnp.array([1, 1, 1, 0])[:, None, None]
  high = jnp.array([population, population - 1, population - 2, dims])[:, None, None]
  o1, o2, o3, forced = jax.random.randint(key, (4, n, population), low, high)
  o2 = o2 + (o2 >= o1)
  lo, hi = jnp.minimum(o1, o2), jnp.maximum(o1, o2)
  o3 = o3 + (o3 >= lo)
  o3 = o3 + (o3 >= hi)
  i = jnp.arange(population)
  return [(i + o) % population for o in (o1, o2, o3)] + [forced]


def _paint(x: jax.Array, candidates: jax.Array, n_pixels: int) -> jax.Array:
  """Writes each example's candidate (N, dims), n_pixels times (row, column, colour) in
  [0, 1], into its image."""
  n, height, width, channels = x.shape
  c = candidates.reshape(n, n_pixels, 2 + channels)
  rows = jnp.minimum((c[..., 0] * height).astype(jnp.int32), height - 1)
  cols = jnp.minimum((c[..., 1] * width).astype(jnp.int32), width - 1)
  return x.at[jnp.arange(n)[:, None], rows, cols].set(c[..., 2:])


def _evaluate(
  logits_fn: core.LogitsFn,
  x: jax.Array,
  y: jax.Array,
  pop: jax.Array,
  generation_key: jax.Array,
  n_pixels: int,
  chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
  """True-class probability (the fitness DE minimises) and misclassification of every
  candidate of the population (N, P, dims), (N, P) each, `chunk_size` candidates at a time."""
  batch = jnp.arange(x.shape[0])

  def one_candidate(candidates):
    logits = logits_fn(_paint(x, candidates, n_pixels), jax.random.fold_in(generation_key, 0))
    prob = jax.nn.softmax(logits)[batch, y]
    return prob, jnp.argmax(logits, -1) != y

  prob, fooled = jax.lax.map(one_candidate, pop.swapaxes(0, 1), batch_size=chunk_size)
  return prob.T, fooled.T


def _record(
  x: jax.Array, pop: jax.Array, fooled: jax.Array, done: jax.Array, x_adv: jax.Array, n_pixels: int
) -> tuple[jax.Array, jax.Array]:
  """Freezes the first misclassified candidate of examples not done before; returns the
  updated (done, x_adv)."""
  new = fooled.any(axis=1) & ~done
  first = pop[jnp.arange(x.shape[0]), jnp.argmax(fooled, axis=1)]
  return done | new, jnp.where(core.per_example(new, x), _paint(x, first, n_pixels), x_adv)


def _trial(key: jax.Array, pop: jax.Array, mutation: float, crossover: float) -> jax.Array:
  """DE/rand/1/bin's trial population: mutants r1 + F (r2 - r3) clipped to [0, 1],
  crossed over with the population (each dimension with probability `crossover`, one
  forced dimension always)."""
  n, population, dims = pop.shape
  pick_key, cross_key = jax.random.split(key)
  *picks, forced = _mutation_draws(pick_key, n, population, dims)
  r1, r2, r3 = [jnp.take_along_axis(pop, r[..., None], axis=1) for r in picks]
  mutant = jnp.clip(r1 + mutation * (r2 - r3), 0.0, 1.0)
  cross = jax.random.uniform(cross_key, pop.shape) < crossover
  cross = cross | jax.nn.one_hot(forced, dims, dtype=bool)
  return jnp.where(cross, mutant, pop)


def few_pixel(
  logits_fn: core.LogitsFn,
  key: jax.Array,
  x: jax.Array,
  y: jax.Array,
  *,
  n_pixels: int = 1,
  population: int = 400,
  iterations: int = 75,
  mutation: float = 0.5,
  crossover: float = 1.0,
  chunk_size: int = 50,
) -> core.AttackResult:
  """Untargeted few-pixel attack: differential evolution over `n_pixels` pixel
  positions and colours minimising the true class's probability; returns the first
  misclassified candidate found per example (`success`), else the fittest one.
  `iterations` only bounds the generation loop, so it may be a traced value.

  Keys: (init_key, loop_key) = split(key); generation g (0 = the initial population)
  evaluates with noise key fold_in(fold_in(loop_key, g), 0) and mutates/crosses over
  with the two keys split from fold_in(fold_in(loop_key, g), 1).
  """
  if population < 4:
    raise ValueError(f'DE/rand/1 needs a population of at least 4, got {population}.')
  n, _, _, channels = x.shape
  dims = n_pixels * (2 + channels)
  evaluate = functools.partial(_evaluate, logits_fn, x, y, n_pixels=n_pixels, chunk_size=chunk_size)
  record = functools.partial(_record, x, n_pixels=n_pixels)

  init_key, loop_key = jax.random.split(key)
  pop = jax.random.uniform(init_key, (n, population, dims), x.dtype)
  fitness, fooled = evaluate(pop, jax.random.fold_in(loop_key, 0))
  done, x_adv = record(pop, fooled, jnp.zeros(n, bool), x)

  def generation(state):
    g, pop, fitness, done, x_adv = state
    generation_key = jax.random.fold_in(loop_key, g)
    trial = _trial(jax.random.fold_in(generation_key, 1), pop, mutation, crossover)
    trial_fitness, trial_fooled = evaluate(trial, generation_key)
    done_new, x_adv = record(trial, trial_fooled, done, x_adv)
    accept = (trial_fitness <= fitness) & ~done[:, None]
    progress.tick(g, iterations)
    return (
      g + 1,
      jnp.where(accept[..., None], trial, pop),
      jnp.where(accept, trial_fitness, fitness),
      done_new,
      x_adv,
    )

  keep_going = lambda state: (state[0] <= iterations) & ~jnp.all(state[3])  # noqa: E731
  _, pop, fitness, done, x_adv = jax.lax.while_loop(
    keep_going, generation, (jnp.int32(1), pop, fitness, done, x_adv)
  )
  fittest = pop[jnp.arange(n), jnp.argmin(fitness, axis=1)]
  x_adv = jnp.where(core.per_example(done, x), x_adv, _paint(x, fittest, n_pixels))
  return core.make_result(x, x_adv, done)
