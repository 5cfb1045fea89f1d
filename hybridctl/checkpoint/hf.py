"""Hugging Face checkpoints: read and write NemotronH and Mamba2ForCausalLM directories; read mamba_ssm ones.

What transformers 5.23 actually does (models/nemotron_h, models/mamba2), and so what a conversion must preserve:
- NemotronH clamps ``dt = softplus(dt + dt_bias)`` from below at ``time_step_min`` in its chunked path (upper bound
  none; ``time_step_limit`` is ignored). hybridctl carries that as ``mamba.dt_clamp_min = time_step_min``; exporting
  a model with no clamp (Megatron semantics) writes ``time_step_min = 0.0``, which makes transformers' clamp a no-op.
  Its cached single-token step clamps nothing at all (a transformers inconsistency hybridctl does not copy).
- Mamba2ForCausalLM clamps to ``time_step_limit`` (both bounds); its ``time_step_min/max/floor`` only initialise.
- NemotronH never re-ties ``lm_head`` to the embeddings, whatever ``tie_word_embeddings`` says: a tied model's export
  still writes ``lm_head.weight``. Mamba2 and mamba_ssm do tie when their config says so.
- NemotronH MLPs are ``down(act(up(x)))`` with ``mlp_hidden_act`` (``relu2`` | ``gelu`` here): no gated (swiglu) MLP,
  no position embedding in attention (NoPE), explicit ``head_dim``; the Mamba inner size is
  ``mamba_num_heads * mamba_head_dim`` (``expand`` is not read; hybridctl keeps ``mamba.nheads``). Gated RMSNorm is
  grouped (size d_inner / n_groups), normalising after the gate, eps ``layer_norm_epsilon`` — as hybridctl's.
  ``residual_in_fp32`` is not read by NemotronH; Mamba2 honours it (a difference only below fp32).
- transformers writes +inf in config.json as ``{"__float__": "Infinity"}``; both that and JSON ``Infinity`` are read.
Tensor layouts equal the native ones: conversion renames (checkpoint/keymaps.py) and streams tensor by tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridctl.checkpoint.hf_config import (from_mamba2, from_mamba_ssm, from_nemotron, hybridctl_block,
                                            mamba2_config, nemotron_config, require)
from hybridctl.checkpoint.io import (SafetensorsReader, atomic_dir, copy_files, find_tokenizer_dir, write_json,
                                     write_sharded)
from hybridctl.checkpoint.keymaps import HF_BACKBONE, HF_MLP_ACT, HF_MODEL_PREFIX, MAMBA_SSM, KeyMap
from hybridctl.checkpoint.numbers import HF_NULLABLE, check_config_numbers
from hybridctl.checkpoint.source import Source, TensorSpec, _read_json, check_specs, ensure_valid
from hybridctl.config import ATTENTION, MAMBA, MLP, HybridctlError, ModelConfig

log = logging.getLogger(__name__)
ARCHS = ("auto", "nemotron_h", "mamba2")


# --------------------------------------------------------------------------------------------------------------------
# Weights on disk: safetensors (single/sharded) or pytorch_model.bin (single/sharded), loaded without code execution
# --------------------------------------------------------------------------------------------------------------------


class _BinReader:
    """pytorch_model.bin (or an index of them) through torch.load(weights_only=True, mmap=True): no code runs, and
    mmap keeps memory at the tensors actually touched."""

    def __init__(self, path: Path) -> None:
        self.dir = path
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None  # the one file held open (mmap)
        idx = path / "pytorch_model.bin.index.json"
        if idx.is_file():
            wm = (_read_json(idx) or {}).get("weight_map")
            if not isinstance(wm, dict):
                raise HybridctlError(f"{idx}: not a valid index (no weight_map)")
            self._files = dict(wm)
        else:
            self._files = {k: "pytorch_model.bin" for k in self._load("pytorch_model.bin")}
        self._meta: dict[str, TensorSpec] = {}
        for fname in dict.fromkeys(self._files.values()):
            sd = self._load(fname)
            for k, t in sd.items():
                self._meta[k] = (tuple(t.shape), t.dtype)
        missing = [k for k in self._files if k not in self._meta]
        if missing:
            raise HybridctlError(f"{path}: {missing[0]!r} is named in the index but in no weight file")

    def _load(self, fname: str) -> dict[str, torch.Tensor]:
        if self._cache and self._cache[0] == fname:
            return self._cache[1]
        p = self.dir / fname
        if not p.is_file():
            raise HybridctlError(f"{p}: weight file is missing")
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - unpickling refusals and corrupt files both end here
            raise HybridctlError(f"{p}: cannot be read safely as a tensor state dict "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise HybridctlError(f"{p}: expected a flat dict of tensors")
        self._cache = (fname, sd)
        return sd

    def keys(self) -> list[str]:
        return list(self._meta)

    def spec(self, name: str) -> TensorSpec:
        return self._meta[name]

    def get(self, name: str) -> torch.Tensor:
        return self._load(self._files.get(name, "pytorch_model.bin"))[name]


class _STReader:
    def __init__(self, path: Path) -> None:
        self._r = SafetensorsReader(path)
        self.get = self._r.get

    def keys(self) -> list[str]:
        return self._r.keys()

    def spec(self, name: str) -> TensorSpec:
        shape, dt = self._r.spec(name)
        if not dt.is_floating_point:  # HF model weights are floating point; integer tensors are not weights
            raise HybridctlError(f"{self._r.dir}: tensor {name!r} has unsupported dtype {self._r.dtype(name)}")
        return shape, dt


def _open_weights(path: Path) -> _STReader | _BinReader:
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return _STReader(path)
    if (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        return _BinReader(path)
    raise HybridctlError(f"{path}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def _hf_kind(c: dict[str, Any], where: str) -> str:
    mt = c.get("model_type")
    if mt in ("nemotron_h", "mamba2"):
        return mt
    if mt is None and "d_model" in c and ("n_layer" in c or "ssm_cfg" in c):
        return "mamba_ssm"
    raise HybridctlError(f"{where}: model_type {mt!r} is not supported; hybridctl reads nemotron_h "
                         "(NemotronHForCausalLM), mamba2 (Mamba2ForCausalLM) and mamba_ssm MambaLMHeadModel dirs")


def _map_names(weights: Any, kind: str, where: str, notes: list[str]) -> dict[str, str]:
    """native name → stored name, refusing tensors that belong to no known weight."""
    maps: tuple[KeyMap, ...] = (MAMBA_SSM,) if kind == "mamba_ssm" else (HF_BACKBONE, HF_MODEL_PREFIX)
    out: dict[str, str] = {}
    skipped = 0
    for key in weights.keys():
        native = next((n for m in maps if (n := m.to_native(key)) is not None), None)
        if native is None and kind == "nemotron_h" and key.startswith("mtp."):
            skipped += 1  # transformers' _keys_to_ignore_on_load_unexpected
            continue
        if native is None:
            raise HybridctlError(f"{where}: unexpected tensor {key!r} (not a {kind} weight hybridctl knows)")
        if native in out:
            raise HybridctlError(f"{where}: tensors {out[native]!r} and {key!r} both map to {native!r}")
        out[native] = key
    if skipped:
        notes.append(f"skipped {skipped} mtp.* tensors")
    return out


def _same(weights: Any, a: str, b: str) -> bool:
    """Bit equality of two stored tensors; the first row decides cheaply in the usual (different) case."""
    ta, tb = weights.get(a), weights.get(b)
    return ta.shape == tb.shape and torch.equal(ta[:1], tb[:1]) and torch.equal(ta, tb)


def _decide_tie(kind: str, config_tied: bool, names: dict[str, str], weights: Any, notes: list[str]) -> bool:
    """Whether the model's head *is* its embedding, judged the way the source library runs it.

    NemotronH never ties, so a present lm_head is what runs: tied only when it equals the embedding. Mamba2 and
    mamba_ssm tie whenever their config says so (a stored lm_head is then overwritten by the embedding)."""
    has_head = "lm_head.weight" in names
    if not config_tied:
        if has_head and kind == "nemotron_h" and _same(weights, names["lm_head.weight"], names["embed.weight"]):
            notes.append("lm_head.weight equals the embedding but tie_word_embeddings is false: imported untied "
                         "(same outputs; the two train separately)")
        return False
    if not has_head:
        if kind == "nemotron_h":
            notes.append("lm_head.weight is absent and tie_word_embeddings is true: the embedding is used as the "
                         "head (transformers' NemotronH would leave its head uninitialised)")
        return True
    if kind != "nemotron_h":
        return True
    if _same(weights, names["lm_head.weight"], names["embed.weight"]):
        return True
    notes.append("tie_word_embeddings is true but lm_head.weight differs from the embedding; transformers' "
                 "NemotronH runs lm_head.weight, so the model is imported untied")
    return False


def open_hf(path: str | Path, **_: Any) -> Source:
    """Open a NemotronH / Mamba2ForCausalLM / mamba_ssm MambaLMHeadModel directory as a Source (native names).

    Detection is by config.json content (model_type, or mamba_ssm's MambaConfig fields). Every stored tensor must
    map to a native name and the shapes must match the config exactly; nothing is guessed.
    """
    path = Path(path)
    where = str(path)
    c = _read_json(path / "config.json")
    if c is None:
        raise HybridctlError(f"{where}: no config.json")
    kind = _hf_kind(c, where)
    check_config_numbers(c, f"{path / 'config.json'}", nullable=HF_NULLABLE)  # checkpoint/numbers.py
    # the config first: a model hybridctl cannot run (MoE, ...) is refused by what it is, not by its tensor names
    if kind == "nemotron_h":
        cfg, more = from_nemotron(c, where)
    elif kind == "mamba2":
        cfg, more = from_mamba2(c, where)
    weights = _open_weights(path)
    notes: list[str] = []
    names = _map_names(weights, kind, where, notes)
    require("embed.weight" in names, where, "the embedding tensor is missing")
    if kind == "mamba_ssm":
        cfg, more = from_mamba_ssm(c, where, weights.spec(names["embed.weight"])[0][0])
        config_tied = bool(c.get("tie_embeddings", True))
    else:
        config_tied = bool(c.get("tie_word_embeddings", False))
    notes += more
    tied = _decide_tie(kind, config_tied, names, weights, notes)
    if tied:
        names.pop("lm_head.weight", None)
    cfg = cfg.replace(tie_embeddings=tied)
    specs = {n: weights.spec(k) for n, k in names.items()}
    check_specs(cfg, specs, where)
    fmt = {"nemotron_h": "hf-nemotron_h", "mamba2": "hf-mamba2", "mamba_ssm": "mamba_ssm"}[kind]
    for n in notes:
        log.info("%s: %s", where, n)
    info = {"hf_arch": kind, "notes": notes, "tie_word_embeddings_config": config_tied,
            "token_ids": {k: c.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    return Source(fmt, path, cfg, specs, lambda n: weights.get(names[n]), tokenizer_dir=find_tokenizer_dir(path),
                  info=info, validated=True)


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def strip_vocab(src: Source, vocab_size: int) -> Source:
    """The same source with the embedding (and head) cut to the first ``vocab_size`` rows — for removing Megatron's
    vocab padding. Refuses to grow the vocab; returns ``src`` itself when nothing changes."""
    v = src.config.vocab_size
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise HybridctlError(f"--vocab-size must be a positive integer, got {vocab_size!r}")
    if vocab_size > v:
        raise HybridctlError(f"--vocab-size {vocab_size} is larger than the model's vocab {v}; only padding rows can "
                             "be removed")
    if vocab_size == v:
        return src
    rows = ("embed.weight", "lm_head.weight")
    specs = {k: (((vocab_size,) + tuple(s[1:])) if k in rows else s, dt) for k, (s, dt) in src.specs.items()}

    def get(name: str) -> torch.Tensor:
        t = src.get(name)
        return t[:vocab_size] if name in rows else t

    info = dict(src.info, vocab_stripped_from=v)
    # Only the vocab rows of embed/lm_head change, consistently with the config: a validated source stays valid.
    return Source(src.format, src.path, src.config.replace(vocab_size=vocab_size), specs, get, src.tokenizer_dir, info,
                  validated=src.validated)


@dataclass
class HFPlan:
    """What write_hf writes: the architecture, config.json, tensor plan (HF name → shape, dtype) and notes."""

    arch: str
    config: dict[str, Any]
    specs: dict[str, TensorSpec]
    native_names: dict[str, str]  # HF name → native name
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    out: Path | None = None
    tokenizer: Any = field(default=None, repr=False)  # loaded once by plan_hf, written by write_hf


def resolve_arch(cfg: ModelConfig, arch: str) -> str:
    """'auto' → mamba2 for pure Mamba-2 models (transformers' NemotronH cache breaks with no attention layer),
    nemotron_h otherwise; then check the architecture can represent this model exactly."""
    if arch not in ARCHS:
        raise HybridctlError(f"--hf-arch {arch!r} is unknown; use one of {', '.join(ARCHS)}")
    pure = set(cfg.pattern) == {MAMBA}
    if arch == "auto":
        arch = "mamba2" if pure else "nemotron_h"
    why = []
    if arch == "mamba2" and not pure:
        why.append(f"Mamba2ForCausalLM holds only Mamba-2 layers, the pattern is {cfg.pattern!r}")
    if arch == "nemotron_h":
        if ATTENTION in cfg.pattern and cfg.attention.position != "none":
            why.append("attention uses RoPE; NemotronH attention has no position embedding (NoPE only)")
        if MLP in cfg.pattern and cfg.mlp.activation not in HF_MLP_ACT:
            why.append(f"the MLP is {cfg.mlp.activation}; NemotronH MLPs are not gated (relu2 or gelu only)")
        if MAMBA in cfg.pattern and cfg.mamba.dt_clamp_max is not None:
            why.append("mamba.dt_clamp_max is set; NemotronH clamps dt only from below (time_step_min)")
    if why:
        raise HybridctlError(f"cannot export to {arch}: " + "; ".join(why) + " — the exported model would behave "
                             "differently")
    return arch


def _token_ids(src: Source) -> tuple[dict[str, int | None], Any]:
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if src.tokenizer_dir is None:
        return ids, None
    from hybridctl.tokenizer import load_tokenizer

    tok = load_tokenizer(src.tokenizer_dir)
    ids.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return ids, tok


def plan_hf(src: Source, *, arch: str = "auto", dtype: torch.dtype | None = None,
            vocab_size: int | None = None) -> tuple[HFPlan, Source]:
    """Validate an export and describe it without writing: (plan, the source after vocab stripping)."""
    ensure_valid(src)
    notes: list[str] = []
    if vocab_size is not None:
        src = strip_vocab(src, vocab_size)
        if "vocab_stripped_from" in src.info:
            notes.append(f"vocab: {src.info['vocab_stripped_from']} → {vocab_size} rows (padding removed)")
    cfg = src.config
    arch = resolve_arch(cfg, arch)
    ids, tok = _token_ids(src)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise HybridctlError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size} rows; "
                             "--vocab-size cannot cut real tokens")
    if arch == "nemotron_h" and set(cfg.pattern) == {MAMBA}:
        notes.append("pure Mamba-2 model written as NemotronH: transformers' NemotronH cache fails without an "
                     "attention layer (generate() raises); --hf-arch mamba2 avoids that")
    config = nemotron_config(cfg) if arch == "nemotron_h" else mamba2_config(cfg)
    out_dtype = dtype or src.dtype
    config.update(ids, dtype=str(out_dtype).removeprefix("torch."), hybridctl=hybridctl_block(cfg))
    keep = dict(src.specs)
    if cfg.tie_embeddings and arch == "nemotron_h":
        # transformers' NemotronH does not re-tie on load: the head must be on disk.
        keep["lm_head.weight"] = src.specs["embed.weight"]
        notes.append("tied embeddings: lm_head.weight written as a copy of the embedding (NemotronH never re-ties)")
    native_names = {HF_BACKBONE.to_foreign(n): n for n in keep}
    specs = {h: (tuple(keep[n][0]), dtype or keep[n][1]) for h, n in native_names.items()}
    return HFPlan(arch, config, specs, native_names, notes, tokenizer=tok), src


def _write_tokenizer(src: Source, tok: Any, out: Path) -> None:
    if tok is None:
        return
    if tok.kind == "byte":
        tok.save_hf(out)
        tok.save(out)  # the hybridctl marker: reading this dir back gives the exact byte tokenizer
    elif not src.tokenizer_dir.is_dir():  # a tokenizer file found by content under another name
        tok.save(out)  # as tokenizer.json / tokenizer.model (+ tokenizer_config.json), the names HF loaders read
    else:
        from hybridctl.tokenizer import TOKENIZER_FILES

        copy_files(src.tokenizer_dir, out, TOKENIZER_FILES)


def write_hf(out: str | Path, src: Source, *, arch: str = "auto", dtype: torch.dtype | None = None,
             max_shard_size: str | int = "5GB", vocab_size: int | None = None, overwrite: bool = False,
             progress: Callable[[int], None] | None = None, plan: HFPlan | None = None) -> HFPlan:
    """Write ``src`` as a Hugging Face directory (config.json, sharded safetensors + index, tokenizer files),
    atomically and tensor by tensor. arch: auto | nemotron_h | mamba2. Returns the plan with ``files`` and ``out``.

    plan: a plan already made by ``plan, src = plan_hf(...)`` — pass that returned (vocab-stripped) ``src`` too;
    arch, dtype and vocab_size are then taken from the plan and nothing is validated or loaded twice."""
    if plan is None:
        plan, src = plan_hf(src, arch=arch, dtype=dtype, vocab_size=vocab_size)
    elif plan.config.get("vocab_size") != src.config.vocab_size:
        raise HybridctlError(f"write_hf: the plan is for vocab {plan.config.get('vocab_size')}, the source has "
                             f"{src.config.vocab_size} rows; pass the source plan_hf returned")
    tok = plan.tokenizer
    out = Path(out)

    def get(hf_name: str) -> torch.Tensor:
        n = plan.native_names[hf_name]
        if n not in src.specs:  # a tied model's NemotronH head: its own tensor (safetensors refuses shared storage)
            return src.get("embed.weight").clone()
        return src.get(n)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_sharded(tmp, plan.specs, get, max_shard_size=max_shard_size, progress=progress)
        _write_tokenizer(src, tok, tmp)
        write_json(tmp / "config.json", plan.config)
        files = sorted(p.name for p in tmp.iterdir())
    plan.files, plan.out = files, out
    return plan
