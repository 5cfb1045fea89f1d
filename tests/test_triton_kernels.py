"""hybridctl's own Triton decode kernels, checked on the CPU through Triton's interpreter (tests/triton_interp_cases.py
in a subprocess, since the interpreter must be on before the kernels are defined); on a GPU, tests/test_gpu.py
checks the compiled kernels and the decode step that uses them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
CASES = Path(__file__).with_name("triton_interp_cases.py")


def test_triton_kernels_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(CASES)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=CASES.parents[1])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
