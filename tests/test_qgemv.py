"""The quantized linears' Triton kernels (GEMV, skinny GEMM) through Triton's CPU interpreter, in a subprocess
(tests/triton_qgemv_cases.py); on the H200, benchmarks/quantize_gpu.py checks them compiled, in bf16."""

from pathlib import Path

import pytest
from _triton_interp import run_in_interpreter

pytest.importorskip("triton")
CASES = Path(__file__).with_name("triton_qgemv_cases.py")


def test_quantized_triton_kernels_in_the_interpreter():
    run_in_interpreter(CASES)
