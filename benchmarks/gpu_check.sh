#!/usr/bin/env bash
# GPU first light: the CUDA paths of hwslim on one lent H100/H200, as one prepared script.
#
#   bash benchmarks/gpu_check.sh train OUT [DATA]   # CIFAR-10 supernets + `pytest -m gpu` (~6 min)
#   bash benchmarks/gpu_check.sh check OUT          # kernels + CUDA latency tables (~5 min)
#   bash benchmarks/gpu_check.sh all   OUT [DATA]   # both, in that order
#
# train: three CIFAR-10 supernets trained side by side on the one GPU with
#   benchmarks/train_cifar10.py (ResNet-20 x4, the recipe's own target; ResNet-20 x1 and
#   MobileNetV2-CIFAR x1, the search-quality benchmark's assets), each for TRAIN_BUDGET_S
#   seconds of training (default 230) after a timed probe epoch; `pytest -m gpu` runs beside
#   them (correctness only: nothing timed runs during training). Checkpoints are written
#   compact (no optimizer state; MobileNetV2 and ResNet-20 x4 weights in fp16).
# check: benchmarks/kernel.py (bandwidth/FLOP ceilings and one whole MobileNetV2 1.5x
#   greedy step at batch 64, fp32 and bf16), then benchmarks/lut_accuracy.py with the
#   PyTorch-CUDA backend (it profiles the table first): ResNet-20@32 at batch 1 and
#   MobileNetV2 1.5x@224 at batch 32, 30 held-out random configs + 12 uniform each.
#
# Every step has its own time limit, and DEADLINE_S (seconds from the start, default 560)
# shortens or skips the later ones, so the whole run ends inside one device call. Logs,
# result CSVs and tables go to OUT (results.tgz bundles them). Without a CUDA GPU the
# script says so and runs nothing.
set -u
PART=${1:?usage: gpu_check.sh train|check|all OUT [DATA]}
OUT=${2:?usage: gpu_check.sh train|check|all OUT [DATA]}
DATA=${3:-/work/shared/data/cifar10}
PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-560}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-230}
START=$(date +%s)
cd "$(dirname "$0")/.."
mkdir -p "$OUT/logs" "$OUT/tables" "$OUT/results"
if [[ $DATA == *.pkl ]]; then  # a packed ImageFolder ({relative path: bytes}), e.g. for a device copy
  $PY -c "import os, pickle, sys
d = pickle.load(open(sys.argv[1], 'rb'))
for k, v in d.items():
    os.makedirs(os.path.dirname(os.path.join(sys.argv[2], k)), exist_ok=True)
    open(os.path.join(sys.argv[2], k), 'wb').write(v)
print(len(d), 'images unpacked')" "$DATA" /tmp/hwslim_cifar10 && DATA=/tmp/hwslim_cifar10
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HWSLIM_TABLE_DIR=$OUT/tables

QUICK=()
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  QUICK=(--quick)  # a dry run of the script's own logic on the CPU: tiny trainings, GPU steps fail or skip
  echo "gpu_check: dry run on the CPU (GPU_CHECK_DRY=1)"
elif ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible here: skipping every GPU step (run this on an H100/H200)"
  exit 0
fi

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
# step NAME LIMIT_S CMD...: run with min(LIMIT_S, time left - 15 s); skip when under 20 s are left
step() {
  local name=$1 limit=$2; shift 2
  local l; l=$(( $(left) - 15 )); (( l < limit )) && limit=$l
  if (( limit < 20 )); then echo "SKIP $name (deadline)" | tee -a "$OUT/steps.txt"; return; fi
  echo "== $name (limit ${limit}s): $*"
  local s; s=$(date +%s); touch "$OUT/logs/.$name.start"
  timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a "$OUT/steps.txt"
  # keep this step's result files under its own name (a later step may rewrite the same file)
  find benchmarks/results -name '*.csv' -newer "$OUT/logs/.$name.start" -exec sh -c \
      'out=$0 n=$1; shift; for f; do cp "$f" "$out/results/${n}__$(basename "$f")"; done' "$OUT" "$name" {} + 2>/dev/null
  tail -n 25 "$OUT/logs/$name.log"
}

{ nvidia-smi; $PY -c "import torch, triton, onnxruntime; print('torch', torch.__version__, 'triton', triton.__version__, 'ort', onnxruntime.__version__, torch.cuda.get_device_name(0))"; nproc; uptime; } > "$OUT/logs/env.txt" 2>&1
head -n 20 "$OUT/logs/env.txt"

train_part() {
  # TRAIN_RUNS: "NAME:MODEL:WIDTH_MULT:EPOCHS ..." (EPOCHS "auto": a timed probe epoch fills TRAIN_BUDGET_S)
  local runs=${TRAIN_RUNS:-"r20x4:resnet20:4:auto r20x1:resnet20:1:auto mbv2:mobilenet_v2_cifar:1:auto"}
  local spec name model wm ep extra lim=$(( TRAIN_BUDGET_S + 150 ))
  for spec in $runs; do
    IFS=: read -r name model wm ep <<< "$spec"
    extra=(--budget-s "$TRAIN_BUDGET_S")
    [ "$ep" != auto ] && extra=(--epochs "$ep")
    local result=train_cifar10_${model}_x${wm}
    [ "$name" = r20x4 ] && result=train_cifar10  # the recipe's own run (issue 19's record)
    step "train_$name" "$lim" $PY benchmarks/train_cifar10.py --data "$DATA" --model "$model" --width-mult "$wm" \
        "${extra[@]}" --out "$OUT/run_$name" --name "$result" "${QUICK[@]}" &
  done
  sleep 20  # let the three decode their images first
  step pytest_gpu 300 $PY -m pytest -m gpu -q -p no:cacheprovider --timeout 240 -rs tests
  wait
  # compact copies: weights and graph only (the optimizer state is for resuming, not for assets)
  $PY - "$OUT" <<'EOF'
import glob, os, sys, torch
out = sys.argv[1]
for run in sorted(glob.glob(f"{out}/run_*")):
    tag = os.path.basename(run)[4:]
    try:
        p = torch.load(f"{run}/checkpoint.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # a run cut short leaves none
        print(f"{run}: no checkpoint ({e})")
        continue
    p.pop("training_state", None)
    name = f"cifar10_{tag}"
    if sum(v.numel() for v in p["state_dict"].values()) > 1_000_000:  # keep assets small (<= 5 MB)
        p["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in p["state_dict"].items()}
    torch.save(p, f"{out}/{name}.pt")
    print(f"{name}.pt written (epoch {p.get('epoch')})")
EOF
}

check_part() {
  step lut_r20_b1 110 $PY benchmarks/lut_accuracy.py --device cuda --backend torch --models resnet20 --batch 1 --random 30
  step kernel 200 $PY benchmarks/kernel.py --parts ceilings,step --step-batch 64 --dtypes fp32,bf16
  step lut_mbv2_b32 300 $PY benchmarks/lut_accuracy.py --device cuda --backend torch --models mobilenet_v2 --batch 32 --random 30
  step kernel_layers 90 $PY benchmarks/kernel.py --parts layers --dtypes fp32,bf16
}

case $PART in
  train) train_part ;;
  check) check_part ;;
  all) train_part; check_part ;;
  *) echo "unknown part $PART (train, check or all)"; exit 2 ;;
esac
for d in $(cd "$OUT" && ls -d run_* 2>/dev/null); do
  cp "$OUT/$d"/results.json "$OUT/logs/$d.results.json" 2>/dev/null && cp "$OUT/$d"/metrics.jsonl "$OUT/logs/$d.metrics.jsonl" 2>/dev/null
done
tar czf "$OUT/results_$PART.tgz" -C "$OUT" logs results tables steps.txt 2>/dev/null
echo "gpu_check $PART done in $(( $(date +%s) - START ))s"
cat "$OUT/steps.txt"
