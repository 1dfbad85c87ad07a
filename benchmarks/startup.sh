#!/usr/bin/env bash
# CLI start-up time (issue 17, item 4): best of N wall-clock seconds per command, whole processes,
# after one warm-up run each (warm import cache, compiled .pyc files), with two baselines:
# the bare interpreter (`python -c pass`) and `python -c "import torch"`.
#
#   benchmarks/startup.sh            # N=5
#   N=10 benchmarks/startup.sh
#
# Target: `dcbench --help`, `dcbench --version` and `dcbench protocols` under 1 s on a quiet
# 2-core machine. The commands run through `python -m dcbench` (what the `dcbench` script runs).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
N=${N:-5}

# best SECONDS of N runs of the command (stdout/stderr discarded)
best() {
  "$PY" - "$N" "$@" <<'PYEOF'
import subprocess, sys, time
n, cmd = int(sys.argv[1]), sys.argv[2:]
subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # warm-up
times = []
for _ in range(n):
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    times.append(time.perf_counter() - t0)
    if rc != 0:
        sys.exit(f"exit {rc}: {' '.join(cmd)}")
print(f"{min(times):.3f}")
PYEOF
}

echo "startup (best of $N, seconds; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
printf "%-34s %s\n" "python -c pass" "$(best "$PY" -c pass)"
printf "%-34s %s\n" "python -c 'import torch'" "$(best "$PY" -c 'import torch')"
for args in "--help" "--version" "protocols" "train --help" "eval --help"; do
  # shellcheck disable=SC2086  # the arguments split on purpose
  printf "%-34s %s\n" "dcbench $args" "$(best "$PY" -m dcbench $args)"
done
