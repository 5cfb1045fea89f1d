"""HybridLM: embed → blocks from the pattern (pre-norm residual) → final RMSNorm → LM head; InferenceCache; counts.

Native state-dict names (the checkpoint format's names; HF NemotronH's without the ``backbone.`` prefix):
``embed.weight`` [V,D]; ``layers.{i}.norm.weight`` [D]; ``layers.{i}.mixer.*`` (see blocks.py);
``norm_f.weight`` [D]; ``lm_head.weight`` [V,D] (absent when embeddings are tied).

Build on meta, then materialise: ``build_model(cfg, device="meta")`` → transforms → ``materialize(model, device)``
→ ``init_weights`` or ``load_state_dict(..., assign=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridctl import kernels
from hybridctl.blocks import Attention, Block, KVState, Mamba2Mixer, MambaState, RMSNorm
from hybridctl.config import ATTENTION, LAYER_NAMES, MAMBA, ModelConfig

Tensor = torch.Tensor


@dataclass
class InferenceCache:
    """Decode state for a batch: per Mamba layer conv [B,conv_dim,K] + SSM [B,H,P,N] (fp32 by default), per attention
    layer a preallocated KV cache [B,S_max,KV,dh]. ``offset`` counts the positions already processed (same for all
    rows); ``key_valid`` [B,S_max] marks cache slots that may be attended (False for left padding)."""

    batch_size: int
    max_seqlen: int
    layers: dict[int, MambaState | KVState]
    key_valid: Tensor
    offset: int = 0
    extra: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        total = 0
        for st in self.layers.values():
            for t in (st.conv, st.ssm) if isinstance(st, MambaState) else (st.k, st.v):
                total += t.numel() * t.element_size()
        return total

    def reset(self) -> None:
        self.offset = 0
        self.key_valid.fill_(True)
        for st in self.layers.values():
            for t in (st.conv, st.ssm) if isinstance(st, MambaState) else (st.k, st.v):
                t.zero_()


def _attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention will compute in: autocast's when it is on for x's device, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, **kw)
        self.layers = nn.ModuleList(Block(cfg, kind, **kw) for kind in cfg.pattern)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, **kw)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, **kw)

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, *, seq_idx: Tensor | None = None, cache: InferenceCache | None = None,
                positions: Tensor | None = None, return_hidden: bool = False) -> Tensor:
        """input_ids [B,T] → logits [B,T,V] (or the final hidden states [B,T,D] with return_hidden).

        seq_idx [B,T]: document ids of packed rows (non-decreasing): no state or attention crosses a boundary.
        cache: continue from / fill an InferenceCache (prefill when cache.offset == 0, then one token per call);
        positions [B,T]: RoPE positions (default offset + arange).
        """
        h = self.hidden_states(input_ids, seq_idx=seq_idx, cache=cache, positions=positions)
        return h if return_hidden else self.logits(h)

    def hidden_states(self, input_ids: Tensor, *, seq_idx: Tensor | None = None, cache: InferenceCache | None = None,
                      positions: Tensor | None = None) -> Tensor:
        x = self.embed(input_ids)
        offset = 0 if cache is None else cache.offset
        continuing = offset > 0
        layout = None
        if cache is not None and seq_idx is not None and ATTENTION in self.cfg.pattern:
            # Attention layers need document ids for every key in the cache: padding (an earlier document than
            # the row's last) is marked invalid once, and later keys are always valid.
            valid = seq_idx == seq_idx[:, -1:]
            cache.key_valid[:, offset:offset + valid.shape[1]] = valid
        if cache is None and seq_idx is not None and ATTENTION in self.cfg.pattern:
            # once per batch, shared by every attention layer: cu_seqlens / block mask / document spans
            layout = kernels.document_layout(seq_idx, dtype=_attention_dtype(x))
        for i, layer in enumerate(self.layers):
            if layer.kind == MAMBA:
                x = layer(x, seq_idx=seq_idx, state=None if cache is None else cache.layers[i], continuing=continuing)
            elif layer.kind == ATTENTION:
                if cache is None:
                    x = layer(x, layout=layout, positions=positions)
                else:
                    end = offset + x.shape[1]
                    # within a fresh prefill, left padding is its own document and may attend only to itself
                    sid = seq_idx if (seq_idx is not None and not continuing) else None
                    x = layer(x, seq_idx=sid, state=cache.layers[i], offset=offset, positions=positions,
                              key_valid=None if sid is not None else cache.key_valid[:, :end])
            else:
                x = layer(x)
        if cache is not None:
            cache.offset = offset + input_ids.shape[1]
        return self.norm_f(x)

    def logits(self, h: Tensor) -> Tensor:
        if self.lm_head is not None and type(self.lm_head) is not nn.Linear:  # a swapped head (qlinear, cpu_decode)
            return self.lm_head(h)
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w)

    def decode_step(self, tokens: Tensor, cache: InferenceCache, slot: Tensor, positions: Tensor | None = None, *,
                    layer_step: Callable[..., Tensor] | None = None, head: Callable[..., Tensor] | None = None
                    ) -> Tensor:
        """One token per row with static shapes, for CUDA graphs and the CPU fast path: tokens [B] → logits [B,V].

        slot [1] long device tensor: the cache position being written (= cache.offset in the Python-int API);
        positions [B] long: RoPE positions (row-specific with left padding). Reads/writes the cache in place but
        does NOT advance ``cache.offset`` or ``slot`` (a captured graph cannot run Python side effects): the
        caller advances both. Equivalent to ``forward(tokens[:, None], cache=cache)[:, 0]`` at offset == slot.
        ``layer_step(block, x, state, **kw)`` / ``head(model, x)`` replace ``Block.step`` / ``HybridLM.head`` (the
        compiled decode step passes their ``torch.compile``d versions: one graph per layer kind, shared by layers).
        """
        x = self.embed(tokens)
        key_mask = None
        if ATTENTION in self.cfg.pattern:
            # [B,S_max]: slots already written for this row (left padding stays invalid in cache.key_valid)
            kpos = torch.arange(cache.max_seqlen, device=tokens.device)
            key_mask = cache.key_valid & (kpos <= slot)[None]
        attn_kw = dict(slot=slot, key_mask=key_mask, positions=positions)
        layer_step = layer_step or Block.step
        for i, layer in enumerate(self.layers):
            x = layer_step(layer, x, cache.layers.get(i), **(attn_kw if layer.kind == ATTENTION else {}))
        return (head or HybridLM.head)(self, x)

    def head(self, x: Tensor) -> Tensor:
        """Final norm and LM head: hidden states [..., D] → logits [..., V] (one GEMV kernel at batch 1 on CUDA, see
        ``kernels.linear``). A head swapped for another module (a quantized head, the CPU fast path's prepacked one,
        tied or not: see the linear-replacement contract in decode.py) is called as a module."""
        if self.lm_head is not None and type(self.lm_head) is not nn.Linear:
            return self.logits(self.norm_f(x))
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return kernels.linear(x, w, norm_weight=self.norm_f.weight, norm_eps=self.norm_f.eps)

    # ---- inference cache ------------------------------------------------------------------------------------------
    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None,
                       state_dtype: torch.dtype = torch.float32) -> InferenceCache:
        """Preallocate decode state. SSM state in ``state_dtype`` (fp32 default: bf16 state degrades generations)."""
        p = next(self.parameters())
        device = device or p.device
        dtype = dtype or p.dtype
        cfg, layers = self.cfg, {}
        for i, kind in enumerate(cfg.pattern):
            if kind == MAMBA:
                layers[i] = MambaState(
                    conv=torch.zeros(batch_size, cfg.conv_dim, cfg.mamba.d_conv, device=device, dtype=dtype),
                    ssm=torch.zeros(batch_size, cfg.mamba_nheads, cfg.mamba.headdim, cfg.mamba.d_state,
                                    device=device, dtype=state_dtype))
            elif kind == ATTENTION:
                shape = (batch_size, max_seqlen, cfg.attention.n_kv_heads, cfg.head_dim)
                layers[i] = KVState(k=torch.zeros(shape, device=device, dtype=dtype),
                                    v=torch.zeros(shape, device=device, dtype=dtype))
        key_valid = torch.ones(batch_size, max_seqlen, dtype=torch.bool, device=device)
        return InferenceCache(batch_size, max_seqlen, layers, key_valid)

    # ---- init -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Megatron/mamba_ssm initialisation: normal(0, init_std) for embeddings and projections, output projections
        (out_proj, o_proj, down_proj) scaled by 1/sqrt(2·n_layers), Mamba A/dt/D from their ranges, norms = 1."""
        cfg = self.cfg
        # a CPU generator: the same seed gives the same weights on every device (CPU, one GPU, FSDP ranks)
        g = torch.Generator().manual_seed(seed)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)

        def normal_(t: Tensor, s: float) -> None:
            # draw in fp32 for reproducibility across dtypes, then cast
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(s))

        normal_(self.embed.weight, std)
        for layer in self.layers:
            layer.norm.reset_parameters()
            m = layer.mixer
            if isinstance(m, Mamba2Mixer):
                normal_(m.in_proj.weight, std)
                normal_(m.out_proj.weight, out_std)
                for lin in (m.in_proj, m.out_proj):
                    if lin.bias is not None:
                        lin.bias.zero_()
                m.reset_parameters(g)
            elif isinstance(m, Attention):
                for lin in (m.q_proj, m.k_proj, m.v_proj):
                    normal_(lin.weight, std)
                normal_(m.o_proj.weight, out_std)
            else:
                normal_(m.up_proj.weight, std)
                if hasattr(m, "gate_proj"):
                    normal_(m.gate_proj.weight, std)
                normal_(m.down_proj.weight, out_std)
        self.norm_f.reset_parameters()
        if self.lm_head is not None:
            normal_(self.lm_head.weight, std)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """A_log, D, dt_bias, norm weights and biases take no weight decay (all and only the 1-D parameters)."""
    return getattr(param, "_no_weight_decay", False) or param.ndim < 2


def build_model(cfg: ModelConfig, *, device: str | torch.device = "meta", dtype: torch.dtype | None = None
                ) -> HybridLM:
    """Construct on ``device`` (meta by default: no memory) without initialising."""
    with torch.device(device):
        return HybridLM(cfg, dtype=dtype)


def materialize(model: HybridLM, device: str | torch.device, *, seed: int | None = 0) -> HybridLM:
    """Allocate a meta model on ``device``; initialise when a seed is given (else values are garbage, to be loaded)."""
    model.to_empty(device=device)
    if seed is not None:
        model.init_weights(seed)
    return model


# ---- counts ------------------------------------------------------------------------------------------------------


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by kind: embedding, lm_head, final_norm, mamba, attention, mlp (each including its pre-norm)."""
    model = build_model(cfg)
    counts = {"embedding": model.embed.weight.numel(), "lm_head": 0 if model.lm_head is None else
              model.lm_head.weight.numel(), "final_norm": model.norm_f.weight.numel()}
    for name in LAYER_NAMES.values():
        counts[name] = 0
    for layer in model.layers:
        counts[LAYER_NAMES[layer.kind]] += sum(p.numel() for p in layer.parameters())
    return counts


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token at ``seq_len`` (training ≈ 3×): 2 per matmul weight (head included, embedding lookup
    excluded), causal attention scores+values 2·2·(seq_len/2)·A·dh per attention layer, and the SSD scan per Mamba
    layer ≈ 2·H·P·N·3 (input→state, state→output, intra-chunk; an approximation of the chunked algorithm)."""
    counts = param_counts(cfg)
    n_attn, n_mamba = cfg.pattern.count(ATTENTION), cfg.pattern.count(MAMBA)
    d = cfg.d_model
    matmul = counts["mamba"] + counts["attention"] + counts["mlp"]
    # subtract the 1-D/conv parameters that are not matmul weights
    if n_mamba:
        m = cfg.mamba
        matmul -= n_mamba * (d + cfg.d_inner + 3 * cfg.mamba_nheads + cfg.conv_dim * (m.d_conv + int(m.conv_bias)))
    matmul -= (n_attn + cfg.pattern.count("-")) * d
    head = cfg.vocab_size * d
    attn = n_attn * 2 * 2 * (seq_len / 2) * cfg.attention.n_heads * cfg.head_dim
    ssd = n_mamba * 2 * 3 * cfg.mamba_nheads * cfg.mamba.headdim * cfg.mamba.d_state
    conv = n_mamba * 2 * cfg.conv_dim * cfg.mamba.d_conv
    fwd = 2 * (matmul + head) + attn + ssd + conv
    return {"forward": fwd, "training": 3 * fwd, "attention": attn, "ssd": ssd + conv, "matmul": 2 * (matmul + head)}


def memory_per_sequence(cfg: ModelConfig, *, dtype_bytes: int = 2, state_bytes: int = 4) -> dict[str, int]:
    """Decode memory: constant SSM+conv state per sequence vs KV cache bytes per token."""
    n_mamba, n_attn = cfg.pattern.count(MAMBA), cfg.pattern.count(ATTENTION)
    ssm = n_mamba * cfg.mamba_nheads * cfg.mamba.headdim * cfg.mamba.d_state * state_bytes
    conv = n_mamba * cfg.conv_dim * cfg.mamba.d_conv * dtype_bytes
    kv = n_attn * 2 * cfg.attention.n_kv_heads * cfg.head_dim * dtype_bytes
    return {"state_bytes_per_sequence": ssm + conv, "ssm_state_bytes": ssm, "conv_state_bytes": conv,
            "kv_bytes_per_token": kv}


# ---- training memory (the pre-flight check of `train`, and `extend-context --dry-run`) -------------------------------


def _mamba_ref_bytes_per_token(cfg: ModelConfig, b: int) -> float:
    """Bytes one Mamba block keeps for backward per token on the ``ref`` backend (ref.py's pure-PyTorch ops, every
    one of whose intermediates autograd saves), read off ref.ssd_scan / causal_conv1d / rmsnorm_gated and checked
    against autograd's saved tensors (tests/test_model.py). b: compute bytes (2: bf16 autocast, whose matmuls save
    bf16 copies of their operands; 4: fp32). The scan's chunk-quadratic terms dominate: per token H·Q for the decay
    matrix L, CB and the scores, H·N for B/C expanded per head — ~2.8× the kernel backend at 130M width."""
    m, f, fp32 = cfg.mamba, 4, b >= 4
    h, p, n, g, q = cfg.mamba_nheads, m.headdim, m.d_state, m.ngroups, m.chunk_size
    di, cd = cfg.d_inner, cfg.conv_dim
    norm = cfg.d_model * (2 * f + b)  # the block input and its normalised form (fp32), in_proj's input
    proj = cfg.in_proj_dim * f if fp32 else di * f  # z: the whole in_proj output through its view, or an fp32 copy
    # conv: its input (an fp32 copy for packed documents) and pre-activation; the scan's x: the fp32 conv output's
    # storage, or (bf16) two fp32 copies of x
    conv = cd * 2 * f + (cd * f if fp32 else 2 * h * p * f)
    ssd = (h * q * (f + 2 * b) + 2 * g * n * b + h * n * (f + 2 * b) + 3 * h * p * b + h * p * n * (f + b) / q
           + q + 8 * h * f)  # L, CB, scores; B/C per group; B, B·w, C per head; x·dt, ...; chunk states; masks, dt
    gate = di * (5 * f + b)  # gated RMSNorm in fp32 (y, z, silu(z), the product, the normalised) and out_proj's input
    return norm + proj + conv + ssd + gate


def _activation_bytes_per_token(cfg: ModelConfig, kind: str, b: int, backend: str = "kernel") -> float:
    """Bytes one block of ``kind`` keeps for backward per token (b: compute dtype bytes; the residual stream is
    fp32): the pre-norm's input and output, then what the mixer's ops save (an estimate of autograd's saved tensors,
    the fused kernels' own saves included: SSD chunk states, attention's log-sum-exp). ``backend``: the one that
    will run the Mamba layers ("kernel": mamba_ssm's fused chunked scan; "ref": ``_mamba_ref_bytes_per_token``)."""
    d, r = cfg.d_model, 4
    block = d * (r + b)
    if kind == MAMBA and backend == "ref":
        return _mamba_ref_bytes_per_token(cfg, b)
    if kind == MAMBA:
        m, h = cfg.mamba, cfg.mamba_nheads
        return block + cfg.in_proj_dim * b + 2 * cfg.conv_dim * b + cfg.d_inner * (4 + 2 * b) \
            + h * m.headdim * m.d_state * 4 / m.chunk_size + 8 * h
    if kind == ATTENTION:
        a, kv, dh = cfg.attention.n_heads, cfg.attention.n_kv_heads, cfg.head_dim
        rope = (a + kv) * dh * b if cfg.attention.position == "rope" else 0
        return block + (a + 2 * kv) * dh * b + rope + a * dh * b + a * 4
    f = cfg.mlp.hidden_size
    return block + f * b * (4 if cfg.mlp.activation == "swiglu" else 2)


LOSS_CHUNK_TOKENS = 8192  # tokens per chunk of the chunked LM loss
LOSS_CHUNK_ABOVE_BYTES = 8 * 2**30  # chunk the loss when the fp32 logits of a micro-batch would exceed this


def loss_chunk_tokens(tokens: int, vocab_size: int) -> int | None:
    """Tokens per chunk of the LM loss for a micro-batch of ``tokens`` tokens (None: the plain, unchunked loss).
    Above LOSS_CHUNK_ABOVE_BYTES of fp32 logits the head and loss run per chunk and are recomputed in backward, so
    only one chunk's logits are ever held (hybridctl.evaluation.chunked_lm_loss_sum)."""
    return LOSS_CHUNK_TOKENS if tokens * vocab_size * 4 > LOSS_CHUNK_ABOVE_BYTES else None


def training_memory(cfg: ModelConfig, *, seq_len: int, micro_batch: int, activation_checkpointing: bool,
                    world_size: int = 1, compute_bytes: int = 2, n_params: int | None = None,
                    backend: str = "kernel") -> dict[str, float]:
    """Estimated peak bytes per device of one training step: fp32 master params, fp32 grads, AdamW's two fp32
    moments (FSDP shards these three over ``world_size``) and the activations of one micro-batch of
    ``micro_batch`` × ``seq_len`` tokens. With activation checkpointing each block keeps only its fp32 input and one
    block at a time is recomputed in backward. The head keeps the logits (compute dtype and the fp32 copy of the
    loss) and their fp32 gradient. ``n_params``: the model's parameter count when the caller has it. ``backend``:
    the one that will run ("kernel" | "ref", ``training_backend``): the ref scan saves ~2.8× more per Mamba layer."""
    n_params = sum(param_counts(cfg).values()) if n_params is None else n_params
    static = n_params * (4 + 4 + 8) / world_size
    tokens = micro_batch * seq_len
    per_layer = [_activation_bytes_per_token(cfg, kind, compute_bytes, backend) for kind in cfg.pattern]
    if activation_checkpointing:
        layers = len(per_layer) * cfg.d_model * 4 + max(per_layer, default=0)
    else:
        layers = sum(per_layer)
    head_tokens = loss_chunk_tokens(tokens, cfg.vocab_size) or tokens  # chunked loss: one chunk's logits live
    acts = tokens * (layers + cfg.d_model * (4 + 4 + compute_bytes)) + \
        head_tokens * cfg.vocab_size * (compute_bytes + 4 + 4 + 4)
    return {"params": n_params * 4 / world_size, "grads": n_params * 4 / world_size,
            "optimizer": n_params * 8 / world_size, "activations": acts, "total": static + acts}


MEMORY_HEADROOM = 0.9  # of the device's memory: CUDA context, allocator fragmentation, workspaces


def check_training_memory(cfg: ModelConfig, *, seq_len: int, micro_batch: int, activation_checkpointing: bool,
                          world_size: int, compute_bytes: int, capacity_bytes: int, device_name: str,
                          backend: str = "kernel") -> dict:
    """Raise HybridctlError when ``training_memory`` exceeds MEMORY_HEADROOM × capacity_bytes, saying what would fit
    (micro-batch 1 with full activation checkpointing, or the number of devices FSDP needs). Returns the estimate.
    ``backend``: the one that will run the Mamba layers (``kernels.training_backend``)."""
    from hybridctl.config import HybridctlError

    n_params = sum(param_counts(cfg).values())

    def est(mb: int, ac: bool, ws: int = world_size) -> float:
        return training_memory(cfg, seq_len=seq_len, micro_batch=mb, activation_checkpointing=ac, world_size=ws,
                               compute_bytes=compute_bytes, n_params=n_params, backend=backend)["total"]

    limit = MEMORY_HEADROOM * capacity_bytes
    mem = training_memory(cfg, seq_len=seq_len, micro_batch=micro_batch,
                          activation_checkpointing=activation_checkpointing, world_size=world_size,
                          compute_bytes=compute_bytes, n_params=n_params, backend=backend)
    if mem["total"] <= limit:
        return mem
    gib = 2 ** 30
    have = (f"needs ≈{mem['total'] / gib:.1f} GiB per device (params+grads+AdamW {(mem['total'] - mem['activations']) / gib:.1f}, "
            f"activations {mem['activations'] / gib:.1f} at micro-batch {micro_batch} × {seq_len} tokens"
            f"{', activation checkpointing' if activation_checkpointing else ''}) but {device_name} has "
            f"{capacity_bytes / gib:.1f} GiB")
    fits = [(mb, ac) for ac in (False, True) for mb in (micro_batch // 2 ** i for i in range(8))
            if 1 <= mb < micro_batch or (mb == micro_batch and ac and not activation_checkpointing)]
    fit = next(((mb, ac) for mb, ac in fits if est(mb, ac) <= limit), None)
    if fit is not None:
        mb, ac = fit
        hint = f"optim.micro_batch={mb}" + (" and parallel.activation_checkpointing=true" if ac else "")
        raise HybridctlError(f"this recipe does not fit: it {have}; {hint} would (≈{est(mb, ac) / gib:.1f} GiB)")
    n = next((w for w in range(world_size + 1, 1025) if est(1, True, w) <= limit), None)
    hint = (f"micro-batch 1 with activation checkpointing still needs ≈{est(1, True) / gib:.1f} GiB; "
            + (f"FSDP over {n} devices would fit it (≈{est(1, True, n) / gib:.1f} GiB each)" if n else
               f"the activations alone exceed the device at seq_len {seq_len}: shorten data.seq_len"))
    raise HybridctlError(f"this recipe does not fit: it {have}; {hint}")


def decode_bytes_per_step(model: nn.Module, batch: int, kv_len: int, *, state_bytes: int = 4) -> int:
    """Bytes one decode step of ``batch`` rows must move at least (a bandwidth roofline's numerator): every parameter
    and persistent buffer in its stored dtype (a quantized linear's packed int8 / int4 ``qweight``, its ``scales``
    and zero points if any: what decode reads; kept tensors at their dtype), except that of the embedding table
    only the B gathered rows are read (all of it when the head is tied to it); per row the SSM state
    (``state_bytes`` per element) and conv state, read and written, and the KV cache up to ``kv_len`` positions, read
    (``memory_per_sequence`` in the embedding's element size, the activations' dtype)."""
    emb = model.embed.weight
    total = batch * emb.shape[1] * emb.element_size()
    if model.lm_head is None:  # tied: the head reads the whole table
        total += emb.numel() * emb.element_size()
    seen = {id(emb)}
    for mod in model.modules():
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        tensors = list(mod._parameters.values()) + [b for n, b in mod._buffers.items() if n not in skip]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    mem = memory_per_sequence(model.cfg, dtype_bytes=emb.element_size(), state_bytes=state_bytes)
    return total + batch * (2 * mem["state_bytes_per_sequence"] + mem["kv_bytes_per_token"] * kv_len)
