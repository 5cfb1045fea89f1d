#!/usr/bin/env bash
# Build the oracle venv (megatron-core 0.19 + a CUDA-less mamba_ssm) exactly per shared/docs/ORACLES.md.
# Usage: tests/oracles/make_venv.sh DIR   (prints nothing on success but pip's own -q output)
# Any failed step exits non-zero with one clear "oracle venv:" line, so CI fails instead of skipping.
set -uo pipefail
dir=${1:?usage: make_venv.sh DIR}
fail() { echo "oracle venv: $1 failed to install; the interop tests need it (see shared/docs/ORACLES.md)" >&2; exit 1; }
python3 -m venv "$dir" || fail "python venv"
py="$dir/bin/python"
"$py" -m pip install -q --upgrade pip || fail "pip"
"$py" -m pip install -q torch==2.13.0 || fail "torch==2.13.0"
"$py" -m pip install -q --no-deps --ignore-requires-python 'megatron-core==0.19.*' || fail "megatron-core 0.19"
"$py" -m pip install -q triton psutil einops numpy packaging safetensors || fail "triton/psutil/einops/numpy/packaging/safetensors"
# mamba_ssm imports huggingface_hub (Mamba2) and transformers (generation utils, save_pretrained helpers)
"$py" -m pip install -q huggingface_hub transformers || fail "huggingface_hub/transformers (for mamba_ssm)"
MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "$py" -m pip install -q --no-build-isolation --no-deps \
    mamba-ssm==2.3.2.post1 || fail "mamba-ssm 2.3.2.post1 (CPU build)"
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || fail "site-packages lookup"
: > "$site/selective_scan_cuda.py"   # the Mamba-1 CUDA extension mamba_ssm imports; Mamba-2 never calls it
"$py" -c 'import megatron.core, mamba_ssm, megatron.core.models.hybrid.hybrid_model' || fail "import check (megatron.core, mamba_ssm)"
