"""hybridctl's own Triton decode kernels, checked on the CPU through Triton's interpreter (tests/triton_interp_cases.py
in a subprocess, since the interpreter must be on before the kernels are defined); on a GPU, tests/test_gpu.py
checks the compiled kernels and the decode step that uses them."""

from pathlib import Path

import pytest
from _triton_interp import run_in_interpreter

pytest.importorskip("triton")
CASES = Path(__file__).with_name("triton_interp_cases.py")


def test_triton_kernels_in_the_interpreter():
    run_in_interpreter(CASES)
