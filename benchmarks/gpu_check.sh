#!/usr/bin/env bash
# GPU checks: the CUDA / NCCL paths that CPU-only CI cannot run (issue "Runs on real GPUs").
#
#   benchmarks/gpu_check.sh                 # on a GPU machine, from the repository root
#   DEVICE=cpu benchmarks/gpu_check.sh      # the same steps on the CPU (checks the script itself)
#   QUICK=1 ...                             # skip the every-protocol sweep
#
# Steps (each prints PASS / FAIL / SKIP and the run goes on; exit 1 if any failed):
#   1. one-GPU training (alexnet, 64 px) without and with AMP (bfloat16 autocast)
#   2. kill -9 during training, then --resume completes the run
#   3. the checkpoint loads with a plain torch.load on a machine without a GPU
#   4. DDP training under torchrun (NCCL on GPUs) on alexnet and timm:convnext_atto with AMP:
#      2 processes when 2 GPUs exist, else 1 (still NCCL, one rank)
#   5. faiss GPU vs CPU k-means, and every protocol's golden case on the device compared with
#      the CPU golden numbers (benchmarks/gpu_check.py)
#   6. with 2 GPUs: torchrun evaluation (knn) equals the one-process result
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-$(mktemp -d)}
export DCBENCH_CACHE="$WORK/cache" DCBENCH_STORE="$WORK/store.db"
LOG="$WORK/log"
mkdir -p "$LOG"
FAILED=0
PASSED=0

GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" != cpu ] && [ "$GPUS" -lt 1 ]; then
  echo "no CUDA device visible (torch.cuda.device_count() = 0); run on a GPU machine or set DEVICE=cpu"
  exit 1
fi
NPROC=$(( GPUS >= 2 ? 2 : 1 ))
[ "$DEVICE" = cpu ] && NPROC=2
echo "gpu_check: device=$DEVICE gpus=$GPUS torchrun processes=$NPROC work=$WORK"
$PY -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'faiss', faiss.__version__)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# step NAME TIMEOUT_S COMMAND...: run, keep the output in $LOG/NAME.txt, print one line
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS status
  # a subshell + watchdog rather than timeout(1), which cannot run the shell functions below
  ( "$@" ) >"$LOG/$name.txt" 2>&1 &
  local pid=$!
  ( sleep "$limit"; kill -9 "$pid" 2>/dev/null ) &
  local watchdog=$!
  wait "$pid"; status=$?
  kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null
  if [ "$status" -eq 0 ]; then
    echo "PASS $name ($((SECONDS - t0)) s)"; PASSED=$((PASSED + 1))
  else
    echo "FAIL $name (exit $status, $((SECONDS - t0)) s): $(tail -n 3 "$LOG/$name.txt" | tr '\n' ' ' | cut -c1-400)"
    FAILED=$((FAILED + 1))
  fi
}

# 0. dcbench doctor: versions, devices, bf16 autocast, NCCL, faiss GPU support (printed in full)
step doctor 120 $PY -m dcbench doctor; cat "$LOG/doctor.txt"

DATA="$WORK/data"
$PY -m dcbench fixtures imagefolder "$DATA" --classes 4 --per-class 24 --size 64 >/dev/null
TRAIN=(-m dcbench train --data "$DATA/train" --image-size 64 --k 8 --batch-size 16 --workers 2
       --device "$DEVICE" --set pca_dim=16)

# 1. one-GPU training, fp32 and AMP
step train-fp32 600 $PY "${TRAIN[@]}" --epochs 2 --out "$WORK/run-fp32"
step train-amp 600 $PY "${TRAIN[@]}" --epochs 2 --out "$WORK/run-amp" --set amp=true
# each epoch's phase times and how long its passes waited for images (is the GPU fed?)
grep -h "waiting for images" "$LOG/train-fp32.txt" "$LOG/train-amp.txt" | sed 's/^.*epoch /    epoch /'

# 2. kill -9 after the first checkpoint, then resume
kill_and_resume() {
  local out="$WORK/run-kill"
  $PY "${TRAIN[@]}" --epochs 4 --out "$out" >"$LOG/kill-first.txt" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do [ -f "$out/checkpoint.pth" ] && break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  [ -f "$out/checkpoint.pth" ] || { echo "no checkpoint appeared"; return 1; }
  $PY "${TRAIN[@]}" --epochs 4 --out "$out" --resume || return 1
  $PY - "$out" <<'EOF'
import json, sys
epochs = [json.loads(line)["epoch"] for line in open(f"{sys.argv[1]}/metrics.jsonl") if line.strip()]
assert epochs == [0, 1, 2, 3], epochs
print("epochs after resume:", epochs)
EOF
}
step kill-resume 900 kill_and_resume

# 3. a plain torch.load on a machine without a GPU (checkpoints hold CPU tensors)
step load-on-cpu 120 env CUDA_VISIBLE_DEVICES= $PY -c "
import torch, sys
record = torch.load('$WORK/run-amp/checkpoint.pth', weights_only=False)
tensors = [v for v in record['state_dict'].values() if isinstance(v, torch.Tensor)]
assert tensors and all(t.device.type == 'cpu' for t in tensors)
print(len(tensors), 'CPU tensors')"

# 4. DDP (NCCL) on alexnet and a timm ConvNeXt, bfloat16 autocast
TORCHRUN=($PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
step ddp-alexnet-amp 900 env OMP_NUM_THREADS=4 "${TORCHRUN[@]}" "${TRAIN[@]}" --epochs 2 --out "$WORK/run-ddp-alexnet" --set amp=true
step ddp-convnext-amp 900 env OMP_NUM_THREADS=4 "${TORCHRUN[@]}" "${TRAIN[@]}" --arch timm:convnext_atto --no-sobel \
  --epochs 2 --out "$WORK/run-ddp-convnext" --set amp=true

# 5. faiss GPU k-means and every protocol on the device against the CPU golden numbers
if [ -z "${QUICK:-}" ]; then
  step protocols 1800 $PY benchmarks/gpu_check.py --device "$DEVICE" --work "$WORK/golden"
  grep -E "^(PASS|FAIL|SKIP)" "$LOG/protocols.txt" | sed 's/^/    /'
fi

# 6. torchrun evaluation equals one process
if [ "$NPROC" -ge 2 ]; then
  EVAL=(-m dcbench eval --protocol knn --checkpoint "$WORK/run-fp32/checkpoint.pth" --data "$DATA"
        --set image_size=64 --device "$DEVICE" --json)
  ddp_eval_equal() {
    $PY "${EVAL[@]}" >"$WORK/eval-one.json" || return 1
    env OMP_NUM_THREADS=4 "${TORCHRUN[@]}" "${EVAL[@]}" >"$WORK/eval-ddp.json" || return 1
    $PY - "$WORK/eval-one.json" "$WORK/eval-ddp.json" <<'EOF'
import json, sys
def rows(path):
    text = open(path).read()
    record = json.loads(text[text.index("{"):])
    return {(m["tap"], m["metric"]): m["value"] for m in record["metrics"]}
one, ddp = rows(sys.argv[1]), rows(sys.argv[2])
worst = max(abs(one[k] - ddp[k]) for k in one)
assert one.keys() == ddp.keys() and worst <= 1.0, (worst, one, ddp)
print("largest |one process - torchrun| =", worst)
EOF
  }
  step ddp-eval-knn 900 ddp_eval_equal
else
  echo "SKIP ddp-eval-knn (one GPU)"
fi

echo "gpu_check: $PASSED passed, $FAILED failed; logs in $LOG"
[ "$FAILED" -eq 0 ]
