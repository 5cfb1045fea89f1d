"""Megatron ``args`` (argparse.Namespace saved in every checkpoint) ⇄ ``ModelConfig``, and vocab padding.

Reading: sizes come from the saved args; the 2024 paper code had no ``mamba_*`` args, so Megatron's defaults then
apply (N 128, hd 64, ng 8). The layer pattern comes from the tensors present (the only ground truth) and is checked
against ``hybrid_override_pattern`` / ``hybrid_layer_pattern`` or the ratio flags (``allocate_pattern``). Megatron
applies no dt clamp, so ``dt_clamp_min = 0`` and ``dt_clamp_max = None``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from hybridctl.config import HybridctlError, ModelConfig, allocate_pattern, mamba_size, parse_pattern

MEGATRON_DEFAULT_DIVISIBLE_BY = 128
# Marker written by hybridctl: the model's own vocab size before the export padding (rows past it are our zeros).
HYBRIDCTL_VOCAB_ARG = "hybridctl_vocab_size"


def padded_vocab(vocab: int, tp: int, divisible_by: int = MEGATRON_DEFAULT_DIVISIBLE_BY) -> int:
    """Megatron's ``_vocab_size_with_padding``: round up to a multiple of divisible_by · tp."""
    m = divisible_by * tp
    return -(-vocab // m) * m


def _get(args: Any, name: str, default: Any = None) -> Any:
    v = getattr(args, name, default)
    return default if v is None else v


def _pattern_from_args(args: Any, n_layers: int) -> str | None:
    for name in ("hybrid_override_pattern", "hybrid_layer_pattern"):
        p = getattr(args, name, None)
        if p:
            return "".join(ch for ch in str(p) if ch != "|")  # '|' marks pipeline stages, not layers
    attn, mlp = getattr(args, "hybrid_attention_ratio", None), getattr(args, "hybrid_mlp_ratio", None)
    if attn is not None or mlp is not None:
        return allocate_pattern(n_layers, float(attn or 0.0), float(mlp or 0.0))
    return None


def config_from_args(args: Any, *, pattern: str, vocab: int, d_conv: int | None, where: str) -> ModelConfig:
    """The ModelConfig a Megatron checkpoint describes.

    pattern: layer kinds found in the tensors (checked against the args); vocab: the (padded) rows stored;
    d_conv: the conv kernel width found in a conv weight (None without Mamba layers).
    """
    if args is None:
        raise HybridctlError(f"{where}: the checkpoint carries no 'args'; hybridctl needs them to know the model")
    pattern = parse_pattern(pattern)
    n_layers = _get(args, "num_layers", len(pattern))
    if n_layers != len(pattern):
        raise HybridctlError(f"{where}: args.num_layers is {n_layers} but the checkpoint holds {len(pattern)} layers")
    declared = _pattern_from_args(args, n_layers)
    if declared is not None and parse_pattern(declared) != pattern:
        raise HybridctlError(f"{where}: the layer pattern in args ({declared}) differs from the layers the tensors "
                             f"describe ({pattern})")
    norm = str(_get(args, "normalization", "RMSNorm"))
    if norm != "RMSNorm" or _get(args, "apply_layernorm_1p", False):
        raise HybridctlError(f"{where}: normalization {norm}{' (1p)' if norm == 'RMSNorm' else ''} is not supported; "
                             "hybridctl models use RMSNorm")
    h = int(args.hidden_size)
    heads = int(_get(args, "num_attention_heads", 1))
    kv = int(_get(args, "num_query_groups", heads)) if _get(args, "group_query_attention", False) else heads
    head_dim = int(_get(args, "kv_channels", h // heads))
    hd, ng, n_state = int(_get(args, "mamba_head_dim", 64)), int(_get(args, "mamba_num_groups", 8)), \
        int(_get(args, "mamba_state_dim", 128))
    # megatron-core's MambaMixer: nheads = mamba_num_heads when given (d_inner = nheads*head_dim, any hidden size,
    # Nemotron-H-4B: 112 x 64 with hidden 3072), else d_inner = expand*hidden with expand 2.
    n_heads = _get(args, "mamba_num_heads", None)
    size = {"expand": 2, "nheads": None} if n_heads is None else mamba_size(h, int(n_heads), hd)
    act = "swiglu" if _get(args, "swiglu", False) else "relu2" if _get(args, "squared_relu", False) else "gelu"
    pos = str(_get(args, "position_embedding_type", "none"))
    if pos == "rope" and _get(args, "rotary_interleaved", False):
        raise HybridctlError(f"{where}: interleaved RoPE (rotary_interleaved) is not supported")
    position = "rope" if pos == "rope" else "none"
    return ModelConfig.from_dict(dict(
        vocab_size=vocab, d_model=h, pattern=pattern,
        mamba=dict(d_state=n_state, headdim=hd, ngroups=ng, **size, d_conv=d_conv or 4,
                   chunk_size=int(_get(args, "mamba_chunk_size", 128)), conv_bias=True, bias=False,
                   dt_clamp_min=0.0, dt_clamp_max=None),
        attention=dict(n_heads=heads, n_kv_heads=kv, head_dim=head_dim, position=position,
                       rope_base=float(_get(args, "rotary_base", 10000)),
                       rotary_fraction=float(_get(args, "rotary_percent", 1.0))),
        mlp=dict(hidden_size=int(_get(args, "ffn_hidden_size", 4 * h)), activation=act),
        norm_eps=float(_get(args, "norm_epsilon", 1e-5)),
        tie_embeddings=not _get(args, "untie_embeddings_and_output_weights", False),
    ))


def unpadded_vocab(args: Any, padded: int) -> int | None:
    """The tokenizer's vocab size when the args know it (``vocab_size``, set by ``--vocab-size`` or hybridctl)."""
    v = getattr(args, "vocab_size", None)
    return int(v) if isinstance(v, int) and 0 < v <= padded else None


def args_from_config(cfg: ModelConfig, *, padded: int, unpadded: int, tp: int, pp: int, ckpt_format: str,
                     dtype: torch.dtype) -> argparse.Namespace:
    """A Namespace with every field megatron-core needs to rebuild this model as a hybrid MambaModel."""
    a, m = cfg.attention, cfg.mamba
    if m.bias and "M" in cfg.pattern:
        raise HybridctlError("Megatron's Mamba mixer has no in_proj/out_proj bias; this model has mamba.bias = true")
    if not m.conv_bias and "M" in cfg.pattern:
        raise HybridctlError("Megatron's Mamba mixer always has a conv1d bias; this model has mamba.conv_bias = false")
    return argparse.Namespace(
        num_layers=cfg.n_layers, hidden_size=cfg.d_model, ffn_hidden_size=cfg.mlp.hidden_size,
        num_attention_heads=a.n_heads, group_query_attention=a.n_kv_heads != a.n_heads,
        num_query_groups=a.n_kv_heads, kv_channels=cfg.head_dim,
        is_hybrid_model=True, hybrid_override_pattern=cfg.pattern, hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0,
        mamba_state_dim=m.d_state, mamba_head_dim=m.headdim, mamba_num_groups=m.ngroups,
        mamba_num_heads=cfg.mamba_nheads, mamba_chunk_size=m.chunk_size,
        normalization="RMSNorm", norm_epsilon=cfg.norm_eps, apply_layernorm_1p=False,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        padded_vocab_size=padded, vocab_size=unpadded, make_vocab_size_divisible_by=MEGATRON_DEFAULT_DIVISIBLE_BY,
        swiglu=cfg.mlp.activation == "swiglu", squared_relu=cfg.mlp.activation == "relu2",
        position_embedding_type="rope" if a.position == "rope" else "none", add_position_embedding=False,
        rotary_percent=a.rotary_fraction, rotary_base=int(a.rope_base) if a.rope_base == int(a.rope_base)
        else a.rope_base,
        add_bias_linear=False, add_qkv_bias=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, ckpt_format=ckpt_format,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        consumed_train_samples=0, consumed_valid_samples=0, iteration=0,
        **{HYBRIDCTL_VOCAB_ARG: cfg.vocab_size},
    )
