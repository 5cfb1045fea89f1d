"""Hugging Face config.json ↔ ModelConfig: NemotronH, Mamba2ForCausalLM and mamba_ssm's MambaConfig (no torch).

The semantics these translations preserve (dt clamps, tying, activations, head sizes) are described in hf.py.
"""

from __future__ import annotations

import math
from typing import Any

from hybridctl.checkpoint.keymaps import HF_MLP_ACT, HF_MLP_ACT_INV, NEMOTRON_BLOCK_SYMBOLS, NEMOTRON_BLOCK_TYPES
from hybridctl.config import MAMBA, HybridctlError, ModelConfig, mamba_size, parse_pattern

_INIT_FIELDS = ("dt_min", "dt_max", "dt_init_floor", "A_init_min", "A_init_max")


# --------------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------------


def _float(v: Any, what: str) -> float:
    """A float from config.json: a number, 'Infinity'/'inf' or transformers' {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    try:
        return float(v)
    except (TypeError, ValueError):
        raise HybridctlError(f"config.json: {what} must be a number, got {v!r}") from None


def _json_float(x: float) -> Any:
    """The way transformers 5 serialises non-finite floats, so its configs and ours read back the same."""
    return x if math.isfinite(x) else {"__float__": "Infinity" if x > 0 else "-Infinity"}


def _model_config(where: str, **kw: Any) -> ModelConfig:
    try:
        return ModelConfig.from_dict(kw)
    except HybridctlError as e:
        raise HybridctlError(f"{where}: this config does not describe a model hybridctl can run: {e}") from None


def require(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise HybridctlError(f"{where}: {what}")


def _init_overrides(c: dict[str, Any]) -> dict[str, Any]:
    """Initialisation-only fields hybridctl stored at export (no HF field holds them); validated by MambaConfig."""
    block = c.get("hybridctl")
    init = block.get("init") if isinstance(block, dict) else None
    return {k: v for k, v in (init or {}).items() if k in _INIT_FIELDS}


# --------------------------------------------------------------------------------------------------------------------
# config.json → ModelConfig (tie_embeddings is decided later, from the tensors)
# --------------------------------------------------------------------------------------------------------------------


def _nemotron_pattern(c: dict[str, Any], where: str) -> str:
    types = c.get("layers_block_type") or c.get("layer_types")
    if isinstance(types, list):
        unknown = [t for t in types if t not in NEMOTRON_BLOCK_SYMBOLS]
        require(not unknown, where, f"unknown layers_block_type {unknown[:1]}; expected "
                 f"{', '.join(NEMOTRON_BLOCK_TYPES.values())}")
        pattern = "".join(NEMOTRON_BLOCK_SYMBOLS[t] for t in types)
    elif isinstance(c.get("hybrid_override_pattern"), str):
        pattern = c["hybrid_override_pattern"]
    else:
        raise HybridctlError(f"{where}: config.json has neither layers_block_type nor hybrid_override_pattern")
    if "E" in pattern:
        raise HybridctlError(f"{where}: MoE models are not yet supported (layer {pattern.index('E')} is 'moe'/'E'); "
                             "only Mamba-2, attention and MLP layers convert")
    try:
        return parse_pattern(pattern)
    except HybridctlError as e:
        raise HybridctlError(f"{where}: {e}") from None


def from_nemotron(c: dict[str, Any], where: str) -> tuple[ModelConfig, list[str]]:
    notes: list[str] = []
    pattern = _nemotron_pattern(c, where)
    require(not c.get("mlp_bias") and not c.get("attention_bias"), where,
             "mlp_bias/attention_bias are set; hybridctl's attention and MLP have no biases")
    require(c.get("mamba_hidden_act", "silu") == "silu", where,
             f"mamba_hidden_act {c.get('mamba_hidden_act')!r} is not supported (hybridctl's Mamba-2 uses silu)")
    require(c.get("sliding_window") is None, where, "sliding-window attention is not supported")
    act = c.get("mlp_hidden_act", "relu2")
    require(act in HF_MLP_ACT_INV, where, f"mlp_hidden_act {act!r} is not supported; hybridctl converts "
             f"{', '.join(HF_MLP_ACT_INV)}")
    if c.get("num_nextn_predict_layers"):
        notes.append("multi-token-prediction (mtp.*) weights are skipped, as transformers skips them")
    d = int(c.get("hidden_size", 4096))
    heads, hdim = int(c.get("mamba_num_heads", 128)), int(c.get("mamba_head_dim", 64))
    # transformers sizes the mixer from mamba_num_heads*mamba_head_dim and never reads `expand` (Nemotron-H-4B:
    # 112 x 64 = 7168 with hidden 3072 and "expand": 2), so the heads are the size of record.
    size = mamba_size(d, heads, hdim)
    tsm = _float(c.get("time_step_min", 1e-3), "time_step_min")
    mamba = dict(d_state=int(c.get("ssm_state_size", 128)), headdim=hdim, ngroups=int(c.get("n_groups", 8)),
                 **size, d_conv=int(c.get("conv_kernel", 4)), chunk_size=int(c.get("chunk_size", 128)),
                 conv_bias=bool(c.get("use_conv_bias", True)), bias=bool(c.get("use_bias", False)),
                 dt_min=tsm if tsm > 0 else 1e-3, dt_max=_float(c.get("time_step_max", 0.1), "time_step_max"),
                 dt_init_floor=_float(c.get("time_step_floor", 1e-4), "time_step_floor"),
                 dt_clamp_min=tsm, dt_clamp_max=None)
    mamba.update(_init_overrides(c))
    n_heads = int(c.get("num_attention_heads", 32))
    head_dim = c.get("head_dim") or c.get("attention_head_dim") or 128  # 128: transformers' default
    attention = dict(n_heads=n_heads, n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
                     head_dim=int(head_dim), position="none")
    mlp = dict(hidden_size=int(c.get("intermediate_size", 21504)), activation=HF_MLP_ACT_INV[act])
    cfg = _model_config(where, vocab_size=int(c.get("vocab_size", 131072)), d_model=d, pattern=pattern,
                        mamba=mamba, attention=attention, mlp=mlp,
                        norm_eps=_float(c.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon"),
                        init_std=_float(c.get("initializer_range", 0.02), "initializer_range"),
                        residual_in_fp32=bool(c.get("residual_in_fp32", False)))
    return cfg, notes


def _dt_limit(c: dict[str, Any]) -> tuple[float, float | None]:
    lim = c.get("time_step_limit", (0.0, math.inf))
    if not isinstance(lim, (list, tuple)) or len(lim) != 2:
        raise HybridctlError(f"config.json: time_step_limit must be a pair, got {lim!r}")
    lo, hi = _float(lim[0], "time_step_limit[0]"), _float(lim[1], "time_step_limit[1]")
    return lo, (None if math.isinf(hi) else hi)


def from_mamba2(c: dict[str, Any], where: str) -> tuple[ModelConfig, list[str]]:
    require(c.get("hidden_act", "silu") == "silu", where, f"hidden_act {c.get('hidden_act')!r} is not supported")
    d, expand = int(c.get("hidden_size", 4096)), int(c.get("expand", 2))
    heads, hdim = int(c.get("num_heads", 128)), int(c.get("head_dim", 64))
    # transformers' Mamba2Config refuses num_heads*head_dim != expand*hidden_size, and its mixer is sized by expand.
    require(heads * hdim == expand * d, where, f"num_heads*head_dim ({heads * hdim}) must equal expand*hidden_size "
             f"({expand * d}), as transformers' Mamba2 requires")
    lo, hi = _dt_limit(c)
    mamba = dict(d_state=int(c.get("state_size", 128)), headdim=hdim, ngroups=int(c.get("n_groups", 8)),
                 **mamba_size(d, heads, hdim), d_conv=int(c.get("conv_kernel", 4)),
                 chunk_size=int(c.get("chunk_size", 256)),
                 conv_bias=bool(c.get("use_conv_bias", True)), bias=bool(c.get("use_bias", False)),
                 dt_min=_float(c.get("time_step_min", 1e-3), "time_step_min"),
                 dt_max=_float(c.get("time_step_max", 0.1), "time_step_max"),
                 dt_init_floor=_float(c.get("time_step_floor", 1e-4), "time_step_floor"),
                 dt_clamp_min=lo, dt_clamp_max=hi)
    mamba.update(_init_overrides(c))
    cfg = _model_config(where, vocab_size=int(c.get("vocab_size", 32768)), d_model=d,
                        pattern=MAMBA * int(c.get("num_hidden_layers", 64)), mamba=mamba,
                        norm_eps=_float(c.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon"),
                        init_std=_float(c.get("initializer_range", 0.1), "initializer_range"),
                        residual_in_fp32=bool(c.get("residual_in_fp32", True)))
    notes = ["residual_in_fp32: transformers keeps the residual stream in fp32; hybridctl keeps it in the model "
             "dtype (identical in fp32)"] if cfg.residual_in_fp32 else []
    return cfg, notes


def from_mamba_ssm(c: dict[str, Any], where: str, vocab_rows: int) -> tuple[ModelConfig, list[str]]:
    """mamba_ssm MambaConfig (+ its Mamba2 module defaults). The embedding is padded to pad_vocab_size_multiple in
    mamba_ssm, so the vocab is the tensor's row count (its logits over padding rows exist there too)."""
    ssm = c.get("ssm_cfg") or {}
    require(ssm.get("layer") == "Mamba2", where, f"ssm_cfg.layer is {ssm.get('layer', 'Mamba1')!r}; only Mamba-2 "
             "mamba_ssm models convert (Mamba-1 is a different mixer)")
    require(not c.get("attn_layer_idx") and not c.get("d_intermediate"), where,
             "mamba_ssm hybrid blocks (attn_layer_idx / d_intermediate) are not supported yet")
    require(c.get("rms_norm", True), where, "rms_norm is false (LayerNorm); hybridctl supports RMSNorm only")
    require(ssm.get("rmsnorm", True) and not ssm.get("norm_before_gate", False) and not ssm.get("D_has_hdim"),
             where, "ssm_cfg rmsnorm=false / norm_before_gate=true / D_has_hdim=true are not supported")
    require(isinstance(c.get("d_model"), int) and isinstance(c.get("n_layer"), int), where,
             "mamba_ssm config.json needs integer d_model and n_layer")
    d, expand = c["d_model"], int(ssm.get("expand", 2))
    # mamba_ssm's Mamba2: d_inner = expand*d_model, nheads = d_ssm/headdim with d_ssm = d_inner by default; a
    # smaller d_ssm adds a gated MLP inside the mixer (in_proj grows by 2*(d_inner - d_ssm)), which hybridctl lacks.
    require(ssm.get("d_ssm") in (None, expand * d), where, "ssm_cfg.d_ssm != expand*d_model is not supported")
    headdim = int(ssm.get("headdim", 64))
    require(expand * d % headdim == 0, where, f"expand*d_model ({expand * d}) is not divisible by headdim {headdim}")
    lo, hi = (0.0, None)
    if "dt_limit" in ssm:
        lo, hi = _dt_limit({"time_step_limit": ssm["dt_limit"]})
    a_lo, a_hi = ssm.get("A_init_range", (1, 16))
    mamba = dict(d_state=int(ssm.get("d_state", 128)), headdim=headdim,
                 ngroups=int(ssm.get("ngroups", 1)), **mamba_size(d, expand * d // headdim, headdim),
                 d_conv=int(ssm.get("d_conv", 4)),
                 chunk_size=int(ssm.get("chunk_size", 256)), conv_bias=bool(ssm.get("conv_bias", True)),
                 bias=bool(ssm.get("bias", False)), dt_min=float(ssm.get("dt_min", 1e-3)),
                 dt_max=float(ssm.get("dt_max", 0.1)), dt_init_floor=float(ssm.get("dt_init_floor", 1e-4)),
                 dt_clamp_min=lo, dt_clamp_max=hi, A_init_min=float(a_lo), A_init_max=float(a_hi))
    cfg = _model_config(where, vocab_size=vocab_rows, d_model=d, pattern=MAMBA * int(c["n_layer"]), mamba=mamba,
                        norm_eps=1e-5, residual_in_fp32=bool(c.get("residual_in_fp32", True)))
    notes = []
    if vocab_rows != c.get("vocab_size"):
        notes.append(f"vocab: {vocab_rows} embedding rows (vocab_size {c.get('vocab_size')} padded to a multiple of "
                     f"{c.get('pad_vocab_size_multiple', 8)} by mamba_ssm); kept, as mamba_ssm runs them")
    return cfg, notes


# ---- ModelConfig → config.json ---------------------------------------------------------------------------------


def hybridctl_block(cfg: ModelConfig) -> dict[str, Any]:
    """Init-only settings no HF field holds, so a round trip through HF keeps the config whole."""
    return {"format_version": 1, "init": {k: getattr(cfg.mamba, k) for k in _INIT_FIELDS}}


def nemotron_config(cfg: ModelConfig) -> dict[str, Any]:
    m, a = cfg.mamba, cfg.attention
    layer_types = [NEMOTRON_BLOCK_TYPES[s] for s in cfg.pattern]
    return {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "layers_block_type": layer_types, "hybrid_override_pattern": cfg.pattern,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": max(cfg.head_dim, 1),
        "attention_bias": False, "intermediate_size": cfg.mlp.hidden_size, "mlp_bias": False,
        "mlp_hidden_act": HF_MLP_ACT.get(cfg.mlp.activation, "relu2"),
        "mamba_num_heads": cfg.mamba_nheads, "mamba_head_dim": m.headdim, "n_groups": m.ngroups,
        "ssm_state_size": m.d_state, "conv_kernel": m.d_conv,
        # not read by transformers (the heads size the mixer); real releases write 2 where d_inner/hidden is no integer
        "expand": m.expand or 2, "chunk_size": m.chunk_size,
        "use_conv_bias": m.conv_bias, "use_bias": m.bias, "mamba_hidden_act": "silu",
        # time_step_min IS the clamp in NemotronH (0.0 = no clamp, Megatron's semantics); the upper bound is none.
        "time_step_min": m.dt_clamp_min, "time_step_max": m.dt_max, "time_step_floor": m.dt_init_floor,
        "time_step_limit": [m.dt_clamp_min, _json_float(math.inf)],
        "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": cfg.residual_in_fp32,
        "rescale_prenorm_residual": True, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "num_logits_to_keep": 1,
    }


def mamba2_config(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.mamba
    if cfg.d_inner % cfg.d_model:
        raise HybridctlError(f"cannot export to mamba2: transformers' Mamba2 sizes the mixer as expand*hidden_size, "
                             f"and d_inner = mamba_nheads*headdim = {cfg.d_inner} is not a multiple of d_model "
                             f"{cfg.d_model}; use --hf-arch nemotron_h")
    hi = math.inf if m.dt_clamp_max is None else m.dt_clamp_max
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_heads": cfg.mamba_nheads, "head_dim": m.headdim, "n_groups": m.ngroups, "state_size": m.d_state,
        "expand": cfg.d_inner // cfg.d_model, "conv_kernel": m.d_conv, "chunk_size": m.chunk_size,
        "use_bias": m.bias,
        "use_conv_bias": m.conv_bias, "hidden_act": "silu", "layer_norm_epsilon": cfg.norm_eps,
        "residual_in_fp32": cfg.residual_in_fp32, "time_step_rank": math.ceil(cfg.d_model / 16),
        "time_step_min": m.dt_min, "time_step_max": m.dt_max, "time_step_floor": m.dt_init_floor,
        "time_step_limit": [m.dt_clamp_min, _json_float(hi)], "rescale_prenorm_residual": False,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
    }
