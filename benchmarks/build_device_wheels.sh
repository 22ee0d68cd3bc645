#!/usr/bin/env bash
# Builds benchmarks/device_wheels/ (git-ignored): the wheels of what l2p-jax and its test
# files import that the lent GPU machines' image lacks (it has Python 3.12, jax with the
# CUDA plugin, flax, optax, orbax-checkpoint, chex, torch, numpy, scipy, absl-py, pytest,
# pytest-xdist, tqdm, matplotlib, pyyaml, protobuf, etils, requests, psutil, pyarrow, wrapt),
# for Python 3.12 on x86-64 Linux, without their dependencies. Versions are those of the
# Python this runs with, where it has the package (the ones the suite passed with here).
# benchmarks/device_check.py --wheels installs them there; nothing downloads on that machine.
#
#   bash benchmarks/build_device_wheels.sh   # about 10 MiB; the device tool carries 64
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=benchmarks/device_wheels
PYTHON=${PYTHON:-python}
PACKAGES=(
  ml_collections importlib_resources tensorboardX torchattacks
  # tensorflow-datasets and the runtime dependencies the image lacks:
  tensorflow-datasets array_record dm-tree immutabledict simple_parsing docstring_parser
  tensorflow-metadata googleapis-common-protos termcolor toml
)
SOURCE_ONLY=(promise)  # Pure Python, published as a source archive only: built here.
pinned() {  # NAME==VERSION of each name, VERSION the installed one where there is one.
  for name in "$@"; do
    version=$("$PYTHON" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$name")
    echo "$name${version:+==$version}"
  done
}
rm -rf "$DEST"
mapfile -t specs < <(pinned "${PACKAGES[@]}")
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
mapfile -t specs < <(pinned "${SOURCE_ONLY[@]}")
"$PYTHON" -m pip wheel --quiet --no-deps -w "$DEST" "${specs[@]}"
size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $(ls "$DEST" | wc -l) wheels, ${size} MiB"
if ((size > 60)); then
  echo "over 60 MiB: the device tool carries 64 MiB with the working tree" >&2
  exit 1
fi
