"""Megatron-LM ⇄ native name table, with paired forward/inverse transforms (FORMATS.md §3–4).

Three views of the same weights:

1. native: hybridctl state-dict names (``layers.{i}.mixer.in_proj.weight`` ...).
2. Megatron *global*: Megatron key names at TP = 1 with global layer indices (``decoder.layers.{i}.…``). One
   :class:`Entry` per Megatron key says which native tensors it packs (``linear_qkv`` = q/k/v interleaved per KV
   group; swiglu ``linear_fc1`` = [gate, up]) and how (``pack`` / ``unpack``, exact inverses).
3. Megatron *sharded*: per-rank slices of a global tensor (legacy files) — :func:`tp_split` / :func:`tp_merge`,
   exact inverses driven by the entry's :class:`Split` (dim + global component sizes: ``in_proj`` =
   [z, x, B, C, dt], ``conv1d`` = [x, B, C], each component split across ranks separately) — or, in torch_dist,
   Mamba's fused tensors stored per component under ``<key>.z`` … (:func:`dist_split` / :func:`dist_merge`).

Key styles: ``current`` (megatron-core with Transformer Engine: the Mamba pre-norm fused into
``mixer.in_proj.layer_norm_weight``, conv parameters ``mixer.conv1d_weight`` / ``conv1d_bias``) and ``2024`` (the
paper's checkpoints: ``decoder.layers.{i}.norm.weight`` and ``mixer.conv1d.weight``). Readers accept every alias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybridctl.config import ATTENTION, MAMBA, MLP, HybridctlError, ModelConfig

Tensor = torch.Tensor
KEY_STYLES = ("current", "2024")
EXTRA_STATE = "_extra_state"


@dataclass(frozen=True)
class Split:
    """How a tensor is sharded across TP ranks: along ``dim``, each of the global ``sizes`` split separately
    (rank r holds cat of every component's r-th chunk). One size = a plain contiguous split."""

    dim: int
    sizes: tuple[int, ...]


@dataclass
class Entry:
    """One Megatron tensor: its key (global layer index), the native tensors it is made of, TP split rule
    (None: replicated), packing (None: identity of a single native tensor), and torch_dist component names."""

    key: str
    natives: tuple[str, ...]
    shape: tuple[int, ...]
    split: Split | None
    pack: Callable[[list[Tensor]], Tensor] | None = None
    unpack: Callable[[Tensor], list[Tensor]] | None = None
    dist_parts: tuple[str, ...] = ()
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def to_megatron(self, tensors: list[Tensor]) -> Tensor:
        return self.pack(tensors) if self.pack else tensors[0]

    def to_native(self, t: Tensor) -> list[Tensor]:
        return self.unpack(t) if self.unpack else [t]


# ---- TP sharding (legacy per-rank files) ---------------------------------------------------------------------------


def tp_split(t: Tensor, split: Split | None, tp: int) -> list[Tensor]:
    """Global tensor → tp rank-local tensors (contiguous copies). Inverse of :func:`tp_merge`."""
    if split is None:
        return [t.clone() for _ in range(tp)]
    comps = torch.split(t, list(split.sizes), dim=split.dim)
    per_comp = [torch.chunk(c, tp, dim=split.dim) for c in comps]
    return [torch.cat([pc[r] for pc in per_comp], dim=split.dim).contiguous() for r in range(tp)]


def tp_slice(t: Tensor, split: Split | None, tp: int, rank: int) -> Tensor:
    """Only rank ``rank``'s slice of :func:`tp_split` (no copies of the other ranks' slices)."""
    if split is None:
        return t.clone()
    comps = torch.split(t, list(split.sizes), dim=split.dim)
    return torch.cat([torch.chunk(c, tp, dim=split.dim)[rank] for c in comps], dim=split.dim).contiguous()


def tp_merge(parts: list[Tensor], split: Split | None) -> Tensor:
    """Rank-local tensors → the global tensor, de-interleaving per component. Inverse of :func:`tp_split`."""
    if split is None:
        return parts[0]
    tp = len(parts)
    local = [s // tp for s in split.sizes]
    per_rank = [torch.split(p, local, dim=split.dim) for p in parts]
    return torch.cat([torch.cat([pr[c] for pr in per_rank], dim=split.dim) for c in range(len(local))],
                     dim=split.dim)


# ---- torch_dist component keys -------------------------------------------------------------------------------------


def dist_split(entry: Entry, t: Tensor) -> dict[str, Tensor]:
    """Global fused tensor → {``key.part``: component}. Entries without parts map to themselves."""
    if not entry.dist_parts:
        return {entry.key: t}
    comps = torch.split(t, list(entry.split.sizes), dim=entry.split.dim)
    return {f"{entry.key}.{p}": c.contiguous() for p, c in zip(entry.dist_parts, comps)}


def dist_merge(entry: Entry, parts: dict[str, Tensor]) -> Tensor:
    """Inverse of :func:`dist_split`."""
    if not entry.dist_parts:
        return parts[entry.key]
    return torch.cat([parts[f"{entry.key}.{p}"] for p in entry.dist_parts], dim=entry.split.dim)


def dist_keys(entry: Entry) -> list[str]:
    return [f"{entry.key}.{p}" for p in entry.dist_parts] if entry.dist_parts else [entry.key]


# ---- packing of attention / swiglu ---------------------------------------------------------------------------------


def _qkv_pack(cfg: ModelConfig) -> tuple[Callable, Callable]:
    """linear_qkv rows are grouped per KV group g: the A/G query heads of g, then k_g, then v_g (dh rows each)."""
    a, dh = cfg.attention, cfg.head_dim
    G, qpg = a.n_kv_heads, a.n_heads // a.n_kv_heads

    def pack(ts: list[Tensor]) -> Tensor:
        q, k, v = ts
        D = q.shape[1]
        return torch.cat([q.reshape(G, qpg * dh, D), k.reshape(G, dh, D), v.reshape(G, dh, D)], dim=1
                         ).reshape(G * (qpg + 2) * dh, D)

    def unpack(t: Tensor) -> list[Tensor]:
        D = t.shape[1]
        q, k, v = torch.split(t.reshape(G, (qpg + 2) * dh, D), [qpg * dh, dh, dh], dim=1)
        return [q.reshape(-1, D).contiguous(), k.reshape(-1, D).contiguous(), v.reshape(-1, D).contiguous()]

    return pack, unpack


def _cat_pack(sizes: list[int]) -> tuple[Callable, Callable]:
    return (lambda ts: torch.cat(ts, dim=0)), (lambda t: [c.contiguous() for c in torch.split(t, sizes, dim=0)])


def _vocab_pack(v_native: int, v_megatron: int) -> tuple[Callable | None, Callable | None]:
    """Megatron pads the vocab: rows [v_native, v_megatron) are zero on export and dropped on import."""
    if v_native == v_megatron:
        return None, None
    if v_native > v_megatron:
        raise HybridctlError(f"vocab: the Megatron vocab ({v_megatron}) is smaller than the model's ({v_native})")

    def pack(ts: list[Tensor]) -> Tensor:
        t = ts[0]
        return torch.cat([t, t.new_zeros(v_megatron - v_native, *t.shape[1:])], dim=0)

    return pack, (lambda t: [t[:v_native].contiguous()])


# ---- the table -----------------------------------------------------------------------------------------------------


def _mamba_entries(cfg: ModelConfig, i: int, style: str) -> list[Entry]:
    m, D = cfg.mamba, cfg.d_model
    di, gn, H, K = cfg.d_inner, m.ngroups * m.d_state, cfg.mamba_nheads, m.d_conv
    p, n = f"decoder.layers.{i}.", f"layers.{i}."
    norm_new, norm_2024 = p + "mixer.in_proj.layer_norm_weight", p + "norm.weight"
    conv_new = {"weight": p + "mixer.conv1d_weight", "bias": p + "mixer.conv1d_bias"}
    conv_old = {"weight": p + "mixer.conv1d.weight", "bias": p + "mixer.conv1d.bias"}
    # torch_dist ("dist") keeps the fused norm but the pre-0.19 conv names (megatron-core maps them back).
    conv = conv_new if style == "current" else conv_old
    conv_alias = conv_old if style == "current" else conv_new
    norm, norm_alias = (norm_2024, norm_new) if style == "2024" else (norm_new, norm_2024)
    xbc = Split(0, (di, gn, gn))
    out = [
        Entry(norm, (n + "norm.weight",), (D,), None, aliases=(norm_alias,)),
        Entry(p + "mixer.in_proj.weight", (n + "mixer.in_proj.weight",), (cfg.in_proj_dim, D),
              Split(0, (di, di, gn, gn, H)), dist_parts=("z", "x", "B", "C", "dt")),
        Entry(conv["weight"], (n + "mixer.conv1d.weight",), (cfg.conv_dim, 1, K), xbc, dist_parts=("x", "B", "C"),
              aliases=(conv_alias["weight"],)),
    ]
    if m.conv_bias:
        out.append(Entry(conv["bias"], (n + "mixer.conv1d.bias",), (cfg.conv_dim,), xbc, dist_parts=("x", "B", "C"),
                         aliases=(conv_alias["bias"],)))
    for name in ("dt_bias", "A_log", "D"):
        out.append(Entry(p + f"mixer.{name}", (n + f"mixer.{name}",), (H,), Split(0, (H,))))
    out.append(Entry(p + "mixer.norm.weight", (n + "mixer.norm.weight",), (di,), Split(0, (di,))))
    out.append(Entry(p + "mixer.out_proj.weight", (n + "mixer.out_proj.weight",), (D, di), Split(1, (di,))))
    return out


def _attention_entries(cfg: ModelConfig, i: int) -> list[Entry]:
    a, dh, D = cfg.attention, cfg.head_dim, cfg.d_model
    p, n = f"decoder.layers.{i}.self_attention.", f"layers.{i}."
    pack, unpack = _qkv_pack(cfg)
    rows = (a.n_heads + 2 * a.n_kv_heads) * dh
    return [
        Entry(p + "linear_qkv.layer_norm_weight", (n + "norm.weight",), (D,), None,
              aliases=(f"decoder.layers.{i}.input_layernorm.weight",)),
        Entry(p + "linear_qkv.weight", tuple(n + f"mixer.{x}_proj.weight" for x in "qkv"), (rows, D),
              Split(0, (rows,)), pack, unpack),
        Entry(p + "linear_proj.weight", (n + "mixer.o_proj.weight",), (D, a.n_heads * dh), Split(1, (a.n_heads * dh,))),
    ]


def _mlp_entries(cfg: ModelConfig, i: int) -> list[Entry]:
    F, D = cfg.mlp.hidden_size, cfg.d_model
    p, n = f"decoder.layers.{i}.mlp.", f"layers.{i}."
    if cfg.mlp.activation == "swiglu":
        # Megatron's gated unit: fc1 output = [gate, up], act(gate) * up; each half split across ranks separately.
        pack, unpack = _cat_pack([F, F])
        fc1 = Entry(p + "linear_fc1.weight", (n + "mixer.gate_proj.weight", n + "mixer.up_proj.weight"), (2 * F, D),
                    Split(0, (F, F)), pack, unpack)
    else:
        fc1 = Entry(p + "linear_fc1.weight", (n + "mixer.up_proj.weight",), (F, D), Split(0, (F,)))
    return [
        Entry(p + "linear_fc1.layer_norm_weight", (n + "norm.weight",), (D,), None,
              aliases=(f"decoder.layers.{i}.pre_mlp_layernorm.weight",)),
        fc1,
        Entry(p + "linear_fc2.weight", (n + "mixer.down_proj.weight",), (D, F), Split(1, (F,))),
    ]


def layer_entries(cfg: ModelConfig, i: int, style: str = "current") -> list[Entry]:
    kind = cfg.pattern[i]
    if kind == MAMBA:
        return _mamba_entries(cfg, i, style)
    if kind == ATTENTION:
        return _attention_entries(cfg, i)
    return _mlp_entries(cfg, i)


def embedding_entries(cfg: ModelConfig, padded_vocab: int) -> list[Entry]:
    pack, unpack = _vocab_pack(cfg.vocab_size, padded_vocab)
    return [Entry("embedding.word_embeddings.weight", ("embed.weight",), (padded_vocab, cfg.d_model),
                  Split(0, (padded_vocab,)), pack, unpack)]


def head_entries(cfg: ModelConfig, padded_vocab: int, *, tied_copy: bool = False) -> list[Entry]:
    """Final norm and output layer. ``tied_copy``: a tied model's last pipeline stage still holds
    ``output_layer.weight`` (a copy of the embedding), which Megatron loads strictly."""
    out = [Entry("decoder.final_norm.weight", ("norm_f.weight",), (cfg.d_model,), None,
                 aliases=("decoder.final_layernorm.weight",))]
    if not cfg.tie_embeddings or tied_copy:
        pack, unpack = _vocab_pack(cfg.vocab_size, padded_vocab)
        src = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
        out.append(Entry("output_layer.weight", (src,), (padded_vocab, cfg.d_model), Split(0, (padded_vocab,)),
                         pack, unpack))
    return out


def all_entries(cfg: ModelConfig, padded_vocab: int, style: str = "current") -> list[Entry]:
    """Every Megatron tensor of the model (TP = PP = 1, global layer indices)."""
    out = embedding_entries(cfg, padded_vocab)
    for i in range(cfg.n_layers):
        out += layer_entries(cfg, i, style)
    return out + head_entries(cfg, padded_vocab)


def extra_state_keys(cfg: ModelConfig, i: int) -> list[str]:
    """Modules of layer i whose ``_extra_state`` a megatron-core HybridModel may ask for on a strict load: every
    linear (local ``ColumnParallelLinear`` / ``RowParallelLinear`` and their Transformer Engine twins), TE's core
    attention and TE norms (the Mamba gated norm). A superset: entries a spec does not ask for are ignored."""
    p = f"decoder.layers.{i}."
    mods = {MAMBA: ["mixer.in_proj", "mixer.out_proj", "mixer.norm"],
            ATTENTION: ["self_attention.linear_qkv", "self_attention.linear_proj", "self_attention.core_attention"],
            MLP: ["mlp.linear_fc1", "mlp.linear_fc2"]}[cfg.pattern[i]]
    return [f"{p}{m}.{EXTRA_STATE}" for m in mods]


def head_extra_state_keys() -> list[str]:
    """The final norm (a TE norm in the TE spec) and the output layer (present even when tied: its weight is then
    the embedding, but the module and its extra state exist on the last pipeline stage)."""
    return [f"decoder.final_norm.{EXTRA_STATE}", f"output_layer.{EXTRA_STATE}"]


def layer_kind_of_keys(keys: list[str]) -> str | None:
    """The layer kind a set of Megatron keys (suffixes after ``decoder.layers.{i}.``) describes."""
    if any(k.startswith("mixer.") for k in keys):
        return MAMBA
    if any(k.startswith("self_attention.") for k in keys):
        return ATTENTION
    if any(k.startswith("mlp.") for k in keys):
        return MLP
    return None


def validate_tp(cfg: ModelConfig, tp: int, padded_vocab: int) -> None:
    """Megatron's divisibility rules for tensor parallelism, as clear errors."""
    if tp < 1:
        raise HybridctlError(f"--tp must be >= 1, got {tp}")
    checks = [("vocab (padded)", padded_vocab)]
    if MAMBA in cfg.pattern:
        checks += [("mamba heads", cfg.mamba_nheads), ("mamba.ngroups", cfg.mamba.ngroups)]
    if ATTENTION in cfg.pattern:
        checks += [("attention.n_heads", cfg.attention.n_heads), ("attention.n_kv_heads", cfg.attention.n_kv_heads)]
    if MLP in cfg.pattern:
        checks += [("mlp.hidden_size", cfg.mlp.hidden_size)]
    for what, n in checks:
        if n % tp:
            raise HybridctlError(f"--tp {tp}: {what} ({n}) is not divisible by the tensor-parallel size")
