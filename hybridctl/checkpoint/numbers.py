"""One typed check for the numbers a checkpoint's own config (HF ``config.json``, mamba_ssm ``config.json``, Megatron
``args``) carries, before any reader maps them: an integer field takes a true integer (not "64", 64.9, 2.5 or a bool),
a float field a finite number (not inf, nan or 1e400, which JSON reads as inf), and both lie in a sane range. A
null is accepted only where the format itself allows one; a list or an object where a number belongs is refused.
The error line names the file (``where``), the key and the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hybridctl.config import HybridctlError

INT_MAX = 2**31 - 1
# integer fields of the HF (NemotronH, Mamba2), mamba_ssm and Megatron configs hybridctl reads
INT_KEYS = frozenset({
    "hidden_size", "mamba_num_heads", "mamba_head_dim", "expand", "ssm_state_size", "n_groups", "conv_kernel",
    "chunk_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
    "num_hidden_layers", "num_heads", "state_size", "n_layer", "d_model", "d_state", "headdim", "ngroups", "d_conv",
    "pad_vocab_size_multiple", "num_query_groups", "kv_channels", "mamba_state_dim", "mamba_num_groups",
    "mamba_chunk_size", "ffn_hidden_size", "num_layers", "padded_vocab_size", "make_vocab_size_divisible_by",
    "hybridctl_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
})
FLOAT_KEYS = frozenset({
    "time_step_min", "time_step_max", "time_step_floor", "layer_norm_epsilon", "initializer_range", "rms_norm_eps",
    "rope_theta", "dt_min", "dt_max", "dt_init_floor", "rotary_base", "rotary_percent", "norm_epsilon",
    "hybrid_attention_ratio", "hybrid_mlp_ratio", "A_init_min", "A_init_max",
})
# integers that are sizes or counts: must be >= 1 (expand, heads, layers, ...); the rest must be >= 0
POSITIVE = INT_KEYS - {"pad_vocab_size_multiple"}


def _fail(where: str, key: str, value: Any, want: str) -> HybridctlError:
    shown = "null" if value is None else repr(value)
    if isinstance(value, (list, dict)):
        shown = f"a {'list' if isinstance(value, list) else 'table/object'}"
    return HybridctlError(f"{where}: {key} = {shown}: expected {want}")


def check_int(where: str, key: str, value: Any, *, lo: int = 0, hi: int = INT_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, key, value, "an integer")
    if not lo <= value <= hi:
        raise _fail(where, key, value, f"an integer in [{lo}, {hi}]")
    return value


def check_float(where: str, key: str, value: Any, *, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, key, value, "a number")
    if not math.isfinite(value):
        raise _fail(where, key, value, "a finite number")
    if not lo <= value <= hi:
        raise _fail(where, key, value, f"a number in [{lo:g}, {hi:g}]")
    return float(value)


# HF config keys whose null the readers replace by a default (others are read with int(c.get(k, default)))
HF_NULLABLE = frozenset({"num_key_value_heads", "head_dim", "pad_vocab_size_multiple", "attention_head_dim"})


def check_config_numbers(raw: Mapping[str, Any] | Any, where: str, *, nullable: frozenset[str] | None = None
                         ) -> None:
    """Check every known numeric key of a raw config (a dict, or an argparse Namespace), nested tables included
    (mamba_ssm's ``ssm_cfg``). nullable: keys that may be null (None: every key, as Megatron's args, where a null
    means Megatron's default)."""
    items = raw.items() if isinstance(raw, Mapping) else vars(raw).items() if hasattr(raw, "__dict__") else ()
    for key, value in items:
        if isinstance(value, Mapping) and key not in INT_KEYS | FLOAT_KEYS:
            check_config_numbers(value, f"{where}: {key}", nullable=nullable)
        elif value is None:
            if nullable is not None and key not in nullable and key in INT_KEYS | FLOAT_KEYS:
                raise _fail(where, key, value, "a number")
        elif key in INT_KEYS:
            check_int(where, key, value, lo=1 if key in POSITIVE else 0)
        elif key in FLOAT_KEYS:
            check_float(where, key, value)
