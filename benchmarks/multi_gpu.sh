#!/usr/bin/env bash
# Issue 7: the same recipe on 2 GPUs (torchrun + FSDP2) and on 1 GPU, with a kill and `--resume auto` on 2 GPUs and
# a 1-GPU `generate` from the 2-GPU export. Run from the repo root on a 2-GPU host (nvidia-h200-x2):
#   bash benchmarks/multi_gpu.sh            # results and logs under $OUT (or runs/multi_gpu)
set -uo pipefail
OUT=${OUT:-runs/multi_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0   # NVLink multicast off (device README)
STEPS=${STEPS:-24}; HALF=$((STEPS / 2))
R=${RECIPE:-recipes/hybrid-1.3b.toml}
SETS=(--set optim.tokens=none --set optim.steps=$STEPS --set optim.global_batch=16 --set optim.micro_batch=4 --set optim.warmup_steps=5
      --set checkpoint.interval=$HALF --set checkpoint.keep_last=2 --set logging.interval=1 --set logging.progress=false
      --set eval.interval=0 --set eval.batches=2 --set parallel.activation_checkpointing=false)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
rm -rf runs/g2 runs/g1

echo "== 2 GPUs: start, kill -9 once the step-$HALF checkpoint is published"
torchrun --nproc-per-node 2 -m hybridctl train $R "${SETS[@]}" --run-dir runs/g2 > "$OUT/g2_part1.log" 2>&1 &
PID=$!
for _ in $(seq 1 3000); do
  [ -e runs/g2/checkpoints/latest ] && break
  kill -0 $PID 2>/dev/null || break
  sleep 0.2
done
echo "published: $(cat runs/g2/checkpoints/latest 2>/dev/null); killing the run (SIGKILL to torchrun and its workers)"
pkill -9 -f "hybridctl train"; wait $PID 2>/dev/null; sleep 1
cp runs/g2/metrics.jsonl "$OUT/g2_metrics_before_kill.jsonl" 2>/dev/null

echo "== 2 GPUs: --resume auto"
timeout 400 torchrun --nproc-per-node 2 -m hybridctl train $R "${SETS[@]}" --run-dir runs/g2 --resume auto --json \
  > "$OUT/g2_resume.json" 2> "$OUT/g2_resume.log"; echo "rc=$?"
cp runs/g2/metrics.jsonl "$OUT/g2_metrics.jsonl"

echo "== 1 GPU, same recipe and tokens"
CUDA_VISIBLE_DEVICES=0 timeout 400 python -m hybridctl train $R "${SETS[@]}" --run-dir runs/g1 --json \
  > "$OUT/g1.json" 2> "$OUT/g1.log"; echo "rc=$?"
cp runs/g1/metrics.jsonl "$OUT/g1_metrics.jsonl"

echo "== 1-GPU generate from the 2-GPU export"
CUDA_VISIBLE_DEVICES=0 timeout 200 python -m hybridctl generate runs/g2/final --prompt "def main(" \
  --max-new-tokens 32 --json > "$OUT/generate.json" 2> "$OUT/generate.log"; echo "rc=$?"
tail -c 600 "$OUT/generate.json"

python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def rows(name):
    p = out / name
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
g1, g2 = rows("g1_metrics.jsonl"), rows("g2_metrics.jsonl")
l1 = {r["step"]: r["loss"] for r in g1 if "loss" in r and "step" in r}
l2 = {r["step"]: r["loss"] for r in g2 if "loss" in r and "step" in r}
print("step  loss(1 GPU)  loss(2 GPUs)")
for s in sorted(set(l1) | set(l2)):
    print(f"{s:>4}  {l1.get(s, float('nan')):>11.4f}  {l2.get(s, float('nan')):>12.4f}")
for name in ("g1.json", "g2_resume.json"):
    p = out / name
    if p.exists() and p.read_text().strip():
        try:
            print(name, json.dumps(json.loads(p.read_text()))[:900])
        except json.JSONDecodeError:
            print(name, p.read_text()[-400:])
PY
