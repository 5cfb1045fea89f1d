"""hybridctl's own Triton kernels for the batch-1 decode step; imported only by kernels.py, and only where Triton
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
        if EVEN_K:
            xk = tl.load(x_ptr + k0 + rk).to(tl.float32)
        else:
            xk = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        if ACT == 1:  # the MLP's activation on its hidden state, rounded to the activation dtype as F.gelu's output
            xk = (0.5 * xk * (1.0 + tl.math.erf(xk * 0.7071067811865476))).to(x_ptr.dtype.element_ty).to(tl.float32)
        elif ACT == 2:  # relu²
            xk = tl.maximum(xk, 0.0)
            xk = (xk * xk).to(x_ptr.dtype.element_ty).to(tl.float32)
        if HAS_NORM:  # rmsnorm(x)·w = rstd · Σ W (x ⊙ norm_weight): the sum of squares rides along in this loop
            ss += xk * xk
            if EVEN_K:
                xk = xk * tl.load(nw_ptr + k0 + rk).to(tl.float32)
            else:
                xk = xk * tl.load(nw_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
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
