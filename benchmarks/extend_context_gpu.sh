#!/usr/bin/env bash
# The H200 run of issue #17 (benchmarks/extend_context.md): a hybrid-130m and a pure Mamba-2 of equal size, each
# trained briefly at 4K, then extended to 16K and to 32K by `hybridctl extend-context` (a fresh process each time,
# always from the 4K base). ONE process on the GPU at a time, in the order that leaves the most useful results when
# the call is cut:  hyb base 4K -> hyb 4K->16K -> mam base 4K -> mam 4K->16K -> hyb 4K->32K -> mam 4K->32K.
# Every stage has its own timeout, clipped to a global DEADLINE (seconds from the start), and results.json is
# rebuilt after every stage (benchmarks/extend_context_gpu_report.py), so a cut call still returns what finished.
# The kernel backend (mamba_ssm's Triton SSD) comes from ../.whl (the script runs from a copy of the worktree at
# /work/main/.gpu-<name>/); without it the stages fall back to micro-batch 1 (the ref scan holds ~2x more).
# Micro-batches are explicit (not the plan's pick): 8 at 4K (recipe), MB1=4 at 16K, MB2=2 at 32K, no activation
# checkpointing: each ≈ 42 GiB (hybrid) / 60 GiB (Mamba-2) by model.training_memory, half of what the plan would
# choose, so even a 2x underestimate fits the 140 GiB card. Everything lands in $OUT (log.txt, results.json, plots).
#
#   OUT=$OUT bash benchmarks/extend_context_gpu.sh                 # the H200 sizes (~560 s; DEADLINE=560)
#   OUT=/tmp/o SMOKE=1 bash benchmarks/extend_context_gpu.sh       # CPU rehearsal: tiny, 256 -> 1024 / 2048
set -u
: "${OUT:?set OUT}"
W=${W:-/tmp/extgpu}
rm -rf "$W"; mkdir -p "$W" "$OUT"
t0=$(date +%s)
DEADLINE=${DEADLINE:-560}  # no stage runs past this many seconds from the start
RESERVE=${RESERVE:-12}     # kept for the last report
export PYTHONUNBUFFERED=1 HYBRIDCTL_DOC_ATTENTION=${HYBRIDCTL_DOC_ATTENTION:-segments}  # no FlexAttention compile
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$W/triton} TRITON_CACHE_AUTOTUNING=1  # JIT + autotune once per call
PY=${PY:-python3}
stamp() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/log.txt"; }
log() { sed -u "s/^/[$1] /" >> "$OUT/log.txt"; }
if [ "${SMOKE:-0}" = 1 ]; then  # tiny model, CPU
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    BASE=(--set model.preset=tiny --set data.seq_len=256 --set optim.micro_batch=4 --set optim.global_batch=4)
    MAMBA="MMMMMMMM"; L1=1024; L2=2048; E1=256,512,1024; E2=256,1024,2048; DEV=(--device cpu)
    BASE_STEPS=${BASE_STEPS:-6}; S1=${S1:-2}; S2=${S2:-2}; N=${N:-1}; MB1=${MB1:-2}; MB2=${MB2:-1}
    T0=${T0:-300}; T1=${T1:-400}; T2=${T2:-400}
else
    WHL=${WHL:-../.whl}; [ -d "$WHL" ] || WHL=.whl  # mamba_ssm (Triton-only) + zstandard wheels
    [ -d "$WHL" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHL"/*.whl 2>&1 | log pip
    export PYTHONPATH=/tmp/site:$PWD
    BASE=(); MAMBA="MMMMMMMMMMMMMMMMMM"; L1=16384; L2=32768; E1=4096,8192,16384; E2=4096,8192,16384,32768; DEV=()
    BASE_STEPS=${BASE_STEPS:-60}; S1=${S1:-16}; S2=${S2:-8}; N=${N:-2}; MB1=${MB1:-4}; MB2=${MB2:-2}
    T0=${T0:-150}; T1=${T1:-150}; T2=${T2:-120}
fi
H="$PY -m hybridctl"
stamp "start (SMOKE=${SMOKE:-0}, DEADLINE ${DEADLINE}s)"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import sys, torch
print("[env] torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(),
      "python", sys.version.split()[0])
from hybridctl import kernels
print("[env] backend", kernels.backend(), kernels.describe() if torch.cuda.is_available() else "")
try:
    import matplotlib; print("[env] matplotlib", matplotlib.__version__)
except ImportError:
    print("[env] matplotlib missing: no plots (results.json has every figure)")
EOF
if [ "${SMOKE:-0}" != 1 ] && ! grep -q "^\[env\] backend kernel" "$OUT/log.txt"; then
    MB1=1; MB2=1; stamp "WARNING: ref backend (no mamba_ssm): micro-batch 1 at $L1 and $L2"
fi
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}  # pass it: a copied tree may not know its commit
echo "[commit] $GIT_COMMIT" >> "$OUT/log.txt"
$PY benchmarks/stdlib_corpus.py "$W/corpus.jsonl" --max-mb 12 2>&1 | log corpus
stamp "corpus ready; stages: hyb base, hyb$L1, mam base, mam$L1, hyb$L2, mam$L2"

left() { echo $(( DEADLINE - RESERVE - ($(date +%s) - t0) )); }
budget() {  # stage timeout clipped to what is left; "" when under 20 s are left
    local t=$1 l; l=$(left); [ "$l" -lt "$t" ] && t=$l; [ "$t" -ge 20 ] && echo "$t"
}
report() { $PY benchmarks/extend_context_gpu_report.py "$W" "$OUT" 2>&1 | tee -a "$OUT/log.txt"; }

base() {  # name, extra --set...
    local name=$1 t; shift
    t=$(budget "$T0") || { stamp "$name skipped: deadline"; return; }
    stamp "$name: train at the base length, $BASE_STEPS steps (timeout ${t}s)"
    timeout -k 5 "$t" $H train -v benchmarks/extend_gpu_base.toml --run-dir "$W/$name" --json \
        --set data.source="$W/corpus.jsonl" --set optim.steps="$BASE_STEPS" "${BASE[@]}" "$@" "${DEV[@]}" \
        > "$W/$name.summary.json" 2> >(log "$name")
    echo "$?" > "$W/$name.rc"; stamp "$name: exit $(cat "$W/$name.rc")"; report
}
extend() {  # name, base dir, target, eval lengths, steps, timeout, micro-batch
    local t
    [ -f "$W/$2/final/config.json" ] || { stamp "$1 skipped: no base export"; return; }
    t=$(budget "$6") || { stamp "$1 skipped: deadline"; return; }
    stamp "$1: extend-context to $3, $5 steps, micro-batch $7 (timeout ${t}s)"
    timeout -k 5 "$t" $H extend-context -v "$W/$2/final" --data "$W/corpus.jsonl" --seq-len "$3" --out "$W/$1" \
        --steps "$5" --eval-lengths "$4" --eval-examples "$N" --set optim.micro_batch="$7" \
        --set parallel.activation_checkpointing=false --set checkpoint.interval=1000 "${DEV[@]}" --json \
        > "$W/$1.summary.json" 2> >(log "$1")
    echo "$?" > "$W/$1.rc"; stamp "$1: exit $(cat "$W/$1.rc")"; report
}
base hyb
extend hyb16 hyb "$L1" "$E1" "$S1" "$T1" "$MB1"
base mam --set model.pattern="$MAMBA"
extend mam16 mam "$L1" "$E1" "$S1" "$T1" "$MB1"
extend hyb32 hyb "$L2" "$E2" "$S2" "$T2" "$MB2"
extend mam32 mam "$L2" "$E2" "$S2" "$T2" "$MB2"
stamp "all done"
ls -la "$OUT" | tee -a "$OUT/log.txt"
