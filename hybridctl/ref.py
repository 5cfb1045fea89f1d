"""Pure-PyTorch twins of every kernel: the CPU path and the test oracle.

Letters (the SSD paper's): B batch, T seqlen, Q chunk, C number of chunks, H heads, P headdim, G groups, N d_state,
K conv width, S key length. Heads are contiguous per group: head h reads group h // (H // G).

Every function here has the same signature as its dispatcher in kernels.py. Maths runs in float32 at least (float64
inputs stay float64, which is how the tests build their exact references).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def process_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]) -> Tensor:
    """dt → softplus(dt + dt_bias), clamped to dt_limit (both optional), in the compute dtype."""
    dt = dt.to(_compute_dtype(dt.dtype))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi != math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _segsum(x: Tensor) -> Tensor:
    """x [..., Q] → [..., Q, Q] with out[i, j] = sum(x[j+1..i]) for i >= j, -inf above the diagonal.

    Built by a masked cumulative sum rather than cumsum differences, which lose precision for long chunks.
    """
    q = x.shape[-1]
    x = x[..., None].expand(*x.shape, q)  # [..., Q(i), Q(j)] holding x[i]
    strict = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict, 0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device))
    return out.masked_fill(~keep, -math.inf)


def _chunk_views(q: int, seq_idx: Tensor, xs: Tensor, dt: Tensor, Bs: Tensor, Cs: Tensor) -> tuple[Tensor, ...]:
    """Pad the time axis to a multiple of the chunk size q and view it as [B,C,Q,...] (B/C stay per group until the
    contraction with x). Returns the padded seq_idx [B,T'] and the views of x, dt, B, C and seq_idx."""
    bsz, seqlen, nheads, headdim = xs.shape
    ngroups, dstate = Bs.shape[2], Bs.shape[3]
    pad = (-seqlen) % q
    if pad:  # dt = 0 on padding: decay 1, input 0, so the state passes through unchanged
        xs = F.pad(xs, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bs = F.pad(Bs, (0, 0, 0, 0, 0, pad))
        Cs = F.pad(Cs, (0, 0, 0, 0, 0, pad))
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(bsz, pad)], dim=1)
    nc = xs.shape[1] // q
    return (seq_idx, xs.view(bsz, nc, q, nheads, headdim), dt.view(bsz, nc, q, nheads),
            Bs.view(bsz, nc, q, ngroups, dstate), Cs.view(bsz, nc, q, ngroups, dstate), seq_idx.view(bsz, nc, q))


def _pass_states(state: Tensor, chunk_states: Tensor, chunk_decay: Tensor, carry: Tensor) -> tuple[Tensor, Tensor]:
    """The sequential pass between chunks: the state entering each chunk [B,C,H,P,N] and the final state [B,H,P,N].
    A state survives a chunk (decayed by exp(sum A·dt)) only where carry is 1 (the document does not change)."""
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(state)
        state = state * (chunk_decay[:, c] * carry[:, c, None])[..., None, None] + chunk_states[:, c]
    return torch.stack(entering, dim=1), state


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, *, D: Tensor | None = None,
             dt_bias: Tensor | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = (0.0, math.inf), initial_state: Tensor | None = None,
             seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan of any length.

    x [B,T,H,P], dt [B,T,H] (raw; processed by dt_bias/softplus/limit), A [H] (negative), B/C [B,T,G,N], D [H],
    initial_state [B,H,P,N], seq_idx [B,T] int (non-decreasing document ids: the state is reset where it changes; the
    initial state belongs to the row's first document).
    Recurrence: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ;  y_t = h_t C_t + D x_t.
    Returns y [B,T,H,P] in x's dtype and the final state [B,H,P,N] in the compute dtype (fp32, or fp64 for fp64 in).
    """
    bsz, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    cd = _compute_dtype(x.dtype)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    q = chunk_size
    if seq_idx is None:
        seq_idx = torch.zeros(bsz, seqlen, dtype=torch.int32, device=x.device)
    seq_idx, xs, dts, Bs, Cs, sidx = _chunk_views(q, seq_idx, x.to(cd), dt, B.to(cd), C.to(cd))
    nc = xs.shape[1]
    rep = nheads // ngroups
    A_dt = (dts * A.to(cd)).permute(0, 3, 1, 2)  # [B,H,C,Q]
    A_cum = torch.cumsum(A_dt, dim=-1)
    xdt = xs * dts[..., None]  # [B,C,Q,H,P]

    # 1. within each chunk (the quadratic, attention-like form), masked to the same document.
    same_doc = sidx[..., :, None] == sidx[..., None, :]  # [B,C,Q(l),Q(s)]
    L = torch.exp(_segsum(A_dt))  # [B,H,C,Q,Q]
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cs, Bs).repeat_interleave(rep, dim=2)  # [B,C,H,Q,Q]
    scores = CB * L.permute(0, 2, 1, 3, 4) * same_doc[:, :, None]
    y = torch.einsum("bchls,bcshp->bclhp", scores, xdt)

    # 2. each chunk's own contribution to the state at its end (only tokens of the chunk's last document).
    last_doc = sidx[..., -1:]  # [B,C,1]
    # exp(sum of A·dt after s up to the chunk end) = the last row of L: exactly 0 weight for masked pairs' gradients
    decay_to_end = L[..., -1, :].permute(0, 2, 3, 1)  # [B,C,Q,H]
    w = decay_to_end * (sidx == last_doc)[..., None]
    Bh = Bs.repeat_interleave(rep, dim=3)  # [B,C,Q,H,N]
    chunk_states = torch.einsum("bclhn,bclh,bclhp->bchpn", Bh, w, xdt)

    # 3. pass states between chunks; a state survives a chunk only if the document does not change in it.
    state = (initial_state.to(cd) if initial_state is not None
             else torch.zeros(bsz, nheads, headdim, dstate, dtype=cd, device=x.device))
    enter_doc = torch.cat([seq_idx[:, :1], seq_idx[:, q - 1:-1:q]], dim=1)  # [B,C] doc of the entering state
    chunk_decay = torch.exp(A_cum[..., -1]).permute(0, 2, 1)  # [B,C,H]
    carry = (last_doc[..., 0] == enter_doc).to(cd)  # [B,C]
    prev, state = _pass_states(state, chunk_states, chunk_decay, carry)  # prev [B,C,H,P,N]: entering states

    # 4. the entering state's contribution to each position (same document as the entering state only).
    Ch = Cs.repeat_interleave(rep, dim=3)  # [B,C,Q,H,N]
    decay_in = torch.exp(A_cum).permute(0, 2, 3, 1) * (sidx == enter_doc[..., None])[..., None]  # [B,C,Q,H]
    y = y + torch.einsum("bclhn,bchpn,bclh->bclhp", Ch, prev, decay_in)

    y = y.reshape(bsz, nc * q, nheads, headdim)[:, :seqlen]
    if D is not None:
        y = y + x.to(cd) * D.to(cd)[:, None]
    return y.to(x.dtype), state


def ssm_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
             dt_bias: Tensor | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = (0.0, math.inf)) -> Tensor:
    """One recurrent step, updating ``state`` in place.

    state [B,H,P,N] (fp32 by default), x [B,H,P], dt [B,H] (raw), A [H], B/C [B,G,N], D [H] → y [B,H,P] in x's dtype.
    An fp32/fp64 contiguous state is updated truly in place (no [B,H,P,N] temporaries); the heads of a group are one
    [rep·P, N] matrix, so B/C are never repeated per head (three passes over the state instead of about six).
    """
    if torch.compiler.is_compiling():
        return ssm_step_pointwise(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                  dt_limit=dt_limit)
    cd = torch.float64 if state.dtype == torch.float64 else torch.float32
    bsz, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(cd)  # [B,H]
    xc = x.to(cd)
    s = state if (state.dtype == cd and state.is_contiguous()) else state.to(cd).contiguous()
    s.mul_(torch.exp(dt * A.to(cd))[..., None, None])
    grouped = s.view(bsz * ngroups, nheads // ngroups * headdim, dstate)  # heads are contiguous per group
    grouped.baddbmm_((xc * dt[..., None]).reshape(bsz * ngroups, -1, 1), B.to(cd).reshape(bsz * ngroups, 1, dstate))
    # y = state · C as a row-vector product (a batched GEMM with one output row: much faster on CPU than one column)
    y = torch.bmm(C.to(cd).reshape(bsz * ngroups, 1, dstate), grouped.transpose(1, 2)).view(bsz, nheads, headdim)
    if s is not state:
        state.copy_(s)
    if D is not None:
        y = y + xc * D.to(cd)[:, None]
    return y.to(x.dtype)


def ssm_step_pointwise(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                       D: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                       dt_limit: tuple[float, float] = (0.0, math.inf)) -> Tensor:
    """``ssm_step`` written as one broadcast expression and one reduction over N, for ``torch.compile``: Inductor
    fuses the decay, the rank-1 update, the write-back and the read-out into a single pass over the state (the
    batched products of the eager form would be separate library calls with a temporary state). Same maths and
    arguments as ``ssm_step``; ``ssm_step`` takes this form by itself while being compiled."""
    cd = torch.float64 if state.dtype == torch.float64 else torch.float32
    bsz, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    rep = nheads // ngroups  # heads are contiguous per group: head h reads group h // rep
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(cd)  # [B,H]
    xc = x.to(cd)
    Bh = B.to(cd)[:, :, None].expand(bsz, ngroups, rep, dstate).reshape(bsz, nheads, 1, dstate)
    Ch = C.to(cd)[:, :, None].expand(bsz, ngroups, rep, dstate).reshape(bsz, nheads, 1, dstate)
    new = state.to(cd) * torch.exp(dt * A.to(cd))[..., None, None] + (xc * dt[..., None])[..., None] * Bh
    state.copy_(new)
    y = (new * Ch).sum(-1)  # [B,H,P]
    if D is not None:
        y = y + xc * D.to(cd)[:, None]
    return y.to(x.dtype)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, initial_state: Tensor | None = None,
                  seq_idx: Tensor | None = None, activation: str | None = "silu") -> Tensor:
    """Causal depthwise conv along time. x [B,T,Ch], weight [Ch,K], bias [Ch], initial_state [B,Ch,K] (the last K
    inputs before x; only the last K-1 are used), seq_idx [B,T]: taps never reach into another document.

    Without seq_idx one dense F.conv1d; with it, on CUDA or under compile, K shifted products whose taps are masked to
    the output token's own document (``_document_conv``: static shapes, fuses); in eager CPU code the dense conv with
    the windows that cross a document start recomputed (``_recompute_document_starts``: 4× cheaper there, one host
    sync). Either way neither values nor gradients mix documents. CUDA runs in the input dtype (as mamba_ssm's torch
    fallback does).
    """
    bsz, seqlen, ch = x.shape
    k = weight.shape[-1]
    cd = x.dtype if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else _compute_dtype(x.dtype)
    xc, w = x.to(cd), weight.to(cd)
    prev = (initial_state[:, :, 1:].to(cd) if initial_state is not None
            else xc.new_zeros(bsz, ch, k - 1))
    if seq_idx is not None and (xc.is_cuda or torch.compiler.is_compiling()):
        out = _document_conv(torch.cat([prev.transpose(1, 2), xc], dim=1), w, seq_idx)
    else:
        xp = torch.cat([prev, xc.transpose(1, 2)], dim=2)  # [B,Ch,K-1+T]
        out = F.conv1d(xp, w[:, None], None, groups=ch).transpose(1, 2)  # [B,T,Ch]
        if seq_idx is not None:  # eager CPU: the dense conv, then the few windows that cross a document start
            out = _recompute_document_starts(out, xc, w, seq_idx)
    if bias is not None:
        out = out + bias.to(cd)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


def _document_conv(xp: Tensor, w: Tensor, seq_idx: Tensor) -> Tensor:
    """The causal conv of xp [B,K-1+T,Ch] (K-1 initial inputs, then the row) with each tap masked to the output
    token's own document: out[t] = Σ_i xp[t+i]·w[:, i]·[doc(t+i-K+1) == doc(t)]. The K-1 initial inputs count as the
    row's first document (the continuing state belongs to it). Static shapes and no host sync, so it compiles into
    one fused kernel inside a block; a masked tap contributes exactly zero value and zero gradient. Half-precision
    inputs accumulate in fp32 (as a conv kernel does)."""
    k = w.shape[-1]
    seqlen = xp.shape[1] - (k - 1)
    acc = torch.float32 if xp.dtype in (torch.float16, torch.bfloat16) else xp.dtype
    xa, wa = xp.to(acc), w.to(acc)
    sid = torch.cat([seq_idx[:, :1].expand(-1, k - 1), seq_idx], dim=1)  # [B,K-1+T]
    out = xa[:, k - 1:] * wa[:, k - 1]  # the token's own tap: always inside its document
    for i in range(k - 1):
        same = (sid[:, i:i + seqlen] == seq_idx).to(acc)[..., None]
        out = out + xa[:, i:i + seqlen] * wa[:, i] * same
    return out.to(xp.dtype)


def _recompute_document_starts(out: Tensor, x: Tensor, w: Tensor, seq_idx: Tensor) -> Tensor:
    """out [B,T,Ch] of the dense conv, with out[b, t] replaced, for every t whose K-wide window crosses a document
    start inside the row, by the taps of t's own document. Such a t follows a start inside the row, so its window
    never needs the initial state (which belongs to the row's first document): taps before position 0 are dropped."""
    k = w.shape[-1]
    starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=False)  # [B,T] a new document begins
    affected = starts.clone()
    for j in range(1, k - 1):
        affected[:, j:] |= starts[:, :-j]
    b_idx, t_idx = affected.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return out
    vals = x[b_idx, t_idx] * w[:, k - 1]
    for j in range(1, k):
        src = t_idx - j
        ok = (src >= 0) & (seq_idx[b_idx, src.clamp(min=0)] == seq_idx[b_idx, t_idx])
        vals = vals + x[b_idx, src.clamp(min=0)] * w[:, k - 1 - j] * ok[:, None]
    return out.index_put((b_idx, t_idx), vals.to(out.dtype))  # autocast: the conv ran in bf16, x is fp32


def conv_step(conv_state: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
              activation: str | None = "silu") -> Tensor:
    """One conv step, updating ``conv_state`` [B,Ch,K] in place (roll left, append x [B,Ch]) → y [B,Ch]."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    cd = _compute_dtype(x.dtype)
    out = (conv_state.to(cd) * weight.to(cd)).sum(-1)
    if bias is not None:
        out = out + bias.to(cd)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, computed in fp32."""
    cd = _compute_dtype(x.dtype)
    xc = x.to(cd)
    xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return (xc * weight.to(cd)).to(x.dtype)


def rmsnorm_gated(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """Grouped gated RMSNorm, normalising after gating: norm_g(x · silu(z)) · weight. x, z [..., D]."""
    cd = _compute_dtype(x.dtype)
    y = x.to(cd) * F.silu(z.to(cd))
    shape = y.shape
    y = y.view(*shape[:-1], shape[-1] // group_size, group_size)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y.view(shape) * weight.to(cd)).to(x.dtype)


def attention_mask(q_len: int, k_len: int, *, offset: int, device: torch.device, seq_idx: Tensor | None = None,
                   key_valid: Tensor | None = None) -> Tensor | None:
    """Boolean mask [B or 1, 1, Tq, S] (True = attend): causal with the queries at positions offset..offset+Tq-1,
    the same document (seq_idx [B,T] over the whole key range) and key_valid [B,S]. None when plain causal suffices."""
    if seq_idx is None and key_valid is None and offset == 0 and q_len == k_len:
        return None
    qpos = torch.arange(offset, offset + q_len, device=device)
    kpos = torch.arange(k_len, device=device)
    mask = (kpos[None, :] <= qpos[:, None])[None, None]
    if seq_idx is not None:
        sq = seq_idx[:, -q_len:]
        mask = mask & (sq[:, None, :, None] == seq_idx[:, None, None, :k_len])
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :k_len]
    return mask


def attention(q: Tensor, k: Tensor, v: Tensor, *, offset: int = 0, seq_idx: Tensor | None = None,
              key_valid: Tensor | None = None, layout: Any = None) -> Tensor:
    """Causal attention with GQA. q [B,Tq,A,dh], k/v [B,S,G,dh] → [B,Tq,A,dh]; scale dh^-0.5.

    offset: absolute position of the first query (keys 0..S-1); seq_idx [B,S]: document ids (no attention across
    documents); key_valid [B,S]: False for keys that must never be attended (padding in a cache). layout: a
    kernels.DocumentLayout, read here only for its seq_idx. The dense [B,1,Tq,S] mask makes this the oracle of
    kernels' O(T)-memory document attention, not a path for long rows."""
    if layout is not None:
        seq_idx = layout.seq_idx
    mask = attention_mask(q.shape[1], k.shape[1], offset=offset, device=q.device, seq_idx=seq_idx,
                          key_valid=key_valid)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """One query token per row against a KV cache: q [B,A,dh], k/v [B,S,KV,dh], key_mask [B,S] bool (the slots this
    row may attend) → [B,A,dh]; head h reads KV group h // (A/KV); scale dh^-0.5.

    GQA without repeating K/V: a group's A/KV query heads become that KV head's "queries" [B,A/KV,KV,dh], and
    offset S-1 makes the causal part of the mask all-true, so key_mask alone decides."""
    bsz, n_heads, dh = q.shape
    n_kv = k.shape[2]
    qg = q.view(bsz, n_kv, n_heads // n_kv, dh).transpose(1, 2)
    out = attention(qg, k, v, offset=k.shape[1] - 1, key_valid=key_mask)
    return out.transpose(1, 2).reshape(bsz, n_heads, dh)


def mlp_activation(x: Tensor, name: str | None) -> Tensor:
    """The MLP activations that act on one tensor: None, "gelu" (erf), "relu2" (relu squared)."""
    if name == "gelu":
        return F.gelu(x)
    if name == "relu2":
        return torch.square(F.relu(x))
    if name is None:
        return x
    raise ValueError(f"activation {name!r} is not one of gelu, relu2")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, residual: Tensor | None = None,
           norm_weight: Tensor | None = None, norm_eps: float = 1e-5, activation: str | None = None) -> Tensor:
    """x [..., K] → [..., N]: (rmsnorm(x) when norm_weight is given, else x), then the activation ("gelu", "relu2"),
    · weightᵀ + bias, then + residual."""
    if norm_weight is not None:
        x = rmsnorm(x, norm_weight, norm_eps)
    x = mlp_activation(x, activation)
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y
