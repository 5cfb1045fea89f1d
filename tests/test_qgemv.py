"""The quantized linears' Triton kernels (GEMV, skinny GEMM) through Triton's CPU interpreter, in a subprocess
(tests/triton_qgemv_cases.py); on the H200, benchmarks/quantize_gpu.py checks them compiled, in bf16."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
CASES = Path(__file__).with_name("triton_qgemv_cases.py")


def test_quantized_triton_kernels_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(CASES)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=CASES.parents[1])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
