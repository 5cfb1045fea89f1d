"""The native format: ``config.json`` + safetensors (sharded with an index past a size threshold) + tokenizer files.

config.json = {"format": "hybridctl", "format_version": 1, "dtype": "...", "model": ModelConfig.to_dict(),
"tokenizer": kind or null, ...extra}. Tensor names are the model's state-dict names (model.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hybridctl.checkpoint.io import (SafetensorsReader, atomic_dir, carry_tokenizer, check_tokenizer_fits, write_json,
                                     write_sharded)
from hybridctl.checkpoint.source import Source, TensorSpec, _read_json, check_specs
from hybridctl.config import HybridctlError, ModelConfig

FORMAT_NAME = "hybridctl"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    from hybridctl.config import canonical_dtype

    return _DTYPES[canonical_dtype(name)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_native(out: str | Path, *, config: ModelConfig, specs: dict[str, TensorSpec],
                 get: Callable[[str], torch.Tensor], dtype: torch.dtype | None = None, tokenizer: Any = None,
                 tokenizer_dir: Path | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False,
                 extra: dict[str, Any] | None = None, progress: Callable[[int], None] | None = None,
                 validated: bool = False) -> Path:
    """Write a native checkpoint atomically, streaming tensors from ``get``.

    tokenizer: an object with ``save(dir)`` (hybridctl.tokenizer), or tokenizer_dir: files copied from there.
    validated: (config, specs) already passed check_specs (e.g. ``Source.validated``); skips the repeat.
    """
    if not validated:  # a quantized model's extra carries its config.json section: checked against those swaps
        check_specs(config, specs, "write_native", (extra or {}).get("quantization"))
    out = Path(out)
    out_specs = {k: (shape, dtype or dt) for k, (shape, dt) in specs.items()}
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, config.vocab_size, "write_native")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_sharded(tmp, out_specs, get, max_shard_size=max_shard_size, progress=progress)
        kind = None
        if tokenizer is not None:
            tokenizer.save(tmp)
            kind = getattr(tokenizer, "kind", None)
        else:
            kind = carry_tokenizer(tokenizer_dir, tmp, config.vocab_size)
        main_dtype = max(out_specs.values(), key=lambda s: torch.Size(s[0]).numel())[1]
        write_json(tmp / "config.json", {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                         "dtype": dtype_name(main_dtype), "model": config.to_dict(),
                                         "tokenizer": kind, **(extra or {})})
    return out


def save_model(model: torch.nn.Module, out: str | Path, *, tokenizer: Any = None, dtype: torch.dtype | None = None,
               max_shard_size: str | int = "5GB", overwrite: bool = False, extra: dict[str, Any] | None = None
               ) -> Path:
    """Save a HybridLM as a native checkpoint."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    specs = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    return write_native(out, config=model.cfg, specs=specs, get=sd.__getitem__, dtype=dtype, tokenizer=tokenizer,
                        max_shard_size=max_shard_size, overwrite=overwrite, extra=extra)


def open_native(path: Path) -> Source:
    meta = _read_json(path / "config.json")
    if meta is None or meta.get("format") != FORMAT_NAME:
        raise HybridctlError(f"{path}: not a hybridctl checkpoint (config.json lacks format: {FORMAT_NAME})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise HybridctlError(f"{path}: format_version {version!r} is not supported (this hybridctl reads "
                             f"<= {FORMAT_VERSION}); upgrade hybridctl")
    if "model" not in meta:
        raise HybridctlError(f"{path}/config.json: missing the 'model' section")
    config = ModelConfig.from_dict(meta["model"])
    reader = SafetensorsReader(path)
    specs = {k: reader.spec(k) for k in reader.keys()}
    check_specs(config, specs, str(path), meta.get("quantization"))
    tok_dir = path if meta.get("tokenizer") else None
    return Source("native", path, config, specs, reader.get, tokenizer_dir=tok_dir,
                  info={k: v for k, v in meta.items() if k not in ("model",)}, validated=True)
