"""CPU weight-only matrix-vector kernels for the quantized linears (qlinear.py's CPU route at a few rows), in C.

PyTorch's weight-only CPU ops (``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``) have vectorised
paths for AVX-512 only; on an AVX2 machine (this project's 2-core EPYC) they run scalar code, 4–6× slower than
oneDNN's fp32 product at hybrid-130m's shapes (benchmarks/quantize.md), and an Inductor-compiled dequantize-matvec
keeps one accumulator a row (one FMA chain: latency-bound) and unpacks nibbles badly. These kernels read the
integers directly in qlinear's layout (int8 [N,K]; int4 two a byte [N,K/2] with per-group scales [N,K/g]) and keep
32 independent fp32 accumulators per row, a loop gcc vectorises for the machine it runs on (``-O3 -march=native``);
int4 reads x as its even / odd columns against the low / high nibbles and folds the −8 offset into the group's
Σx. Rows are split over the OpenMP threads of the process (the same libgomp as PyTorch's). fp32 x and scales only.

The C source is compiled once per machine into the cache directory (``HYBRIDCTL_CACHE_DIR`` or
``~/.cache/hybridctl``; a temp name renamed into place) and loaded with ctypes. Where there is no C compiler or the
build fails, ``available()`` is False (reason in ``error()``) and qlinear uses PyTorch's ops. The twins
(qlinear.int8_mm_ref / int4_mm_ref) are the tests' oracle.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("hybridctl.quantize")
Tensor = torch.Tensor

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>

#define ACC 32

void q8_gemv(const float* x, const int8_t* q, const float* s, float* y, int64_t M, int64_t N, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* qr = q + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xr = x + m * K;
            float acc[ACC] = {0};
            int64_t k = 0;
            for (; k + ACC <= K; k += ACC)
                for (int j = 0; j < ACC; j++) acc[j] += (float)qr[k + j] * xr[k + j];
            float t = 0.f;
            for (int j = 0; j < ACC; j++) t += acc[j];
            for (; k < K; k++) t += (float)qr[k] * xr[k];
            y[m * N + n] = t * s[n];
        }
    }
}

/* xs: per row m, [K/2 even columns | K/2 odd columns | K/G group sums] (q4_prepare). */
void q4_prepare(const float* x, float* xs, int64_t M, int64_t K, int64_t G) {
    int64_t H = K / 2, NG = K / G;
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        float* e = xs + m * (K + NG);
        for (int64_t j = 0; j < H; j++) { e[j] = xr[2 * j]; e[H + j] = xr[2 * j + 1]; }
        for (int64_t g = 0; g < NG; g++) {
            float t = 0.f;
            for (int64_t k = 0; k < G; k++) t += xr[g * G + k];
            e[K + g] = t;
        }
    }
}

void q4_gemv(const float* xs, const uint8_t* q, const float* s, float* y, int64_t M, int64_t N, int64_t K,
             int64_t G) {
    int64_t H = K / 2, NG = K / G, GB = G / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* qr = q + n * H;
        const float* sr = s + n * NG;
        for (int64_t m = 0; m < M; m++) {
            const float* xe = xs + m * (K + NG);
            const float* xo = xe + H;
            const float* gs = xe + K;
            float t = 0.f;
            for (int64_t g = 0; g < NG; g++) {
                float acc[32] = {0}, acc2[32] = {0};
                const uint8_t* qg = qr + g * GB;
                const float* eg = xe + g * GB;
                const float* og = xo + g * GB;
                int64_t b = 0;
                for (; b + 32 <= GB; b += 32)
                    for (int j = 0; j < 32; j++) {
                        int32_t p = qg[b + j];
                        acc[j] += (float)(p & 15) * eg[b + j];
                        acc2[j] += (float)(p >> 4) * og[b + j];
                    }
                for (; b < GB; b += 16)  /* group 32: 16 bytes */
                    for (int j = 0; j < 16; j++) {
                        int32_t p = qg[b + j];
                        acc[j] += (float)(p & 15) * eg[b + j];
                        acc2[j] += (float)(p >> 4) * og[b + j];
                    }
                float u = 0.f;
                for (int j = 0; j < 32; j++) u += acc[j] + acc2[j];
                t += sr[g] * (u - 8.f * gs[g]);
            }
            y[m * N + n] = t;
        }
    }
}
"""

_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("HYBRIDCTL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hybridctl")
    return Path(root) / "cpu_qkernels"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256((_SOURCE + " ".join(flags) + cc).encode()).hexdigest()[:16]
    d = _cache_dir()
    so = d / f"q_{key}.so"
    if not so.exists():
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src, out = Path(tmp) / "q.c", Path(tmp) / "q.so"
            src.write_text(_SOURCE)
            run = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True,
                                 timeout=120)
            if run.returncode != 0:
                raise RuntimeError(f"{cc} failed: {run.stderr.strip().splitlines()[-1] if run.stderr else ''}")
            os.replace(out, so)
    lib = ctypes.CDLL(str(so))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.q8_gemv.argtypes = [p, p, p, p, i64, i64, i64]
    lib.q4_prepare.argtypes = [p, p, i64, i64, i64]
    lib.q4_gemv.argtypes = [p, p, p, p, i64, i64, i64, i64]
    for f in (lib.q8_gemv, lib.q4_prepare, lib.q4_gemv):
        f.restype = None
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _error, _tried
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except Exception as e:  # noqa: BLE001 - no compiler / a failed build: PyTorch's ops instead
            _error = f"{type(e).__name__}: {str(e)[:300]}"
            log.info("quantized CPU kernels unavailable (%s); using PyTorch's weight-only ops", _error)
    return _lib


def available() -> bool:
    return _load() is not None


def error() -> str | None:
    _load()
    return _error


def usable(x: Tensor, *tensors: Tensor) -> bool:
    """fp32 contiguous CPU x and fp32 scales (the kernels' only dtype), and the library built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and all(
        t.device.type == "cpu" and t.is_contiguous() for t in tensors) and available()


def int8_gemv(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [M,K] fp32 → [M,N]: x · (qweight · scales[:, None])ᵀ; qweight int8 [N,K], scales fp32 [N]."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    _lib.q8_gemv(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), m, n, k)
    return y


def int4_gemv(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """x [M,K] fp32 → [M,N] against qlinear's int4 layout (qweight uint8 [N,K/2], scales fp32 [N,K/g]); the group
    size must be a multiple of 32."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    xs = torch.empty(m, k + k // group_size, dtype=torch.float32)
    _lib.q4_prepare(x.data_ptr(), xs.data_ptr(), m, k, group_size)
    y = torch.empty(m, n, dtype=torch.float32)
    _lib.q4_gemv(xs.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(), m, n, k, group_size)
    return y
