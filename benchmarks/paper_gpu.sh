#!/usr/bin/env bash
# The paper reproductions in one device call (benchmarks/paper.md), in priority order, each part under its own timeout:
#   1. bench vs generate agreement: `hybridctl bench` and `hybridctl generate --json` back to back on one hybrid-1.3b
#      bf16 checkpoint (batch 1, 1024-token prompt, 128 new tokens);
#   2. phonebook: three equal-size models trained on the same batches (benchmarks/paper_phonebook.py), then
#      `hybridctl bench --no-speed --task phonebook` on the three exported checkpoints;
#   3. decode speed-up: the hybrid-1.3b side of the grid (paper_decode.py --reuse the Transformer's earlier rows).
#   on the lent H200, from the repo root:   bash benchmarks/paper_gpu.sh
#   CPU smoke test of the same steps:       SMOKE=1 OUT=/tmp/paper_out bash benchmarks/paper_gpu.sh
#   only some parts:                        PARTS=2 PB_BUDGET=440 bash benchmarks/paper_gpu.sh
#   (PB_BUDGET: the phonebook's seconds of training + export + evaluation; PB_SET: extra `--set` overrides for
#   the three recipes, e.g. PB_SET="data.task_options.n_entries=12"; PB_LENGTHS: the bench's phonebook lengths;
#   PB_ARGS: more paper_phonebook.py flags, e.g. PB_ARGS="--curriculum 2:250,4:400")
set -uo pipefail
OUT=${OUT:-/tmp/paper_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
W=${WORK:-/tmp/paper_work}; mkdir -p "$W"
HC="python3 -m hybridctl"
if [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt" 2>&1
  PRESET=hybrid-1.3b; PROMPT=1023; NEW=128; DEV=""
  PB="--budget-s ${PB_BUDGET:-75} --eval-reserve-s 20 --producers 12"; PBL="${PB_LENGTHS:-640,1024,1536}"; PBS=8
  D13="--pair hybrid-1.3b,transformer-1.3b --batches 1,4,16,64 --fit-contexts= --budget-s 40"
else
  PRESET=tiny; PROMPT=100; NEW=16; DEV="--device cpu"
  PB="--device cpu --tiny --budget-s 30 --eval-reserve-s 10 --producers 1 --calibrate 4 --log-every 5 --eval-sizes 1,4
      --eval-batches 1 --eval-batch 4 --max-steps 8"; PBL="640"; PBS=1
  D13="--tiny --device cpu --batches 1 --contexts 256 --fit-contexts= --steps 2 --budget-s 10"
fi
python3 -c "import torch, sys; print(sys.version, torch.__version__, torch.cuda.is_available())" | tee "$OUT/env.txt"
PARTS=${PARTS:-123}; PBT=$(( ${PB_BUDGET:-75} + 65 )); [ -n "${SMOKE:-}" ] && PBT=140
for o in ${PB_SET:-}; do PB="$PB --set $o"; done; PB="$PB ${PB_ARGS:-}"  # PB_ARGS: more driver flags
if [[ $PARTS == *1* ]]; then
echo "== part 1: bench vs generate ($(date -u +%T))"
$HC build --preset $PRESET --dtype bfloat16 -o "$W/ckpt" --json > "$OUT/build.json" 2> "$OUT/build.err"; echo "build rc $?"
python3 -c "print('a' * $PROMPT, end='')" > "$W/prompt.txt"   # + BOS = PROMPT + 1 tokens (byte tokenizer)
timeout 170 $HC bench "$W/ckpt" $DEV --batch 1 --prompt-len $((PROMPT + 1)) --new-tokens $NEW --json \
  > "$OUT/bench_1.3b.json" 2> "$OUT/bench_1.3b.err"; echo "bench rc $? ($(date -u +%T))"
timeout 90 $HC generate "$W/ckpt" $DEV --prompt-file "$W/prompt.txt" --max-new-tokens $NEW --ignore-eos --json \
  > "$OUT/generate_1.3b.json" 2> "$OUT/generate_1.3b.err"; echo "generate rc $? ($(date -u +%T))"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
try:
    b = json.load(open(f"{out}/bench_1.3b.json")); g = json.load(open(f"{out}/generate_1.3b.json"))
    def find(o, key):  # the first value under ``key`` anywhere in a JSON object
        if isinstance(o, dict):
            if key in o:
                return o[key]
            o = list(o.values())
        if isinstance(o, list):
            for v in o:
                if (r := find(v, key)) is not None:
                    return r
        return None
    bt, gt = find(b, "decode_tokens_per_s")["mean"], find(g, "decode_tokens_per_s")
    print(f"bench decode {bt:.1f} tok/s (plan {find(b, 'mode')}), generate decode {gt:.1f} tok/s "
          f"(mode {find(g, 'mode')}), ratio bench/generate {bt / gt:.4f}")
except Exception as e:  # the raw files are in $OUT either way
    print("agreement: could not compare:", type(e).__name__, e)
PY
fi
if [[ $PARTS == *2* ]]; then
echo "== part 2: phonebook ($(date -u +%T))"
rm -f "$W/ckpt"/*.safetensors
timeout $PBT python3 benchmarks/paper_phonebook.py $PB --out-dir "$W/pb" 2>&1 | tee "$OUT/phonebook.log"
cp "$W/pb/paper_phonebook.json" "$W/pb/paper_phonebook.png" "$OUT/" 2>/dev/null
timeout 60 $HC bench "$W/pb/hybrid/final" "$W/pb/mamba2/final" "$W/pb/transformer/final" $DEV --no-speed \
  --task phonebook --lengths $PBL --samples $PBS --json --plot "$OUT/pb_plots" > "$OUT/bench_phonebook.json" \
  2> "$OUT/bench_phonebook.err"; echo "bench phonebook rc $? ($(date -u +%T))"
fi
if [[ $PARTS == *3* ]]; then
echo "== part 3: hybrid decode grid ($(date -u +%T))"
timeout 70 python3 benchmarks/paper_decode.py $D13 --reuse benchmarks/results/paper_decode_h200.json \
  --out "$OUT/paper_decode_1.3b.json" --plot "$OUT/paper_decode_1.3b.png" 2>&1 | tee "$OUT/decode.log"
fi
echo "== done ($(date -u +%T))"; ls -la "$OUT"
