#!/usr/bin/env bash
# The paper reproductions in one device call (benchmarks/paper.md): decode speed-up hybrid vs Transformer (1.3B pair,
# then the 8B pair on a smaller grid while time is left), then the phonebook trio. Writes JSON, PNG and logs to $OUT.
#   on the lent H200, from the repo root:   bash benchmarks/paper_gpu.sh
#   CPU smoke test of the same steps:       SMOKE=1 OUT=/tmp/paper_out bash benchmarks/paper_gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/paper_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt" 2>&1
  D13="--pair hybrid-1.3b,transformer-1.3b --batches 1,4,16,64 --budget-s 65"
  D8="--pair hybrid-8b,transformer-8b --batches 1,8,32 --contexts 4096,32768,131072 --budget-s 30"
  PB="--budget-s 130 --eval-reserve-s 25"
else
  D13="--tiny --device cpu --batches 1,4 --contexts 256,1024 --fit-contexts 512 --steps 3 --budget-s 30"
  D8="--tiny --device cpu --batches 1 --contexts 256 --fit-contexts 256 --steps 2 --budget-s 10"
  PB="--tiny --device cpu --sizes 2,4 --eval-sizes 2,4 --eval-batches 1 --eval-batch 8 --budget-s 30 --calibrate 4 --log-every 5"
fi
python3 -c "import torch, sys; print(sys.version, torch.__version__, torch.cuda.is_available())" | tee "$OUT/env.txt"
timeout 95 python3 benchmarks/paper_decode.py $D13 --out "$OUT/paper_decode_1.3b.json" --plot "$OUT/paper_decode_1.3b.png" \
  2>&1 | tee "$OUT/decode.log"
timeout 55 python3 benchmarks/paper_decode.py $D8 --out "$OUT/paper_decode_8b.json" --plot "$OUT/paper_decode_8b.png" \
  2>&1 | tail -40 | tee -a "$OUT/decode.log"
timeout 160 python3 benchmarks/paper_phonebook.py $PB --out "$OUT/paper_phonebook.json" --plot "$OUT/paper_phonebook.png" \
  2>&1 | tee "$OUT/phonebook.log"
ls -la "$OUT"
