"""Machine probes the benchmarks divide by: achievable memory bandwidth (matrix-vector per implementation, a plain
streaming read, a device-to-device copy). The datasheet compute peak (``peak_flops``) stays in benchmarks/probes.py: it
reads hybridctl.train's table, a workflow above this layer.

- ``matvec_bandwidths`` / ``matvec_bandwidth``: bytes/s of y = W x over a matrix far larger than the caches (the rate
  a decode step streams weights — the CPU roofline's denominator).
- ``copy_bandwidth``: bytes/s of a device-to-device copy, read + write counted (the usual GPU roofline).
Importing this module needs no GPU; the probes run on whatever device they are given. ``bench`` runs
``matvec_bandwidth`` for its roofline column; benchmarks/probes.py re-exports this module for the scripts.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` (device synchronised around each)."""
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def matvec_bandwidths(device: torch.device, dtype: torch.dtype, mbytes: int = 512, repeats: int = 10
                      ) -> dict[str, float]:
    """Bytes/s of y = W x (W [rows, 4096], x [1, 4096]) over a matrix far larger than the caches, per way of computing
    it, plus ``read`` = W.sum() (a plain streaming read of the same bytes, for reference).

    ``F.linear`` is MKL's sgemv on the CPU, which streams at only about half of what the memory delivers on the
    2-core EPYC VMs; ``onednn`` (CPU fp32 only) is oneDNN's inner product on a weight reordered once
    (``mkldnn._reorder_linear_weight`` + ``mkldnn._linear_pointwise``, what Inductor's freezing pass and
    hybridctl's CPU fast path run), ``onednn_to_mkldnn`` the older mkldnn_linear with per-call to_mkldnn/to_dense."""
    esize = torch.empty((), dtype=dtype).element_size()
    rows = mbytes * 2**20 // (esize * 4096)
    w = torch.randn(rows, 4096, device=device, dtype=dtype)
    x = torch.randn(1, 4096, device=device, dtype=dtype)
    nbytes = w.numel() * esize
    out = {"F.linear": nbytes / best_time(device, lambda: torch.nn.functional.linear(x, w), repeats)}
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        out["onednn"] = nbytes / best_time(
            device, lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats)
        del packed
        wm = w.to_mkldnn()
        out["onednn_to_mkldnn"] = nbytes / best_time(
            device, lambda: torch._C._nn.mkldnn_linear(x.to_mkldnn(), wm, None).to_dense(), repeats)
        del wm
    out["read"] = nbytes / best_time(device, w.sum, repeats)
    return out


def matvec_bandwidth(device: torch.device, dtype: torch.dtype, mbytes: int = 512, repeats: int = 10) -> float:
    """Bytes/s of the fastest y = W x available here (``matvec_bandwidths`` without ``read``): the rate a decode
    step can stream weights, the roofline's denominator. On the GPU that is F.linear (cuBLAS gemv)."""
    bws = matvec_bandwidths(device, dtype, mbytes, repeats)
    return max(v for k, v in bws.items() if k != "read")


def copy_bandwidth(device: torch.device, mbytes: int = 1024, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the usual GPU bandwidth roofline."""
    a = torch.empty(mbytes * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / best_time(device, lambda: b.copy_(a), repeats)
