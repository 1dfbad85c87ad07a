#!/usr/bin/env bash
# benchmarks/gpu_check.sh on a machine without network access: installs the wheelhouse that
# benchmarks/device_wheels.sh wrote (copied along with the repository) and dcbench built from this
# checkout into a scratch folder, then runs the checks with that machine's own Python, PyTorch and
# GPU. Nothing outside the scratch folder is installed or changed.
#
#   bash benchmarks/gpu_check_device.sh            # every check (QUICK=1: skip the protocol sweep)
#   WHEELS=/path/to/wheels SITE=/tmp/site DEVICE=cpu QUICK=1 bash benchmarks/gpu_check_device.sh
#
# Needs Python >= 3.11 with torch, torchvision, timm, numpy, scipy, scikit-learn, Pillow, click,
# PyYAML, tqdm, matplotlib, setuptools and wheel already there. With OUT set (a folder that is
# collected afterwards), the logs of every check are left in $OUT/gpu_check_logs.tar.gz.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/dcbench-site}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "needs Python >= 3.11 (PYTHONSAFEPATH)"; exit 1; }
ls "$WHEELS"/faiss_cpu-*.whl >/dev/null 2>&1 || { echo "no wheelhouse in $WHEELS: run benchmarks/device_wheels.sh where pip reaches the index, and copy $WHEELS here"; exit 1; }
BUILT=$(mktemp -d)
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-index -w "$BUILT" . || { echo "building dcbench's wheel failed (setuptools >= 64 and wheel are needed)"; exit 1; }
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "$WHEELS"/*.whl "$BUILT"/dcbench-*.whl || exit 1
# the installed dcbench (its entry points register the protocols), not the source tree in the
# current folder: PYTHONSAFEPATH keeps the working directory off sys.path; the repository stays
# reachable after it for benchmarks/ and tests/golden
export PYTHONSAFEPATH=1 PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PY
"$PY" -c "import dcbench, faiss, submitit; from dcbench.protocol import list_protocols; \
print('dcbench', dcbench.__version__, 'from', dcbench.__file__, '|', len(list_protocols()), 'protocols')" || exit 1
export WORK=${WORK:-$(mktemp -d)}
bash benchmarks/gpu_check.sh
status=$?
if [ -n "${OUT:-}" ] && [ -d "$WORK/log" ]; then
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" log
fi
exit $status
