"""Why a training step is as fast as it is: one 3x3 convolution of each ResNet-20
stage, forward, input gradient and kernel gradient, in JAX (XLA) and PyTorch, as GFLOP/s.

A PGD-7 training step is about 200 such convolutions, so the ratio of these rates is
the ratio of the two frameworks' steps to within the cost of BatchNorm and ReLU.

  python benchmarks/conv_profile.py --batch 128 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

try:
  import torch
  import torch.nn.functional as F
except ImportError:
  torch = None

# (spatial size, channels) of ResNet-20's three stages on 32x32 inputs.
STAGES = ((32, 16), (16, 32), (8, 64))


def median_seconds(call: Callable[[], object], repeats: int) -> float:
  """Median wall time of `call` over `repeats` calls after one warm-up call."""
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_passes(x: np.ndarray, w: np.ndarray) -> dict[str, Callable[[], object]]:
  """Jitted forward, input-gradient and kernel-gradient convolutions (NHWC, HWIO)."""
  conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  x, w = jnp.asarray(x), jnp.asarray(w)
  g = conv(x, w)
  forward = jax.jit(conv)
  grad_x = jax.jit(lambda x, w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0])
  grad_w = jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
  return {
    'forward': lambda: forward(x, w).block_until_ready(),
    'input gradient': lambda: grad_x(x, w, g).block_until_ready(),
    'kernel gradient': lambda: grad_w(x, w, g).block_until_ready(),
  }


def torch_passes(x: np.ndarray, w: np.ndarray) -> dict[str, Callable[[], object]]:
  """The same three convolutions in PyTorch (NCHW, OIHW), as autograd runs them."""
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
  g = F.conv2d(xt, wt, padding=1)
  size = xt.shape
  return {
    'forward': lambda: F.conv2d(xt, wt, padding=1),
    'input gradient': lambda: torch.nn.grad.conv2d_input(size, wt, g, padding=1),
    'kernel gradient': lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, g, padding=1),
  }


def main(argv: list[str] | None = None) -> None:
  """Prints a Markdown table of GFLOP/s per stage, pass and framework."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args(argv)
  if torch is not None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  print(
    f'load {os.getloadavg()[0]:.2f}, jax {jax.__version__}, torch '
    f'{torch.__version__ if torch else "not installed"}, batch {args.batch}'
  )
  print('| stage (HxW, channels) | pass | JAX GFLOP/s | PyTorch GFLOP/s | PyTorch/JAX |')
  print('|---|---|---|---|---|')
  rng = np.random.default_rng(0)
  for side, channels in STAGES:
    x = rng.standard_normal((args.batch, side, side, channels), np.float32)
    w = rng.standard_normal((3, 3, channels, channels), np.float32)
    flops = 2 * args.batch * side * side * channels * channels * 9
    jax_calls = jax_passes(x, w)
    torch_calls = torch_passes(x, w) if torch is not None else {}
    for name, call in jax_calls.items():
      jax_rate = flops / median_seconds(call, args.repeats) / 1e9
      torch_rate = (
        flops / median_seconds(torch_calls[name], args.repeats) / 1e9
        if torch_calls
        else float('nan')
      )
      print(
        f'| {side}x{side}, {channels} | {name} | {jax_rate:.1f} | {torch_rate:.1f} | '
        f'{torch_rate / jax_rate:.2f} |',
        flush=True,
      )
  print(f'load {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  sys.exit(main())
