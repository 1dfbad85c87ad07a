#!/usr/bin/env bash
# A wheelhouse for running dcbench's GPU checks on a machine without network access (an offline
# cluster node, a sealed GPU box) that already has Python, PyTorch, torchvision, timm, numpy,
# scipy, scikit-learn, Pillow, click, PyYAML, tqdm and matplotlib: run this where pip can reach
# the package index, copy the folder across with the repository, then run
# benchmarks/gpu_check_device.sh there.
#
#   benchmarks/device_wheels.sh                 # -> .whl/ (for CPython 3.12 on x86-64 Linux)
#   PYVER=3.11 OUT=/tmp/wheels benchmarks/device_wheels.sh
#
# It writes the wheels of what such a machine usually lacks: faiss-cpu (k-means, PCA), submitit
# (launchers), the `seg` extra (mmsegmentation, mmengine, mmcv-lite, ftfy) and their small
# pure-Python needs, at the versions this checkout's .venv runs (its CI), so both machines run the
# same code; dcbench itself is built from the checkout over there. Nothing is installed here.
# The folder is ignored by git (.git/info/exclude).
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PYVER=${PYVER:-3.12}
OUT=${OUT:-.whl}
mkdir -p "$OUT"
if [ "$OUT" = .whl ] && ! grep -qx '/.whl/' "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null; then
  mkdir -p "$(git rev-parse --git-dir)/info"
  echo '/.whl/' >>"$(git rev-parse --git-dir)/info/exclude"
fi
rm -f "$OUT"/*.whl

# the installed version of NAME in this checkout's environment (the pin), or nothing
pin() { "$PY" -c "import sys; from importlib import metadata
try: print(f'{sys.argv[1]}=={metadata.version(sys.argv[1])}')
except metadata.PackageNotFoundError: print(sys.argv[1])" "$1"; }

NAMES="faiss-cpu submitit cloudpickle mmsegmentation mmengine mmcv-lite ftfy addict yapf platformdirs termcolor
prettytable wcwidth"
SPECS=$(for name in $NAMES; do pin "$name"; done)
PLATFORMS=""
for n in 28 27 24 17; do PLATFORMS="$PLATFORMS --platform manylinux_2_${n}_x86_64"; done
# shellcheck disable=SC2086  # word splitting of the lists is intended
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  $PLATFORMS --platform manylinux2014_x86_64 --platform any -d "$OUT" $SPECS
echo "wheels for Python $PYVER in $OUT ($(du -sh "$OUT" | cut -f1)):"
ls "$OUT"
