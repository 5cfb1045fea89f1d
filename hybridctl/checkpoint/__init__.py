"""Checkpoint formats. A checkpoint is a config plus weights; the format is detected by content, never by names.

Every reader returns a ``Source`` (checkpoint/source.py, with the tensor specs and their checks): the model config,
the tensor plan (native names → shape, dtype), a lazy ``get(name)`` returning one tensor in native layout, the
directory holding tokenizer files (if any) and format facts. Writers (one signature each: checkpoint/writers.py) and
``load_model`` stream tensor by tensor from a Source, so converting never needs the whole model in memory.

Formats: ``native`` (hybridctl: config.json + safetensors), ``hf`` (NemotronH / Mamba2ForCausalLM / mamba_ssm dirs,
checkpoint/hf.py), ``megatron`` (legacy per-rank and torch_dist, checkpoint/megatron.py).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hybridctl.checkpoint.source import (Source, TensorSpec, _numel, _read_json, check_specs, check_state,
                                         ensure_valid, meta_model, specs_nbytes)
from hybridctl.config import HybridctlError

__all__ = ["Source", "TensorSpec", "check_specs", "check_state", "detect_format", "ensure_valid", "load_model",
           "load_tokenizer_for", "meta_model", "open_checkpoint", "specs_nbytes"]
if TYPE_CHECKING:
    from hybridctl.model import HybridLM
    from hybridctl.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_meta_model = meta_model  # the name other modules imported before source.py (kept for them)


def detect_format(path: str | Path) -> str:
    """'native' | 'hf' | 'mamba_ssm' | 'megatron', by looking at the files' contents."""
    p = Path(path)
    if not p.exists():
        raise HybridctlError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise HybridctlError(f"{p}: expected a checkpoint directory")
    cfg = _read_json(p / "config.json")
    if cfg is not None:
        if cfg.get("format") == "hybridctl":
            return "native"
        if "model_type" in cfg:
            return "hf"
        if "d_model" in cfg and ("n_layer" in cfg or "ssm_cfg" in cfg):
            return "mamba_ssm"
    meta = _read_json(p / "metadata.json")
    if meta is not None and "sharded_backend" in meta:
        return "megatron"
    if (p / "latest_checkpointed_iteration.txt").is_file():
        return "megatron"
    if any(c.is_dir() and (c.name.startswith("mp_rank_") or c.name == "release" or re.fullmatch(r"iter_\d{7}", c.name))
           for c in p.iterdir()):
        return "megatron"
    raise HybridctlError(f"{p}: unknown checkpoint format (no hybridctl/Hugging Face config.json, no Megatron "
                         "tracker, metadata.json or mp_rank_* files)")


def open_checkpoint(path: str | Path, **options: Any) -> Source:
    """Open any checkpoint hybridctl reads. Options go to the format's reader (e.g. iteration=, trust_pickle=)."""
    fmt = detect_format(path)
    if fmt == "native":
        from hybridctl.checkpoint.native import open_native

        return open_native(Path(path))
    if fmt in ("hf", "mamba_ssm"):
        from hybridctl.checkpoint.hf import open_hf

        return open_hf(Path(path), **options)
    from hybridctl.checkpoint.megatron import open_megatron

    return open_megatron(Path(path), **options)


def load_model(path: str | Path | Source, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **options: Any) -> tuple[HybridLM, Source]:
    """Load any readable checkpoint into a HybridLM, the one load path: build on meta → apply the module swaps the
    checkpoint's config declares (its ``quantization`` section) → check the tensor plan strictly against *that*
    model → materialise with ``load_state_dict(assign=True)``, casting floating tensors only.

    Returns (model in eval mode, source). dtype: of the floating tensors; default the checkpoint's dominant stored
    floating dtype. Integer tensors (a quantized checkpoint's qweight) keep their stored dtype."""
    src = path if isinstance(path, Source) else open_checkpoint(path, **options)
    model = meta_model(src.config, src.quantization)
    if not src.validated:
        check_state(model.state_dict(), src.specs, str(src.path))
        src.validated = True
    floats = {n: s for n, s in src.specs.items() if s[1].is_floating_point}
    dtype = dtype or max(floats.values(), key=lambda s: _numel(s[0]))[1]
    sd = {name: src.get(name).to(device=device, dtype=dtype if name in floats else None) for name in src.specs}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval(), src


def load_tokenizer_for(src: Source, override: str | None = None) -> Tokenizer:
    """The tokenizer stored with a checkpoint (or the override path / 'byte'); error if there is none."""
    from hybridctl.tokenizer import build_tokenizer, load_tokenizer

    if override:
        return build_tokenizer(override)
    if src.tokenizer_dir is None:
        raise HybridctlError(f"{src.path}: the checkpoint carries no tokenizer; pass --tokenizer PATH (or 'byte')")
    return load_tokenizer(src.tokenizer_dir)
