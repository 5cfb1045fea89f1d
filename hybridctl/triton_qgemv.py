"""Triton dequantizing GEMV for the quantized linears' batch-1 decode on CUDA (qlinear.py); imported only where
Triton imports. The weight bytes are what a decode step reads, so the kernels read the integers and dequantize in
registers — int8 [N,K] (one byte a weight) or int4 packed two a byte [N,K/2] — and never materialise a float copy.

- ``int8_gemv``: y[m, n] = scale[n] · Σ_k q[n,k] · x[m,k] (per-channel scale applied once per row at the end).
- ``int4_gemv``: y[m, n] = Σ_groups scale[n, g] · Σ_{k∈g} q[n,k] · x[m,k], q = nibble − 8 (qlinear's layout: column
  2j in the low nibble of byte j, 2j+1 in the high one). A K block never straddles a group (BLOCK_K divides the
  group size), so each block's partial sum is scaled once by its group's scale.

x [M,K] for small M (one program column per row); fp32 accumulation; output in x's dtype. Both are registered as
``torch.library`` custom ops (opaque to torch.compile, capturable by CUDA graphs). Their twins are qlinear's
``int8_mm_ref`` / ``int4_mm_ref`` (dequantize, then matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_ym,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    x_row = x_ptr + m * stride_xm
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xk = tl.load(x_row + k0 + rk).to(tl.float32)
            w = tl.load(w_ptrs, mask=nmask[:, None], other=0, eviction_policy="evict_first")
        else:
            kmask = k0 + rk < K
            xk = tl.load(x_row + k0 + rk, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * xk[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, n_groups, stride_xm, stride_ym,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    nmask = rn < N
    y = tl.zeros((BLOCK_N,), tl.float32)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * (K // 2) + rj[None, :]
    s_ptrs = s_ptr + rn.to(tl.int64) * n_groups
    x_row = x_ptr + m * stride_xm
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of GROUP, a multiple of BLOCK_K
        xe = tl.load(x_row + k0 + 2 * rj).to(tl.float32)
        xo = tl.load(x_row + k0 + 2 * rj + 1).to(tl.float32)
        p = tl.load(w_ptrs, mask=nmask[:, None], other=0, eviction_policy="evict_first").to(tl.int32)
        lo = ((p & 15) - 8).to(tl.float32)
        hi = ((p >> 4) - 8).to(tl.float32)
        part = tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)
        s = tl.load(s_ptrs + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
        y += part * s
        w_ptrs += HALF
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _qmm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, n_groups, stride_xm, stride_ym,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Skinny GEMM y [M,N] = x [M,K] · dequant(W)ᵀ for the decode step of a batch: each W tile is read once as
    integers, dequantized in registers to x's dtype (as the twin rounds it) and multiplied by tl.dot. int8: the
    per-row scale after the sum (K masked); int4: the group's scale on the tile (K a multiple of GROUP ⊇ BLOCK_K)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask, nmask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    if BITS == 8:
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    else:
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * (K // 2) + tl.arange(0, BLOCK_K // 2)[None, :]
    for k0 in range(0, K, BLOCK_K):
        kmask = k0 + rk < K
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        if BITS == 8:
            w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0).to(x_ptr.dtype.element_ty)
            w_ptrs += BLOCK_K
        else:
            p = tl.load(w_ptrs, mask=nmask[:, None], other=0).to(tl.int32)
            q = tl.reshape(tl.join((p & 15) - 8, (p >> 4) - 8), (BLOCK_N, BLOCK_K)).to(tl.float32)
            s = tl.load(s_ptr + rn.to(tl.int64) * n_groups + k0 // GROUP, mask=nmask, other=0.0)
            w = (q.to(s_ptr.dtype.element_ty) * s[:, None]).to(x_ptr.dtype.element_ty)
            w_ptrs += BLOCK_K // 2
        acc += tl.dot(x, tl.trans(w), out_dtype=tl.float32)
        x_ptrs += BLOCK_K
    if BITS == 8:
        acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def qmm_launch(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int, out: Tensor,
               config: tuple[int, int, int, int] | None = None) -> Tensor:
    """x [M,K] → out [M,N] through _qmm_kernel; config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    n, k = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    m = x.shape[0]
    bm, bn, bk, warps = config or (max(16, min(64, triton.next_power_of_2(m))), 64,
                                   min(group_size, 64) if bits == 4 else 64, 4)
    if bits == 4 and (group_size % bk or k % group_size):
        raise ValueError(f"int4 GEMM: BLOCK_K {bk} must divide the group size {group_size}, which divides K {k}")
    _qmm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, qweight, scales, out, m, n, k, max(1, k // max(group_size, 1)), x.stride(0), out.stride(0),
        BITS=bits, GROUP=max(group_size, 1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return out


@torch.library.custom_op("hybridctl::quant_mm", mutates_args=())
def quant_mm(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int) -> Tensor:
    out = torch.empty(x.shape[0], qweight.shape[0], device=x.device, dtype=x.dtype)
    return qmm_launch(x.contiguous(), qweight.contiguous(), scales.contiguous(), bits, group_size, out)


@quant_mm.register_fake
def _(x, qweight, scales, bits, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


def int8_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): 4 rows × up to 1024 int8 columns a step (the bf16 GEMV's 2048-wide row block
    of triton_kernels is the same bytes at half the width)."""
    return 4, min(1024, max(16, triton.next_power_of_2(k))), 4


def int4_config(n: int, k: int, group: int) -> tuple[int, int, int]:
    return 8, min(group, 128), 4


def int8_gemv_launch(x: Tensor, qweight: Tensor, scales: Tensor, out: Tensor,
                     config: tuple[int, int, int] | None = None) -> Tensor:
    """x [M,K] (unit stride along K), qweight int8 [N,K] contiguous, scales [N] → out [M,N]."""
    n, k = qweight.shape
    block_n, block_k, warps = config or int8_config(n, k)
    _int8_gemv_kernel[(triton.cdiv(n, block_n), x.shape[0])](
        x, qweight, scales, out, n, k, x.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, num_warps=warps)
    return out


def int4_gemv_launch(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int, out: Tensor,
                     config: tuple[int, int, int] | None = None) -> Tensor:
    """x [M,K], qweight uint8 [N,K/2] contiguous, scales [N,K/g] contiguous → out [M,N]."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    block_n, block_k, warps = config or int4_config(n, k, group_size)
    if group_size % block_k or k % group_size:
        raise ValueError(f"int4 GEMV: BLOCK_K {block_k} must divide the group size {group_size}, which divides K {k}")
    _int4_gemv_kernel[(triton.cdiv(n, block_n), x.shape[0])](
        x, qweight, scales, out, n, k, k // group_size, x.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out


@torch.library.custom_op("hybridctl::int8_gemv", mutates_args=())
def int8_gemv(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    out = torch.empty(x.shape[0], qweight.shape[0], device=x.device, dtype=x.dtype)
    return int8_gemv_launch(x.contiguous(), qweight.contiguous(), scales.contiguous(), out)


@int8_gemv.register_fake
def _(x, qweight, scales):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("hybridctl::int4_gemv", mutates_args=())
def int4_gemv(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int) -> Tensor:
    out = torch.empty(x.shape[0], qweight.shape[0], device=x.device, dtype=x.dtype)
    return int4_gemv_launch(x.contiguous(), qweight.contiguous(), scales.contiguous(), group_size, out)


@int4_gemv.register_fake
def _(x, qweight, scales, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])
