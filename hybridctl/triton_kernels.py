"""hybridctl's own Triton kernels for the batch-1 decode step (and the quantized linears' dequantizing GEMV / skinny
GEMM, last section); imported only by kernels.py, and only where Triton
imports (CUDA machines). Each has a pure-PyTorch twin in ref.py with the same meaning.

- ``gemv``: y [1,N] = (rmsnorm(x) or act(x) or x) · Wᵀ (+ bias) (+ residual), x [1,K], one pass over W with no
  split-K. cuBLAS picks split-K kernels for the K-large decode products (out_proj, MLP down), which ran at 2.3 TB/s
  on an H200 plus a separate reduction kernel (benchmarks/generate_gpu.md). The RMSNorm is folded in by linearity
  (each program accumulates Σx² beside the product and scales by rstd at the end, so the normalised x is never
  rounded to bf16: at least as accurate as the norm-then-product of ref.linear), the MLP's activation is applied to
  x as it is loaded and the residual added in the epilogue: a norm kernel, an activation kernel and an add fewer
  per layer.
- ``decode_attention``: one query token per row against a preallocated KV cache with a key mask, split over the
  keys (flash-decoding) so a 16K cache is read by every SM, and blocks without a valid key are skipped (the unused
  tail of the cache costs nothing).

Both are registered as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` keeps them as opaque
calls and CUDA graphs capture them (no host synchronisation; they allocate only their outputs and scratch).
"""

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


# ---- GEMV -----------------------------------------------------------------------------------------------------------


@triton.jit
def _gemv_input(x_ptr, nw_ptr, offs, mask, ss, HAS_NORM: tl.constexpr, ACT: tl.constexpr, MASKED: tl.constexpr):
    """The GEMV prologue shared by _gemv_kernel and _qgemv_kernel: x's columns ``offs`` (fp32) as the product sees
    them. ACT: the MLP's activation on its hidden state (1 gelu, 2 relu²), rounded to the activation dtype as the
    unfused op's output; HAS_NORM: rmsnorm(x)·w = rstd · Σ W (x ⊙ norm_weight), so the raw sum of squares rides
    along in ``ss`` and the caller divides by rstd once at the end. MASKED: columns where ``mask`` is False read 0.
    Returns (x columns, ss)."""
    if MASKED:
        xk = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        xk = tl.load(x_ptr + offs).to(tl.float32)
    if ACT == 1:
        xk = (0.5 * xk * (1.0 + tl.math.erf(xk * 0.7071067811865476))).to(x_ptr.dtype.element_ty).to(tl.float32)
    elif ACT == 2:
        xk = tl.maximum(xk, 0.0)
        xk = (xk * xk).to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_NORM:
        ss += xk * xk
        if MASKED:
            xk = xk * tl.load(nw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            xk = xk * tl.load(nw_ptr + offs).to(tl.float32)
    return xk, ss


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, nw_ptr, y_ptr, N, K, stride_wn, eps,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    ss = tl.zeros((BLOCK_K,), tl.float32)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    for k0 in range(0, K, BLOCK_K):
        xk, ss = _gemv_input(x_ptr, nw_ptr, k0 + rk, k0 + rk < K, ss, HAS_NORM, ACT, not EVEN_K)
        if EVEN_N and EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=nmask[:, None] & (k0 + rk < K)[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * xk[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_NORM:
        y = y / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    if HAS_RES:  # as ref: the product rounded to the activation dtype, then the residual added
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


ACTIVATIONS = {None: 0, "gelu": 1, "relu2": 2}


def gemv_config(n: int, k: int, norm: bool = False, activation: Optional[str] = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an N×K weight, from a sweep of 48 configs over hybrid-1.3b's decode products
    on an H200, each with the work the step fuses into it (benchmarks/gemv_sweep.py; generate_gpu.md, run D). With
    the norm folded in, a short K block (the Σx² and norm-weight vectors cost registers: 2048 wide was 1.5× slower);
    with the activation, 8 rows and 8 warps; otherwise 4 rows × 2048 columns per step of a program, 4 warps. Each
    was within 0–7% of the best config of every shape it serves."""
    block_k = max(16, triton.next_power_of_2(k))
    if norm:
        return 8, min(256, block_k), 2
    if activation is not None:
        return 8, min(2048, block_k), 8
    return 4, min(2048, block_k), 4


def gemv_launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                norm_weight: Optional[Tensor], eps: float, out: Tensor,
                config: Optional[tuple[int, int, int]] = None, activation: Optional[str] = None) -> Tensor:
    """Launch the kernel into ``out`` [1,N] (x [1,K] contiguous, weight [N,K] with unit stride along K)."""
    n, k = weight.shape
    if norm_weight is not None and activation is not None:  # the norm is folded in by linearity: not under an act
        raise ValueError("gemv applies a norm or an activation to x, not both")
    block_n, block_k, warps = config or gemv_config(n, k, norm_weight is not None, activation)
    dummy = out
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, dummy if bias is None else bias, dummy if residual is None else residual,
        dummy if norm_weight is None else norm_weight, out, n, k, weight.stride(0), eps,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_NORM=norm_weight is not None,
        ACT=ACTIVATIONS[activation],
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0, num_warps=warps)
    return out


@torch.library.custom_op("hybridctl::gemv", mutates_args=())
def gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
         norm_weight: Optional[Tensor], eps: float, activation: Optional[str] = None) -> Tensor:
    """x [1,K] → [1,N]: act(x) or rmsnorm(x, norm_weight, eps) or x, · weightᵀ + bias + residual; act: None, "gelu"
    (erf) or "relu2"."""
    out = torch.empty(1, weight.shape[0], device=x.device, dtype=x.dtype)
    return gemv_launch(x.contiguous(), weight, None if bias is None else bias.contiguous(),
                       None if residual is None else residual.contiguous(),
                       None if norm_weight is None else norm_weight.contiguous(), eps, out, activation=activation)


@gemv.register_fake
def _(x, weight, bias, residual, norm_weight, eps, activation=None):
    return x.new_empty(1, weight.shape[0])


# ---- decode attention ---------------------------------------------------------------------------------------------


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, ml_ptr, S, split_len,
                        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                        stride_mb, scale, n_heads, n_splits,
                        REP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, DH: tl.constexpr):
    """Program (b, g, split): the REP query heads of KV group g against keys [split·split_len, +split_len).
    Writes the unnormalised output and (max, sum) of its softmax part, fp32, for _decode_attn_combine."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, DH)
    hmask = offs_h < REP
    heads = g * REP + offs_h
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, DH), tl.float32)
    start = sp * split_len
    stop = tl.minimum(start + split_len, S)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + g * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + g * stride_vh
    for s0 in range(start, stop, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = tl.load(mask_ptr + b * stride_mb + offs_s, mask=offs_s < stop, other=0) != 0
        if tl.max(valid.to(tl.int32), axis=0) > 0:  # a block of the cache no query may see is not read
            kk = tl.load(k_base + offs_s[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=valid[:, None],
                         other=0.0)
            s = tl.dot(q, tl.trans(kk)) * scale  # [BLOCK_H, BLOCK_S] fp32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vv = tl.load(v_base + offs_s[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=valid[:, None],
                         other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m_i = m_new
    row = (b * n_heads + heads) * n_splits + sp  # [BLOCK_H]
    tl.store(acc_ptr + row[:, None] * DH + offs_d[None, :], acc, mask=hmask[:, None])
    tl.store(ml_ptr + row * 2, m_i, mask=hmask)
    tl.store(ml_ptr + row * 2 + 1, l_i, mask=hmask)


@triton.jit
def _decode_attn_combine(acc_ptr, ml_ptr, out_ptr, n_splits, BLOCK_SP: tl.constexpr, DH: tl.constexpr):
    """Program (b·A + h): merge the splits' partial softmaxes; out [B,A,dh] in the query dtype."""
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK_SP)
    offs_d = tl.arange(0, DH)
    smask = offs < n_splits
    m = tl.load(ml_ptr + (r * n_splits + offs) * 2, mask=smask, other=float("-inf"))
    l_ = tl.load(ml_ptr + (r * n_splits + offs) * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_max)  # 0 for splits with no valid key
    acc = tl.load(acc_ptr + (r * n_splits + offs)[:, None] * DH + offs_d[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l_ * w, axis=0)
    den = tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + r * DH + offs_d, (num / den).to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1, the CPU tests): any small number
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention_splits(batch: int, n_kv: int, seqlen: int, block_s: int, sm_count: int) -> tuple[int, int]:
    """(number of splits, keys per split): about two programs per SM, each at least one key block."""
    want = max(1, (2 * sm_count) // max(1, batch * n_kv))
    split_len = max(block_s, triton.cdiv(triton.cdiv(seqlen, want), block_s) * block_s)
    return triton.cdiv(seqlen, split_len), split_len


@torch.library.custom_op("hybridctl::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """q [B,A,dh] (one token per row), k/v [B,S,KV,dh] caches, key_mask [B,S] bool → [B,A,dh]; head h reads KV group
    h // (A/KV); scale dh^-0.5."""
    bsz, n_heads, dh = q.shape
    seqlen, n_kv = k.shape[1], k.shape[2]
    rep = n_heads // n_kv
    block_s = 64
    n_splits, split_len = decode_attention_splits(bsz, n_kv, seqlen, block_s, _sm_count(q.device))
    acc = torch.empty(bsz * n_heads * n_splits, dh, device=q.device, dtype=torch.float32)
    ml = torch.empty(bsz * n_heads * n_splits, 2, device=q.device, dtype=torch.float32)
    q = q.contiguous()
    out = torch.empty_like(q)
    mask = key_mask.contiguous()
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    _decode_attn_kernel[(bsz, n_kv, n_splits)](
        q, k, v, mask, acc, ml, seqlen, split_len, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), 1.0 / math.sqrt(dh), n_heads, n_splits,
        REP=rep, BLOCK_H=max(16, triton.next_power_of_2(rep)), BLOCK_S=block_s, DH=dh, num_warps=4)
    _decode_attn_combine[(bsz * n_heads,)](acc, ml, out, n_splits, BLOCK_SP=triton.next_power_of_2(n_splits), DH=dh,
                                            num_warps=4)
    return out


@decode_attention.register_fake
def _(q, k, v, key_mask):
    return torch.empty_like(q)


# ---- quantized linears: dequantizing GEMV and skinny GEMM (qlinear.py's CUDA route) ----------------------------
#
# Triton dequantizing GEMV for the quantized linears' batch-1 decode on CUDA (qlinear.py); imported only where
# Triton imports. The weight bytes are what a decode step reads, so the kernels read the integers and dequantize in
# registers — int8 [N,K] (one byte a weight) or int4 packed two a byte [N,K/2] — and never materialise a float copy.
#
# - ``int8_gemv``: y[m, n] = scale[n] · Σ_k q[n,k] · x[m,k] (per-channel scale applied once per row at the end).
# - ``int4_gemv``: y[m, n] = Σ_groups scale[n, g] · Σ_{k∈g} q[n,k] · x[m,k], q = nibble − 8 (qlinear's layout: column
#   2j in the low nibble of byte j, 2j+1 in the high one). A K block never straddles a group (BLOCK_K divides the
#   group size), so each block's partial sum is scaled once by its group's scale.
#
# x [M,K] for small M (one program column per row); fp32 accumulation; output in x's dtype. Both are registered as
# ``torch.library`` custom ops (opaque to torch.compile, capturable by CUDA graphs). Their twins are qlinear's
# ``int8_mm_ref`` / ``int4_mm_ref`` (dequantize, then matmul).



_F32_MAGIC = 8388608.0  # 2^23: float bits 0x4B000000 | u (u < 2^23) are exactly 2^23 + u (no int-to-float unit)


@triton.jit
def _qgemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, res_ptr, nw_ptr, y_ptr, N, K, n_groups, stride_xm, stride_rm,
                  stride_ym, eps, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """One program: BLOCK_N outputs of row m = program_id(1). int8: acc += q·x over BLOCK_K columns a step, the
    channel scale once at the end. int4: each step is BLOCK_K / SUB_K sub-blocks of SUB_K columns inside one
    group (SUB_K divides GROUP), each byte's two nibbles against x's even / odd columns, scaled by the group's
    scale in registers. Integers become floats by bit pattern (_F32_MAGIC: or-ing u ∈ [0, 2^23) into 0x4B000000 gives
    the float 2^23 + u exactly; two ALU ops instead of the slower int-to-float unit). The norm / activation / bias / residual
    are those of the bf16 GEMV (the shared prologue _gemv_input)."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    x_row = x_ptr + m * stride_xm
    if BITS == 8:
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        ss = tl.zeros((BLOCK_K,), tl.float32)
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
        for k0 in range(0, K, BLOCK_K):
            xk, ss = _gemv_input(x_row, nw_ptr, k0 + rk, k0 + rk < K, ss, HAS_NORM, ACT, not EVEN_K)
            if EVEN_N and EVEN_K:
                q = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                q = tl.load(w_ptrs, mask=nmask[:, None] & (k0 + rk < K)[None, :], other=0,
                            eviction_policy="evict_first")
            acc += (((q.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0) * xk[None, :]
            w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    else:
        HALF: tl.constexpr = SUB_K // 2
        rj = tl.arange(0, HALF)
        acc = tl.zeros((BLOCK_N, HALF), tl.float32)
        ss = tl.zeros((HALF,), tl.float32)
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * (K // 2) + rj[None, :]
        s_ptrs = s_ptr + rn.to(tl.int64) * n_groups
        for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (the launcher's rule)
            for u in tl.static_range(BLOCK_K // SUB_K):
                kk = k0 + u * SUB_K
                xe, ss = _gemv_input(x_row, nw_ptr, kk + 2 * rj, None, ss, HAS_NORM, ACT, False)  # even columns
                xo, ss = _gemv_input(x_row, nw_ptr, kk + 2 * rj + 1, None, ss, HAS_NORM, ACT, False)  # odd ones
                if EVEN_N:
                    p = tl.load(w_ptrs + kk // 2, eviction_policy="evict_first")
                    s = tl.load(s_ptrs + kk // GROUP).to(tl.float32)
                else:
                    p = tl.load(w_ptrs + kk // 2, mask=nmask[:, None], other=0, eviction_policy="evict_first")
                    s = tl.load(s_ptrs + kk // GROUP, mask=nmask, other=0.0).to(tl.float32)
                p = p.to(tl.int32)
                lo = ((p & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                hi = ((p >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                acc += (lo * xe[None, :] + hi * xo[None, :]) * s[:, None]
        y = tl.sum(acc, axis=1)
    if HAS_NORM:
        y = y / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    if HAS_RES:  # as the twin: the product rounded to the activation dtype, then the residual added
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) \
            + tl.load(res_ptr + m * stride_rm + rn, mask=nmask, other=0.0).to(tl.float32)
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


# (bits, rows bucket) → (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the skinny GEMM, from the H200 sweep (benchmarks/
# quantize_gpu.py); buckets: 16 (≤ 16 rows), 64, 256.
QMM_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {  # H200 sweep (as QGEMV_CONFIGS), group 128
    (8, 16): (16, 32, 128, 4), (8, 64): (16, 32, 128, 4), (4, 16): (16, 32, 128, 4), (4, 64): (16, 32, 128, 4)}


def qmm_bucket(m: int) -> int:
    return 16 if m <= 16 else 64 if m <= 64 else 256


def qmm_launch(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int, out: Tensor,
               config: tuple[int, int, int, int] | None = None) -> Tensor:
    """x [M,K] → out [M,N] through _qmm_kernel; config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    n, k = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    m = x.shape[0]
    bm, bn, bk, warps = config or QMM_CONFIGS.get((bits, qmm_bucket(m))) or (
        max(16, min(64, triton.next_power_of_2(m))), 64, min(group_size, 64) if bits == 4 else 64, 4)
    if config is None and bits == 4:
        bk = math.gcd(bk, group_size)
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


# (bits, N, K, fused) → (BLOCK_N, BLOCK_K, num_warps); fused: "norm", "act", "res" or "" (what the product carries).
# Filled from the H200 sweep of benchmarks/quantize_gpu.py (``qgemv_sweep``); shapes not listed use the heuristic.
# H200, 2026-12-03, benchmarks/results/quantize_gpu_h200_fused.json (best of 6 candidates each).
QGEMV_CONFIGS: dict[tuple[int, int, int, str], tuple[int, int, int]] = {
    (8, 10304, 2048, "norm"): (16, 256, 4), (8, 8192, 2048, "norm"): (16, 256, 4),
    (8, 2048, 4096, "res"): (4, 1024, 4), (8, 2048, 8192, "act"): (8, 1024, 8),
    (4, 10304, 2048, "norm"): (8, 512, 4), (4, 8192, 2048, "norm"): (32, 256, 8),
    (4, 2048, 4096, "res"): (8, 1024, 8), (4, 2048, 8192, "act"): (8, 512, 4),
}


def qgemv_config(bits: int, n: int, k: int, group: int, fused: str = "") -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of the quantized GEMV: the sweep's pick for this shape, else 4 rows × 1024
    int8 columns (4 warps) / 8 rows × 512 int4 columns (4 warps), the K block cut to what K allows."""
    cfg = QGEMV_CONFIGS.get((bits, n, k, fused))
    if cfg is None:
        cfg = (4, 1024, 4) if bits == 8 else (8, 512, 4)
    return cfg[0], _fit_block_k(bits, k, group, cfg[1]), cfg[2]


def _fit_block_k(bits: int, k: int, group: int, block_k: int) -> int:
    """int8: a power of two ≤ next_pow2(K) (the tail masked); int4: a divisor of K that is a multiple of the group
    or a power of two dividing it."""
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    if bits == 8:
        return block_k
    while block_k > group and k % block_k:
        block_k //= 2
    if block_k <= group:
        block_k = math.gcd(block_k, group)
    return block_k


def int8_config(n: int, k: int) -> tuple[int, int, int]:
    return qgemv_config(8, n, k, 0)


def int4_config(n: int, k: int, group: int) -> tuple[int, int, int]:
    return qgemv_config(4, n, k, group)


def qgemv_launch(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int, out: Tensor, *,
                 bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 norm_weight: Optional[Tensor] = None, eps: float = 1e-5, activation: Optional[str] = None,
                 config: tuple[int, int, int] | None = None) -> Tensor:
    """out [M,N] = (rmsnorm(x) or act(x) or x) · dequant(W)ᵀ (+ bias) (+ residual) for small M. x [M,K] with unit
    stride along K, qweight int8 [N,K] / uint8 [N,K/2] contiguous, scales [N] / [N,K/g] contiguous, residual
    [M,N] with unit stride along N."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    if norm_weight is not None and activation is not None:
        raise ValueError("qgemv applies a norm or an activation to x, not both")
    fused = "norm" if norm_weight is not None else "act" if activation is not None else "res" if residual is not None \
        else ""
    block_n, block_k, warps = config or qgemv_config(bits, n, k, group_size, fused)
    if bits == 4:
        if k % group_size or (block_k <= group_size and group_size % block_k) \
                or (block_k > group_size and (block_k % group_size or k % block_k)):
            raise ValueError(f"int4 GEMV: BLOCK_K {block_k} must divide the group size {group_size} or be a "
                             f"multiple of it dividing K {k}")
    dummy = out
    _qgemv_kernel[(triton.cdiv(n, block_n), x.shape[0])](
        x, qweight, scales, dummy if bias is None else bias, dummy if residual is None else residual,
        dummy if norm_weight is None else norm_weight, out, n, k, max(1, k // max(group_size, 1)), x.stride(0),
        0 if residual is None else residual.stride(0), out.stride(0), eps,
        BITS=bits, GROUP=max(group_size, 1), HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        HAS_NORM=norm_weight is not None, ACT=ACTIVATIONS[activation], BLOCK_N=block_n, BLOCK_K=block_k,
        SUB_K=min(block_k, max(group_size, 1)), EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0, num_warps=warps)
    return out


def int8_gemv_launch(x: Tensor, qweight: Tensor, scales: Tensor, out: Tensor,
                     config: tuple[int, int, int] | None = None) -> Tensor:
    """x [M,K] (unit stride along K), qweight int8 [N,K] contiguous, scales [N] → out [M,N]."""
    return qgemv_launch(x, qweight, scales, 8, 0, out, config=config)


def int4_gemv_launch(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int, out: Tensor,
                     config: tuple[int, int, int] | None = None) -> Tensor:
    """x [M,K], qweight uint8 [N,K/2] contiguous, scales [N,K/g] contiguous → out [M,N]."""
    return qgemv_launch(x, qweight, scales, 4, group_size, out, config=config)


@torch.library.custom_op("hybridctl::qgemv", mutates_args=())
def qgemv(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int, bias: Optional[Tensor],
          residual: Optional[Tensor], norm_weight: Optional[Tensor], eps: float,
          activation: Optional[str] = None) -> Tensor:
    """x [M,K] (M small) → [M,N]: act(x) or rmsnorm(x, norm_weight, eps) or x, · dequant(W)ᵀ + bias + residual."""
    out = torch.empty(x.shape[0], qweight.shape[0], device=x.device, dtype=x.dtype)
    return qgemv_launch(x.contiguous(), qweight.contiguous(), scales.contiguous(), bits, group_size, out,
                        bias=None if bias is None else bias.contiguous(),
                        residual=None if residual is None else residual.contiguous(),
                        norm_weight=None if norm_weight is None else norm_weight.contiguous(), eps=eps,
                        activation=activation)


@qgemv.register_fake
def _(x, qweight, scales, bits, group_size, bias, residual, norm_weight, eps, activation=None):
    return x.new_empty(x.shape[0], qweight.shape[0])


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
