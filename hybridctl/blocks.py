"""Model blocks: RMSNorm, Mamba2Mixer, Attention, MLP, Block (pre-norm residual).

Legend (the SSD paper's letters): B batch, T seqlen, Q chunk, D d_model, H Mamba heads, P headdim, G groups,
N d_state, K conv width, A attention heads, KV KV groups, dh attention head dim, F MLP hidden size.
Blocks are single-device and touch no files; they call kernels.*, never a kernel library directly.

Parameter names follow HF NemotronH's mixers (in_proj/conv1d/dt_bias/A_log/D/norm/out_proj, q/k/v/o_proj,
up/down_proj) so the Hugging Face name table is a prefix change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridctl import kernels
from hybridctl.config import ATTENTION, MAMBA, ModelConfig
from hybridctl.config import MLP as MLP_SYMBOL

Tensor = torch.Tensor


def _linear(proj: nn.Module, x: Tensor, *, residual: Tensor | None = None, norm: RMSNorm | None = None,
            activation: str | None = None) -> Tensor:
    """``proj(activation(norm(x))) + residual`` for a decode step. A plain nn.Linear goes through ``kernels.linear``
    (at one row on CUDA: one GEMV kernel with the norm or activation and the residual fused); any other module (the
    CPU path's prepacked linears, quantized linears) is called as it is, unless its ``fused_linear`` hook does the
    whole step (a quantized linear's fused GEMV on CUDA)."""
    if type(proj) is nn.Linear:
        return kernels.linear(x, proj.weight, proj.bias, residual=residual,
                              norm_weight=None if norm is None else norm.weight,
                              norm_eps=1e-5 if norm is None else norm.eps, activation=activation)
    fused = getattr(proj, "fused_linear", None)  # a quantized linear's one-kernel decode step (qlinear.py)
    y = None if fused is None else fused(x, residual=residual, norm=norm, activation=activation)
    if y is not None:
        return y
    y = proj(kernels.mlp_activation(x if norm is None else norm(x), activation))
    return y if residual is None else residual + y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rmsnorm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


@dataclass
class MambaState:
    """Per-layer decode state: conv [B, conv_dim, K] (the last K conv inputs) and ssm [B, H, P, N] (fp32 default)."""

    conv: Tensor
    ssm: Tensor


@dataclass
class KVState:
    """Per-layer KV cache, preallocated: k, v [B, S_max, KV, dh]."""

    k: Tensor
    v: Tensor


class Mamba2Mixer(nn.Module):
    """in_proj → [z, x, B, C, dt]; causal conv over [x, B, C] + SiLU; SSD scan with D skip; gated RMSNorm grouped by
    d_inner/G applied to y·silu(z); out_proj."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        m = cfg.mamba
        self.cfg = cfg
        self.d_inner, self.nheads, self.headdim = cfg.d_inner, cfg.mamba_nheads, m.headdim
        self.ngroups, self.d_state, self.d_conv = m.ngroups, m.d_state, m.d_conv
        self.conv_dim = cfg.conv_dim
        kw = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(cfg.d_model, cfg.in_proj_dim, bias=m.bias, **kw)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, m.d_conv, groups=self.conv_dim, bias=m.conv_bias,
                                padding=m.d_conv - 1, **kw)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **kw))
        self.A_log = nn.Parameter(torch.empty(self.nheads, **kw))
        self.D = nn.Parameter(torch.empty(self.nheads, **kw))
        self.norm = RMSNorm(self.d_inner, cfg.norm_eps, **kw)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=m.bias, **kw)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]

    @property
    def dt_limit(self) -> tuple[float, float]:
        m = self.cfg.mamba
        return (m.dt_clamp_min, math.inf if m.dt_clamp_max is None else m.dt_clamp_max)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """mamba_ssm/Megatron init: A = -U[A_init_min, A_init_max]; dt_bias = softplus⁻¹(log-uniform dt); D = 1."""
        m = self.cfg.mamba
        # drawn on the CPU (the generator's device) so the result does not depend on where the model lives
        with torch.no_grad():
            u = torch.rand(self.nheads, generator=generator, dtype=torch.float64)
            self.A_log.copy_(torch.log(m.A_init_min + u * (m.A_init_max - m.A_init_min)))
            u = torch.rand(self.nheads, generator=generator, dtype=torch.float64)
            dt = torch.exp(u * (math.log(m.dt_max) - math.log(m.dt_min)) + math.log(m.dt_min))
            dt = dt.clamp(min=m.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.D.fill_(1.0)
            # conv1d: PyTorch's default (kaiming-uniform), as mamba_ssm keeps it.
            bound = 1.0 / math.sqrt(self.d_conv)  # fan_in of a depthwise conv = K
            w = self.conv1d.weight
            w.copy_(torch.rand(w.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound)
            if self.conv1d.bias is not None:
                b = self.conv1d.bias
                b.copy_(torch.rand(b.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound)
        self.norm.reset_parameters()

    def _split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gn = self.ngroups * self.d_state
        return torch.split(xBC, [self.d_inner, gn, gn], dim=-1)

    def forward(self, u: Tensor, *, seq_idx: Tensor | None = None, state: MambaState | None = None,
                continuing: bool = False) -> Tensor:
        """u [B,T,D] → [B,T,D]. With ``state``: T == 1 and ``continuing`` takes the recurrent step; otherwise a
        chunked prefill that starts from the state when ``continuing`` and leaves the final conv/SSM state in it."""
        bsz, seqlen, _ = u.shape
        if state is not None and continuing and seqlen == 1:
            return self.step(u[:, 0], state)[:, None]
        zxbcdt = self.in_proj(u)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        A = -torch.exp(self.A_log.float())
        conv_w = self.conv1d.weight.squeeze(1)  # [conv_dim, K]
        init_conv = state.conv if (state is not None and continuing) else None
        xBC_raw = xBC
        xBC = kernels.causal_conv1d(xBC, conv_w, self.conv1d.bias, initial_state=init_conv, seq_idx=seq_idx)
        if state is not None:  # after the conv: it still reads the previous state
            self._save_conv_state(state, xBC_raw, seq_idx, init_conv)
        x, B, C = self._split_xbc(xBC)
        y, final = kernels.ssd_scan(
            x.reshape(bsz, seqlen, self.nheads, self.headdim), dt, A,
            B.reshape(bsz, seqlen, self.ngroups, self.d_state), C.reshape(bsz, seqlen, self.ngroups, self.d_state),
            self.cfg.mamba.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            initial_state=state.ssm if (state is not None and continuing) else None, seq_idx=seq_idx)
        if state is not None:
            state.ssm.copy_(final)
        y = y.reshape(bsz, seqlen, self.d_inner)
        y = kernels.rmsnorm_gated(y, z, self.norm.weight, self.norm.eps, self.d_inner // self.ngroups)
        return self.out_proj(y)

    def step(self, u: Tensor, state: MambaState, *, residual: Tensor | None = None, norm: RMSNorm | None = None
             ) -> Tensor:
        """One recurrent decode step: u [B,D] → [B,D], updating state.conv [B,conv_dim,K] and state.ssm [B,H,P,N] in
        place. Static shapes, no Python-int indexing and no host sync, so it can be captured in a CUDA graph.
        ``norm``: u is the block input, normalised by the in_proj product; ``residual`` is added by out_proj's."""
        bsz = u.shape[0]
        zxbcdt = _linear(self.in_proj, u, norm=norm)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = kernels.conv_step(state.conv, xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        x, B, C = self._split_xbc(xBC)
        y = kernels.ssm_step(state.ssm, x.reshape(bsz, self.nheads, self.headdim), dt, -torch.exp(self.A_log.float()),
                             B.reshape(bsz, self.ngroups, self.d_state), C.reshape(bsz, self.ngroups, self.d_state),
                             D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        y = kernels.rmsnorm_gated(y.reshape(bsz, self.d_inner), z, self.norm.weight, self.norm.eps,
                                  self.d_inner // self.ngroups)
        return _linear(self.out_proj, y, residual=residual)

    def _save_conv_state(self, state: MambaState, xBC: Tensor, seq_idx: Tensor | None, init: Tensor | None) -> None:
        """The last K conv inputs; inputs of an earlier document than the last token's (left padding) are zeroed."""
        k = self.d_conv
        prev = init.transpose(1, 2) if init is not None else xBC.new_zeros(xBC.shape[0], k, xBC.shape[2])
        tail = torch.cat([prev.to(xBC.dtype), xBC], dim=1)[:, -k:]  # [B,K,conv_dim]
        if seq_idx is not None:
            sid = torch.cat([seq_idx[:, :1].expand(-1, k), seq_idx], dim=1)[:, -k:]
            keep = sid == seq_idx[:, -1:]
            if init is None:
                pos = torch.arange(xBC.shape[1] + k, device=xBC.device)[-k:] >= k
                keep = keep & pos
            tail = tail * keep[..., None]
        state.conv.copy_(tail.transpose(1, 2))


def apply_rope(x: Tensor, positions: Tensor, base: float, rot_dim: int) -> Tensor:
    """Rotary embedding (GPT-NeoX half-split) on the first rot_dim features. x [B,T,heads,dh], positions [B,T]."""
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=x.device, dtype=torch.float32) / rot_dim))
    ang = positions.float()[..., None] * inv  # [B,T,rot/2]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    xr, xp = x[..., :rot_dim].float(), x[..., rot_dim:]
    x1, x2 = xr.chunk(2, dim=-1)
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rot, xp], dim=-1)


class Attention(nn.Module):
    """q/k/v projections, GQA, causal softmax (scale dh^-0.5), o_proj; no bias; NoPE or RoPE."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        a = cfg.attention
        self.cfg = cfg
        self.n_heads, self.n_kv, self.dh = a.n_heads, a.n_kv_heads, cfg.head_dim
        kw = dict(device=device, dtype=dtype, bias=False)
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.dh, **kw)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.dh, **kw)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.dh, **kw)
        self.o_proj = nn.Linear(self.n_heads * self.dh, cfg.d_model, **kw)

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: KVState | None = None, offset: int = 0,
                positions: Tensor | None = None, key_valid: Tensor | None = None,
                layout: kernels.DocumentLayout | None = None) -> Tensor:
        """x [B,T,D] → [B,T,D]. With ``state``, k/v are written at [offset, offset+T) and the queries attend to the
        cache up to offset+T. ``seq_idx`` [B, offset+T] covers the keys; ``key_valid`` [B, S] masks cache slots.
        ``layout``: packed documents without a cache (training), built once per batch by HybridLM."""
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.dh)
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv, self.dh)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv, self.dh)
        a = self.cfg.attention
        if a.position == "rope":
            if positions is None:
                positions = torch.arange(offset, offset + seqlen, device=x.device)[None].expand(bsz, -1)
            rot = int(a.rotary_fraction * self.dh)
            q, k = apply_rope(q, positions, a.rope_base, rot), apply_rope(k, positions, a.rope_base, rot)
        if state is not None:
            state.k[:, offset:offset + seqlen] = k
            state.v[:, offset:offset + seqlen] = v
            k, v = state.k[:, :offset + seqlen], state.v[:, :offset + seqlen]
        out = kernels.attention(q, k, v, offset=offset, seq_idx=seq_idx, key_valid=key_valid, layout=layout)
        return self.o_proj(out.reshape(bsz, seqlen, self.n_heads * self.dh))

    def step(self, x: Tensor, state: KVState, *, slot: Tensor, key_mask: Tensor, positions: Tensor | None = None,
             residual: Tensor | None = None) -> Tensor:
        """One decode step with static shapes (CUDA-graph capturable): x [B,D] → [B,D].

        slot [1] long (device tensor): the cache index this token's k/v are written to (``index_copy_``, no
        Python-int slicing); key_mask [B,S_max] bool: the cache slots this query may attend (valid and <= slot);
        positions [B] long: RoPE positions (ignored for NoPE). Attention runs over the whole preallocated cache,
        masked, so its shapes never change from step to step. ``residual`` is added by o_proj's product."""
        bsz = x.shape[0]
        q = _linear(self.q_proj, x).view(bsz, 1, self.n_heads, self.dh)
        k = _linear(self.k_proj, x).view(bsz, 1, self.n_kv, self.dh)
        v = _linear(self.v_proj, x).view(bsz, 1, self.n_kv, self.dh)
        a = self.cfg.attention
        if a.position == "rope":
            rot = int(a.rotary_fraction * self.dh)
            q = apply_rope(q, positions[:, None], a.rope_base, rot)
            k = apply_rope(k, positions[:, None], a.rope_base, rot)
        state.k.index_copy_(1, slot, k.to(state.k.dtype))
        state.v.index_copy_(1, slot, v.to(state.v.dtype))
        out = kernels.decode_attention(q.view(bsz, self.n_heads, self.dh), state.k, state.v, key_mask)
        return _linear(self.o_proj, out.reshape(bsz, self.n_heads * self.dh), residual=residual)


class MLP(nn.Module):
    """up_proj → activation (gelu | relu2 | swiglu with gate_proj) → down_proj; no bias."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.activation = cfg.mlp.activation
        kw = dict(device=device, dtype=dtype, bias=False)
        f = cfg.mlp.hidden_size
        self.up_proj = nn.Linear(cfg.d_model, f, **kw)
        if self.activation == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, f, **kw)
        self.down_proj = nn.Linear(f, cfg.d_model, **kw)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up_proj(x)
        if self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "relu2":
            h = torch.square(F.relu(h))
        else:
            h = F.silu(self.gate_proj(x)) * h
        return self.down_proj(h)

    def step(self, x: Tensor, state=None, *, residual: Tensor | None = None, norm: RMSNorm | None = None) -> Tensor:
        """One decode token x [B,D] → [B,D] (no state); ``norm`` applied by up_proj's product, ``residual`` added by
        down_proj's (the batch-1 GEMV kernel fuses both)."""
        h = _linear(self.up_proj, x, norm=norm)
        if self.activation == "swiglu":
            return _linear(self.down_proj, F.silu(_linear(self.gate_proj, x, norm=norm)) * h, residual=residual)
        return _linear(self.down_proj, h, residual=residual, activation=self.activation)


class Block(nn.Module):
    """Pre-norm residual layer: x + mixer(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig, kind: str, device=None, dtype=None) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, device=device, dtype=dtype)
        mixer = {MAMBA: Mamba2Mixer, ATTENTION: Attention, MLP_SYMBOL: MLP}[kind]
        self.mixer = mixer(cfg, device=device, dtype=dtype)

    def forward(self, x: Tensor, **kw) -> Tensor:
        return x + self.mixer(self.norm(x), **kw)

    def step(self, x: Tensor, state=None, **kw) -> Tensor:
        """One decode token: x [B,D] → [B,D], ``x + mixer.step(norm(x), state, **kw)``; ``state`` is this layer's
        cache entry (updated in place; unused by MLP, which has no step state). The mixer's first products apply the
        norm and its last adds the residual (one kernel each at batch 1 on CUDA, see ``_linear``); attention's three
        input products share one explicit norm instead."""
        if self.kind == ATTENTION:
            return self.mixer.step(self.norm(x), state, residual=x, **kw)
        return self.mixer.step(x, state, residual=x, norm=self.norm)
