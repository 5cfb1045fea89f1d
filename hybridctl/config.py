"""Model configuration: small, typed, torch-free.

A model is one `ModelConfig`: sizes, the hybrid layer pattern in Megatron's alphabet (``M`` Mamba-2, ``*`` attention,
``-`` MLP) and one sub-config per mixer kind. Invariants are checked in ``__post_init__`` with messages that name the
field. Everything here is JSON-serialisable (``to_dict`` / ``from_dict``) so a checkpoint's ``config.json`` is the
whole truth about a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any


class HybridctlError(Exception):
    """An error the user can fix; the CLI prints its message as one line and exits 1."""


# --------------------------------------------------------------------------------------------------------------------
# Layer pattern
# --------------------------------------------------------------------------------------------------------------------

MAMBA, ATTENTION, MLP = "M", "*", "-"
LAYER_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp"}
_UNSUPPORTED = {
    "E": "MoE layers ('E') are not supported yet",
    "G": "gated DeltaNet layers ('G') are not supported yet",
    "|": "pipeline boundaries ('|') are not part of a model definition; hybridctl places stages itself",
    "/": "multi-token-prediction layers ('/') are not supported yet",
}


def parse_pattern(pattern: str) -> str:
    """Validate a layer pattern in Megatron's alphabet and return it (whitespace removed)."""
    p = "".join(pattern.split())
    if not p:
        raise HybridctlError("pattern: empty layer pattern; use M (Mamba-2), * (attention) and - (MLP)")
    for i, ch in enumerate(p):
        if ch in LAYER_NAMES:
            continue
        why = _UNSUPPORTED.get(ch, f"unknown layer symbol {ch!r}")
        raise HybridctlError(f"pattern: {why} (position {i} of {p!r}); supported symbols are M, * and -")
    return p


def allocate_pattern(n_layers: int, attention_ratio: float, mlp_ratio: float) -> str:
    """Megatron's ratio allocation (``--hybrid-attention-ratio``/``--hybrid-mlp-ratio``) as one function.

    Attention layers are spread evenly over the L slots with a running counter that starts at
    ``(L - n_attn) / (n_attn + 1)``: a ``*`` is placed whenever the counter is below 0.5 (and the section length is
    added back), otherwise the counter drops by one. MLP layers then replace Mamba slots the same way with the ratio
    ``(n_mamba - n_mlp) / n_mlp``. Reproduces the paper's 56- and 48-layer patterns exactly.
    """
    if n_layers <= 0:
        raise HybridctlError(f"layers: must be positive, got {n_layers}")
    for name, r in (("attention_ratio", attention_ratio), ("mlp_ratio", mlp_ratio)):
        if not 0.0 <= r <= 1.0:
            raise HybridctlError(f"{name}: must be within [0, 1], got {r}")
    if attention_ratio + mlp_ratio > 1.0:
        raise HybridctlError(f"attention_ratio + mlp_ratio must be <= 1, got {attention_ratio + mlp_ratio}")
    n_attn = round(n_layers * attention_ratio)
    n_mlp = round(n_layers * mlp_ratio)
    if n_attn + n_mlp > n_layers:  # each count is rounded on its own
        raise HybridctlError(f"{n_layers} layers cannot hold {n_attn} attention + {n_mlp} MLP layers "
                             f"(ratios {attention_ratio} and {mlp_ratio} round up past the total)")
    layers = [MAMBA] * n_layers
    if n_attn > 0:
        section = (n_layers - n_attn) / (n_attn + 1)
        counter = section
        for i in range(n_layers):
            if counter < 0.5:
                layers[i] = ATTENTION
                counter += section
            else:
                counter -= 1
    n_mamba = n_layers - n_attn
    if n_mlp > 0:
        ratio = (n_mamba - n_mlp) / n_mlp
        counter = ratio
        for i in range(n_layers):
            if layers[i] != MAMBA:
                continue
            if counter < 0.5:
                layers[i] = MLP
                counter += ratio
            else:
                counter -= 1
    return "".join(layers)


# --------------------------------------------------------------------------------------------------------------------
# Config dataclasses
# --------------------------------------------------------------------------------------------------------------------


def _positive(owner: str, **values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise HybridctlError(f"{owner}.{name}: must be a positive integer, got {v!r}")


@dataclass
class MambaConfig:
    """Mamba-2 mixer. ``d_inner = nheads * headdim``; heads are contiguous per group.

    ``nheads`` is the size of record. ``None`` derives it as ``expand * d_model / headdim`` (the Mamba papers'
    convention, and every preset's); real NemotronH models break that rule (Nemotron-H-4B: d_model 3072, 112 heads x 64
    = 7168), so readers set ``nheads`` and ``expand`` becomes derived: ``d_inner / d_model`` where that is an integer,
    else ``None``.
    """

    d_state: int = 128  # N
    headdim: int = 64  # P
    ngroups: int = 8  # G
    expand: int | None = 2  # only read when nheads is None
    nheads: int | None = None  # H; None: expand * d_model / headdim
    d_conv: int = 4  # K
    chunk_size: int = 128  # Q
    conv_bias: bool = True
    bias: bool = False  # bias on in_proj/out_proj
    dt_min: float = 1e-3  # dt init range (log-uniform)
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_clamp_min: float = 0.0  # clamp of softplus(dt + dt_bias); NemotronH uses time_step_min, Megatron 0
    dt_clamp_max: float | None = None  # None: unbounded
    A_init_min: float = 1.0  # A = -exp(A_log), A_log init from log-uniform [A_init_min, A_init_max]
    A_init_max: float = 16.0

    def __post_init__(self) -> None:
        _positive("mamba", d_state=self.d_state, headdim=self.headdim, ngroups=self.ngroups,
                  d_conv=self.d_conv, chunk_size=self.chunk_size)
        if self.nheads is None:
            if self.expand is None:
                raise HybridctlError("mamba.expand: set mamba.expand or mamba.nheads (both are none)")
            _positive("mamba", expand=self.expand)
        else:
            _positive("mamba", nheads=self.nheads)
        if not 0 < self.dt_min <= self.dt_max:
            raise HybridctlError(f"mamba.dt_min/dt_max: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if not 0 < self.A_init_min <= self.A_init_max:
            raise HybridctlError(f"mamba.A_init_min/A_init_max: need 0 < min <= max, got "
                                 f"{self.A_init_min}, {self.A_init_max}")
        if self.dt_clamp_max is not None and self.dt_clamp_max < self.dt_clamp_min:
            raise HybridctlError("mamba.dt_clamp_max: must be >= dt_clamp_min")


@dataclass
class AttentionConfig:
    n_heads: int = 32  # A query heads
    n_kv_heads: int = 8  # KV groups (GQA); = n_heads for MHA
    head_dim: int | None = None  # None: d_model // n_heads
    position: str = "none"  # "none" (NoPE, the paper's hybrid) | "rope"
    rope_base: float = 10000.0
    rotary_fraction: float = 1.0  # fraction of head_dim rotated (the paper's Transformer: 0.5)

    def __post_init__(self) -> None:
        _positive("attention", n_heads=self.n_heads, n_kv_heads=self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise HybridctlError(f"attention.n_kv_heads: n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                                 f"({self.n_kv_heads})")
        if self.head_dim is not None:
            _positive("attention", head_dim=self.head_dim)
        if self.position not in ("none", "rope"):
            raise HybridctlError(f"attention.position: must be 'none' or 'rope', got {self.position!r}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise HybridctlError(f"attention.rotary_fraction: must be in (0, 1], got {self.rotary_fraction}")


MLP_ACTIVATIONS = ("gelu", "relu2", "swiglu")


@dataclass
class MLPConfig:
    hidden_size: int = 16384  # F
    activation: str = "gelu"  # gelu (the paper's hybrid) | relu2 (squared ReLU) | swiglu (gated)

    def __post_init__(self) -> None:
        _positive("mlp", hidden_size=self.hidden_size)
        if self.activation not in MLP_ACTIVATIONS:
            raise HybridctlError(f"mlp.activation: must be one of {', '.join(MLP_ACTIVATIONS)}, "
                                 f"got {self.activation!r}")


@dataclass
class ModelConfig:
    vocab_size: int = 256000
    d_model: int = 4096
    pattern: str = "M"
    mamba: MambaConfig = field(default_factory=MambaConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    residual_in_fp32: bool = False  # documentation of intent for exports; the residual stream follows the dtype
    # the longest sequence length the weights were trained at (train's export records it; extend-context reads it);
    # None: not recorded. Informational: nothing in the model depends on it (NoPE attention, recurrent SSM).
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        for name, cls in (("mamba", MambaConfig), ("attention", AttentionConfig), ("mlp", MLPConfig)):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, _from_dict(cls, v, name))
        _positive("model", vocab_size=self.vocab_size, d_model=self.d_model)
        if self.max_seq_len is not None:
            _positive("model", max_seq_len=self.max_seq_len)
        self.pattern = parse_pattern(self.pattern)
        if self.norm != "rmsnorm":
            raise HybridctlError(f"model.norm: only 'rmsnorm' is supported, got {self.norm!r}")
        if not self.norm_eps > 0:
            raise HybridctlError(f"model.norm_eps: must be positive, got {self.norm_eps}")
        if not self.init_std > 0:
            raise HybridctlError(f"model.init_std: must be positive, got {self.init_std}")
        if MAMBA in self.pattern:
            m = self.mamba
            if m.nheads is None and (m.expand * self.d_model) % m.headdim:
                raise HybridctlError(f"mamba.headdim: expand*d_model = {m.expand * self.d_model} is not divisible "
                                     f"by headdim {m.headdim}; set mamba.nheads explicitly")
            if m.nheads is not None:  # expand is derived from the heads
                m.expand = self.d_inner // self.d_model if self.d_inner % self.d_model == 0 else None
            if self.mamba_nheads % m.ngroups:
                raise HybridctlError(f"mamba.ngroups: nheads ({self.mamba_nheads}) must be divisible by ngroups "
                                     f"({m.ngroups})")
        if ATTENTION in self.pattern and self.attention.head_dim is None and self.d_model % self.attention.n_heads:
            raise HybridctlError(f"attention.n_heads: d_model ({self.d_model}) is not divisible by n_heads "
                                 f"({self.attention.n_heads}); set attention.head_dim explicitly")
        if ATTENTION in self.pattern and self.attention.position == "rope":
            rot = self.attention.rotary_fraction * self.head_dim
            if rot != int(rot) or int(rot) % 2:
                raise HybridctlError(f"attention.rotary_fraction: rotary_fraction*head_dim ({rot}) must be an even "
                                     "integer")

    # ---- derived sizes ------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_nheads(self) -> int:
        """H: ``mamba.nheads``, or ``expand * d_model / headdim`` when that is not set."""
        m = self.mamba
        if m.nheads is not None:
            return m.nheads
        return m.expand * self.d_model // m.headdim

    @property
    def d_inner(self) -> int:
        """Width of the Mamba mixer's x / z / y: ``mamba_nheads * headdim``."""
        return self.mamba_nheads * self.mamba.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: [x, B, C]."""
        return self.d_inner + 2 * self.mamba.ngroups * self.mamba.d_state

    @property
    def in_proj_dim(self) -> int:
        """Rows of in_proj: [z, x, B, C, dt]."""
        return 2 * self.d_inner + 2 * self.mamba.ngroups * self.mamba.d_state + self.mamba_nheads

    @property
    def head_dim(self) -> int:
        a = self.attention
        return a.head_dim if a.head_dim is not None else self.d_model // a.n_heads

    def layer_counts(self) -> dict[str, int]:
        return {LAYER_NAMES[s]: self.pattern.count(s) for s in (MAMBA, ATTENTION, MLP)}

    # ---- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d, "model")

    def replace(self, **changes: Any) -> "ModelConfig":
        d = self.to_dict()
        d.update(changes)
        return ModelConfig.from_dict(d)


def _from_dict(cls: type, d: dict[str, Any], owner: str) -> Any:
    if not isinstance(d, dict):
        raise HybridctlError(f"{owner}: expected a table/object, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {owner}.{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
        raise HybridctlError(f"{owner}.{k}: unknown key{hint}")
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, (dict, hints[k])):
                raise HybridctlError(f"{owner}.{k}: expected a table/object, got {v!r}")
        else:
            _check_type(f"{owner}.{k}", v, hints[k])
    return cls(**d)


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _check_type(where: str, value: Any, hint: Any) -> None:
    """A config value must have its field's type: bool is only True/False (never 'no'), an int field takes no float,
    a float field takes ints too, ``X | None`` takes None. Nested dataclass fields are checked by their own class."""
    args = typing.get_args(hint) or (hint,)
    allowed = tuple(a for a in args if a in (int, float, bool, str, type(None)))
    if not allowed:  # a nested dataclass or a container: checked elsewhere
        return
    ok = any(
        (a is bool and isinstance(value, bool))
        or (a is int and isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53)
        or (a is float and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
        or (a is str and isinstance(value, str))
        or (a is type(None) and value is None)
        for a in allowed)
    if not ok:
        if isinstance(value, float) and not math.isfinite(value):
            raise HybridctlError(f"{where}: expected a finite number, got {value!r}")
        names = " or ".join("none" if a is type(None) else a.__name__ for a in allowed)
        raise HybridctlError(f"{where}: expected {names}, got {value!r}")


# --------------------------------------------------------------------------------------------------------------------
# Overrides: --set key=value
# --------------------------------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """Parse an override value: TOML scalar syntax where it parses (numbers, true/false, quoted strings), else str."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        low = text.strip().lower()
        if low in ("none", "null"):
            return None
        return text


def apply_overrides(d: dict[str, Any], overrides: list[str], owner: str = "") -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (in place, and returned). Keys must already exist."""
    for item in overrides:
        if "=" not in item:
            raise HybridctlError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for i, part in enumerate(parts):
            path = ".".join(filter(None, [owner] + parts[: i + 1]))
            if not isinstance(node, dict) or part not in node:
                valid = list(node) if isinstance(node, dict) else []
                close = difflib.get_close_matches(part, valid, n=1)
                hint = f"; did you mean {'.'.join(parts[:i] + [close[0]])}?" if close else (
                    f"; valid keys: {', '.join(valid)}" if valid else "")
                raise HybridctlError(f"--set {key}: unknown key {path!r}{hint}")
            if i == len(parts) - 1:
                node[part] = parse_value(value)
            else:
                node = node[part]
    return d


# --------------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------------

HYBRID_8B_PATTERN = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
PAPER_ATTENTION_RATIO = 0.08
PAPER_MLP_RATIO = 0.5


def _hybrid(d_model: int, n_layers: int, *, vocab: int = 50304, heads: int, kv: int, ngroups: int = 8,
            d_state: int = 128, headdim: int = 64) -> dict[str, Any]:
    return dict(
        vocab_size=vocab, d_model=d_model,
        pattern=allocate_pattern(n_layers, PAPER_ATTENTION_RATIO, PAPER_MLP_RATIO),
        mamba=dict(d_state=d_state, headdim=headdim, ngroups=ngroups),
        attention=dict(n_heads=heads, n_kv_heads=kv, head_dim=d_model // heads),
        mlp=dict(hidden_size=4 * d_model, activation="gelu"), tie_embeddings=True,
    )


_PAPER_MAMBA = dict(d_state=128, headdim=64, ngroups=8, expand=2, d_conv=4, chunk_size=128)
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's three 8B models (arXiv 2406.07887, Megatron-LM examples/mamba).
    "hybrid-8b": dict(vocab_size=256000, d_model=4096, pattern=HYBRID_8B_PATTERN, mamba=_PAPER_MAMBA,
                      attention=dict(n_heads=32, n_kv_heads=8, head_dim=128),
                      mlp=dict(hidden_size=16384, activation="gelu")),
    "mamba2-8b": dict(vocab_size=256000, d_model=4096, pattern="M" * 56, mamba=_PAPER_MAMBA),
    # LayerNorm-1p of the paper's Transformer is represented as RMSNorm here (hybridctl supports rmsnorm only).
    "transformer-8b": dict(vocab_size=256000, d_model=4096, pattern="*-" * 32,
                           attention=dict(n_heads=32, n_kv_heads=32, head_dim=128, position="rope",
                                          rotary_fraction=0.5),
                           mlp=dict(hidden_size=16384, activation="relu2")),
    # ~1M parameters: CPU tests and the embedded default recipe (byte-level tokenizer fits in 384 ids).
    "tiny": dict(vocab_size=384, d_model=128, pattern="M-M*-M-M",
                 mamba=dict(d_state=16, headdim=32, ngroups=2, chunk_size=32),
                 attention=dict(n_heads=4, n_kv_heads=2, head_dim=32),
                 mlp=dict(hidden_size=512, activation="gelu")),
    # A ladder of hybrids allocated with the paper's ratios (8% attention, 50% MLP), tied embeddings (as the Mamba
    # papers' small models), GPT-NeoX-sized vocab: 130M, 372M, 1.31B, 2.74B parameters.
    "hybrid-130m": _hybrid(768, 20, heads=12, kv=4),
    "hybrid-370m": _hybrid(1024, 40, heads=16, kv=8),
    "hybrid-1.3b": _hybrid(2048, 40, heads=16, kv=8),
    "hybrid-2.7b": _hybrid(2560, 56, heads=20, kv=4),
    # The paper's Transformer recipe (MHA, RoPE on half the head dim, squared-ReLU MLP 4·h) at hybrid-1.3b's size:
    # 24 × (attention + MLP) at d_model 2048 (GPT-3 XL's shape), same vocab and tying: 1.311B vs 1.314B parameters.
    "transformer-1.3b": dict(vocab_size=50304, d_model=2048, pattern="*-" * 24, tie_embeddings=True,
                             attention=dict(n_heads=16, n_kv_heads=16, head_dim=128, position="rope",
                                            rotary_fraction=0.5),
                             mlp=dict(hidden_size=8192, activation="relu2")),
}


def preset(name: str) -> ModelConfig:
    """Look a preset up by exact name."""
    if name not in PRESETS:
        raise HybridctlError(f"preset {name!r} is unknown; valid presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name])


def preset_dict(name: str) -> dict[str, Any]:
    """A preset as a complete nested dict (every field present), for overriding."""
    return preset(name).to_dict()


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (any alias canonical_dtype accepts)."""
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[canonical_dtype(dtype)]


DTYPES = ("float32", "bfloat16", "float16")


def canonical_dtype(dtype: str) -> str:
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    d = aliases.get(dtype, dtype)
    if d not in DTYPES + ("float64",):
        raise HybridctlError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    return d


def mamba_size(d_model: int, nheads: int, headdim: int) -> dict[str, Any]:
    """The MambaConfig size fields for ``nheads`` heads of ``headdim``: ``expand`` alone where d_inner is an integer
    multiple of d_model that headdim divides (the canonical form every preset has), else ``nheads`` explicitly."""
    d_inner = nheads * headdim
    if d_inner % d_model == 0 and (d_inner // d_model * d_model) // headdim == nheads:
        return {"expand": d_inner // d_model, "nheads": None}
    return {"expand": None, "nheads": nheads}


__all__ = [
    "HybridctlError", "ModelConfig", "MambaConfig", "AttentionConfig", "MLPConfig", "parse_pattern",
    "allocate_pattern", "PRESETS", "preset", "apply_overrides", "mamba_size",
]
