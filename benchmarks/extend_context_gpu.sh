#!/usr/bin/env bash
# The H200 run of issue #17 (benchmarks/extend_context.md): a hybrid-130m and a pure Mamba-2 of equal size, each
# trained briefly at 4K, then extended to 16K and to 32K by `hybridctl extend-context` (a fresh process each time).
# The two chains run side by side on the one GPU (two processes at every stage), each stage under its own timeout,
# so a cut stage still leaves the earlier ones' results. Everything lands in $OUT: log.txt (all stages, prefixed),
# results.json (every stage's report), plots of the 16K hybrid run.
#
#   OUT=/tmp/o bash benchmarks/extend_context_gpu.sh                       # the H200 sizes
#   OUT=/tmp/o SMOKE=1 bash benchmarks/extend_context_gpu.sh               # CPU rehearsal: tiny, 256 -> 1024 / 2048
set -u
: "${OUT:?set OUT}"
W=${W:-/tmp/extgpu}
rm -rf "$W"; mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 HYBRIDCTL_DOC_ATTENTION=${HYBRIDCTL_DOC_ATTENTION:-segments}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
MB1=${MB1:-4}; MB2=${MB2:-2}  # micro-batches at L1 / L2, fixed: two processes share the GPU's memory
PY=${PY:-python3}
H="$PY -m hybridctl"
if [ "${SMOKE:-0}" = 1 ]; then  # tiny model, CPU
    BASE=(--set model.preset=tiny --set data.seq_len=256 --set optim.micro_batch=4 --set optim.global_batch=4)
    MAMBA="MMMMMMMM"; L1=1024; L2=2048; E1=256,512,1024; E2=256,1024,2048
    BASE_STEPS=${BASE_STEPS:-6}; S1=${S1:-2}; S2=${S2:-2}; T0=${T0:-300}; T1=${T1:-400}; T2=${T2:-400}; N=2
else
    BASE=(); MAMBA="MMMMMMMMMMMMMMMMMM"; L1=16384; L2=32768; E1=4096,8192,16384; E2=4096,8192,16384,32768
    BASE_STEPS=${BASE_STEPS:-40}; S1=${S1:-8}; S2=${S2:-4}; T0=${T0:-55}; T1=${T1:-65}; T2=${T2:-65}; N=4
fi
log() { sed -u "s/^/[$1] /" >> "$OUT/log.txt"; }
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/log.txt"; }

$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), 'python', sys.version.split()[0])" 2>&1 | log env
$PY benchmarks/stdlib_corpus.py "$W/corpus.jsonl" --max-mb 12 2>&1 | log corpus
git rev-parse HEAD 2>/dev/null | log commit
stamp "start"

# stage 1: the two 4K bases, side by side
base() {  # name, extra --set...
    local name=$1; shift
    timeout "$T0" $H train -v benchmarks/extend_gpu_base.toml --run-dir "$W/$name" --set data.source="$W/corpus.jsonl" \
        --set optim.steps="$BASE_STEPS" "${BASE[@]}" "$@" 2>&1 | log "$name"
    cp "$W/$name/metrics.jsonl" "$W/$name.metrics.jsonl" 2>/dev/null
}
base hyb & base mam --set model.pattern="$MAMBA" & wait
stamp "bases done"

# stages 2 and 3: extend-context to L1, then L2, the two chains side by side
extend() {  # name, base dir, target, eval lengths, steps, timeout, micro-batch
    [ -f "$W/$2/final/config.json" ] || { echo "[$1] skipped: no base export" | tee -a "$OUT/log.txt"; return; }
    timeout "$6" $H extend-context -v "$W/$2/final" --data "$W/corpus.jsonl" --seq-len "$3" --out "$W/$1" --steps "$5" --eval-lengths "$4" \
        --eval-examples "$N" --set optim.micro_batch="$7" --json > "$W/$1.summary.json" 2> >(log "$1")
    echo "exit $?" | log "$1"
}
chain() {
    extend "${1}16" "$1" "$L1" "$E1" "$S1" "$T1" "$MB1"; stamp "${1} $L1 done"
    extend "${1}32" "$1" "$L2" "$E2" "$S2" "$T2" "$MB2"; stamp "${1} $L2 done"
}
chain hyb & chain mam & wait
stamp "all done"

# one results file: every stage's report (plan, train summary with tokens/s and peak memory, before/after eval)
$PY - "$W" "$OUT/results.json" <<'EOF'
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), {}
for name in ("hyb", "mam"):
    m = w / f"{name}.metrics.jsonl"
    out[name + "_base"] = [json.loads(x) for x in m.read_text().splitlines()] if m.is_file() else None
    for L in ("16", "32"):
        r = w / f"{name}{L}" / "report.json"
        out[name + L] = json.loads(r.read_text()) if r.is_file() else None
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
print("results:", {k: v is not None for k, v in out.items()})
EOF
cp "$W"/hyb16/plots/needle_heatmap.png "$OUT/" 2>/dev/null
cp "$W"/hyb16/plots/perplexity_by_position.png "$OUT/" 2>/dev/null
ls -la "$OUT"
