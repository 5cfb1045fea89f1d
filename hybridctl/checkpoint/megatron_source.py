"""From a Megatron *global* tensor view (keys at TP = 1, global layer indices) to a native ``Source``.

Both readers (legacy per-rank files, torch_dist) reduce their format to ``mspecs`` {Megatron key: (global shape,
dtype)} and ``mget(key, split) -> global tensor``; this module infers the config, matches every key to the name
table strictly (a missing or unexpected tensor is one clear error) and exposes the weights under native names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from hybridctl.checkpoint.io import find_tokenizer_dir
from hybridctl.checkpoint.megatron_args import HYBRIDCTL_VOCAB_ARG, config_from_args, unpadded_vocab
from hybridctl.checkpoint.megatron_keys import EXTRA_STATE, Entry, Split, all_entries, layer_kind_of_keys
from hybridctl.checkpoint.numbers import check_config_numbers
from hybridctl.checkpoint.source import Source, TensorSpec, check_specs
from hybridctl.config import HybridctlError, ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_REPLICATED = ("layer_norm_weight", "final_norm.weight", "final_layernorm.weight", "input_layernorm.weight",
               "pre_mlp_layernorm.weight")
_DIM1 = ("out_proj.weight", "linear_proj.weight", "linear_fc2.weight")


def tp_dim_of_key(key: str) -> int | None:
    """Megatron's TP split dim from the key alone (None: replicated), for shape bookkeeping before the config is
    known; the component-aware split of fused tensors comes later from the name table."""
    m = _LAYER.match(key)
    suffix = m.group(2) if m else key
    if suffix.endswith(_REPLICATED) or suffix == "norm.weight":
        return None
    return 1 if suffix.endswith(_DIM1) else 0


def is_weight_key(key: str) -> bool:
    """Model tensors (not optimizer, RNG or Transformer Engine extra state)."""
    return key.startswith(("embedding.", "decoder.", "output_layer.")) and EXTRA_STATE not in key


def layer_pattern(keys: list[str], where: str) -> str:
    """The layer kinds, in order, from the keys present (the checkpoint's ground truth)."""
    by_layer: dict[int, list[str]] = {}
    for k in keys:
        m = _LAYER.match(k)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(m.group(2))
    if not by_layer:
        raise HybridctlError(f"{where}: no decoder layers found (is this a hybrid Mamba model checkpoint?)")
    n = max(by_layer) + 1
    missing = [i for i in range(n) if i not in by_layer]
    if missing:
        raise HybridctlError(f"{where}: layer {missing[0]} is missing (layers 0..{n - 1} expected)")
    kinds = []
    for i in range(n):
        kind = layer_kind_of_keys(by_layer[i])
        if kind is None:
            raise HybridctlError(f"{where}: cannot tell the kind of layer {i} from its tensors {by_layer[i]}")
        kinds.append(kind)
    return "".join(kinds)


def _check_tied_copy(mspecs: dict[str, TensorSpec], mget: Callable[[str, Split | None], torch.Tensor],
                     split: Split | None, where: str) -> None:
    """The args say tied: the file's output_layer.weight must then be a copy of the embedding, else refuse."""
    emb, out = "embedding.word_embeddings.weight", "output_layer.weight"
    same = tuple(mspecs[out][0]) == tuple(mspecs[emb][0]) and torch.equal(mget(out, split), mget(emb, split))
    if not same:
        raise HybridctlError(f"{where}: the args say the embeddings are tied (no untie_embeddings_and_output_weights) "
                             f"but {out} differs from {emb}; refusing to drop the output layer")


def _check_args(args: Any, mspecs: dict[str, TensorSpec], where: str) -> None:
    """What the args and the tensor list must say before a config is inferred from them."""
    emb = "embedding.word_embeddings.weight"
    if emb not in mspecs:
        raise HybridctlError(f"{where}: missing tensor {emb!r}")
    if "embedding.position_embeddings.weight" in mspecs:
        raise HybridctlError(f"{where}: learned absolute position embeddings are not supported (hybridctl models "
                             "use no position embedding or RoPE)")
    check_config_numbers(args, f"{where} (args)")
    if args is not None and getattr(args, "hidden_size", None) is None:
        raise HybridctlError(f"{where} (args): hidden_size is missing or null")
    pos = getattr(args, "position_embedding_type", None)
    if pos not in (None, "none", "rope"):
        raise HybridctlError(f"{where}: the args say position_embedding_type={pos!r} but the checkpoint holds no "
                             "embedding.position_embeddings.weight; hybridctl reads only 'rope' or 'none'")


def _match_entries(cfg: ModelConfig, entries: list[Entry], mspecs: dict[str, TensorSpec],
                   mget: Callable[[str, Split | None], torch.Tensor], where: str) -> dict[str, tuple[Entry, str]]:
    """Every name-table entry to the one key holding it (shape checked); nothing missing, nothing unexpected."""
    emb = "embedding.word_embeddings.weight"
    used: dict[str, tuple[Entry, str]] = {}
    for e in entries:
        found = [k for k in (e.key, *e.aliases) if k in mspecs]
        if not found:
            raise HybridctlError(f"{where}: missing tensor {e.key!r}")
        key = found[0]
        if tuple(mspecs[key][0]) != tuple(e.shape):
            raise HybridctlError(f"{where}: {key} has shape {tuple(mspecs[key][0])}, the args imply {e.shape}")
        used[key] = (e, key)
    ignored = {"output_layer.weight"} if cfg.tie_embeddings else set()  # a tied model's last-stage copy
    if ignored and "output_layer.weight" in mspecs:
        _check_tied_copy(mspecs, mget, next(e.split for e in entries if e.key == emb), where)
    unexpected = [k for k in mspecs if k not in used and k not in ignored]
    if unexpected:
        raise HybridctlError(f"{where}: unexpected tensor {unexpected[0]!r} (not part of a model hybridctl can "
                             f"represent){f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''}")
    return used


def _source_info(info: dict[str, Any], args: Any, cfg: ModelConfig, padded: int, keys: list[str]) -> dict[str, Any]:
    """The Source's info: padded / unpadded vocab, the key style, a note on Megatron's vocab padding."""
    info = dict(info)
    info["vocab_size_padded"] = padded
    unp = unpadded_vocab(args, padded)
    if unp is not None:
        info["vocab_size_unpadded"] = unp
    layer_norms = [m.group(2) for m in map(_LAYER.match, keys) if m]
    info["key_style"] = "2024" if "norm.weight" in layer_norms else "current"  # the 2024 Mamba pre-norm name
    notes = list(info.get("notes", []))
    if unp is not None and unp < cfg.vocab_size:
        notes.append(f"vocab: {cfg.vocab_size} rows kept (Megatron padding); the args give {unp} real tokens "
                     f"(--vocab-size {unp} strips the padding)")
    info["notes"] = notes
    return info


def build_source(fmt: str, path: Path, args: Any, mspecs: dict[str, TensorSpec],
                 mget: Callable[[str, Split | None], torch.Tensor], *, where: str, info: dict[str, Any],
                 search_dirs: list[Path] = ()) -> Source:
    """search_dirs: where tokenizer files may lie (the checkpoint root, then the iteration directory)."""
    keys = list(mspecs)
    _check_args(args, mspecs, where)
    padded = mspecs["embedding.word_embeddings.weight"][0][0]
    native_vocab = getattr(args, HYBRIDCTL_VOCAB_ARG, None) or padded
    conv = [s for k, s in mspecs.items() if k.endswith(("conv1d.weight", "conv1d_weight"))]
    cfg = config_from_args(args, pattern=layer_pattern(keys, where), vocab=int(native_vocab),
                           d_conv=conv[0][0][-1] if conv else None, where=where)
    used = _match_entries(cfg, all_entries(cfg, padded), mspecs, mget, where)
    natives: dict[str, tuple[Entry, str, int]] = {}
    specs: dict[str, TensorSpec] = {}
    for e, key in used.values():
        metas = e.to_native(torch.empty(e.shape, device="meta"))
        for j, (name, meta) in enumerate(zip(e.natives, metas)):
            natives[name] = (e, key, j)
            specs[name] = (tuple(meta.shape), mspecs[key][1])
    check_specs(cfg, specs, where)
    cache: dict[str, list[torch.Tensor]] = {}

    def get(name: str) -> torch.Tensor:
        if name not in natives:
            raise HybridctlError(f"{where}: no tensor {name!r}")
        e, key, j = natives[name]
        if key not in cache:  # keep one packed entry (q/k/v share linear_qkv): the next get likely needs it
            cache.clear()
            cache[key] = e.to_native(mget(key, e.split))
        return cache[key][j]

    return Source(fmt, path, cfg, specs, get, tokenizer_dir=find_tokenizer_dir(*search_dirs),
                  info=_source_info(info, args, cfg, padded, keys), validated=True)
