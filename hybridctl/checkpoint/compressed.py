"""A quantized native checkpoint → a Hugging Face directory in the compressed-tensors layout (what transformers and
vLLM load for weight-only int8 / int4: ``quant_method: compressed-tensors``, format ``pack-quantized``).

Per quantized linear ``<m>`` (HF names): ``<m>.weight_packed`` int32 [N, K·bits/32] (compressed-tensors' own
``pack_to_int32``: element k of a row in word k·bits//32 at bit (k·bits) % 32, stored as q + 2^(bits-1)),
``<m>.weight_scale`` [N, 1] (int8, strategy ``channel``) or [N, K/g] (int4, strategy ``group``, group_size g),
``<m>.weight_shape`` int64 [2] = (N, K); symmetric, so no zero points. ``W = q · scale`` is exactly hybridctl's
dequantization (qlinear.py), so transformers gets the same dense weights. Every other linear (kept by the policy,
the LM head unless quantized) is in the config's ``ignore`` list; the rest of the export is checkpoint/hf.py's
(config, tokenizer, names). The ``quantization_config`` block is written by compressed-tensors' own ModelCompressor
from its QuantizationConfig / QuantizationScheme / QuantizationArgs classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hybridctl.checkpoint import Source, _meta_model
from hybridctl.checkpoint.io import atomic_dir, write_json, write_sharded
from hybridctl.config import HybridctlError

FORMAT = "pack-quantized"


def _require_ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise HybridctlError("--to hf of a quantized checkpoint needs the compressed-tensors package "
                             "(pip install compressed-tensors)") from None


def dense_view(src: Source) -> Source:
    """The quantized source seen as the dense model it dequantizes to (``<m>.weight`` = q · scales, in the scales'
    dtype), without its quantization section: what checkpoint/hf.py plans and names."""
    from hybridctl import qlinear as Q

    method, group, modules = Q.check_section(src.info["quantization"])
    specs = dict(src.specs)
    for m in modules:
        qshape, _ = specs.pop(f"{m}.qweight")
        sshape, sdt = specs.pop(f"{m}.scales")
        specs[f"{m}.weight"] = ((qshape[0], qshape[1] * (2 if method == "int4" else 1)), sdt)
    mods = set(modules)

    def get(name: str) -> torch.Tensor:
        mod, _, leaf = name.rpartition(".")
        if leaf != "weight" or mod not in mods:
            return src.get(name)
        q, s = src.get(f"{mod}.qweight"), src.get(f"{mod}.scales").float()
        w = Q.dequantize_int8(q, s) if method == "int8" else Q.dequantize_int4(q, s, group)
        return w.to(specs[name][1])

    info = {k: v for k, v in src.info.items() if k != "quantization"}
    info["quantized_from"] = src.info["quantization"]
    return dataclasses.replace(src, specs=specs, get=get, info=info, validated=False)


def _linear_modules(config) -> list[str]:
    return [n for n, m in _meta_model(config, None).named_modules() if type(m) is torch.nn.Linear]


def _ignore_entry(native_module: str) -> str:
    """A kept linear as an ``ignore`` entry that matches it under every loader's module prefix (the checkpoint's
    ``backbone.``, transformers' ``model.``, vLLM's): a regex on the name's tail; the head by its plain name."""
    import re

    if native_module == "lm_head":
        return "lm_head"
    return "re:(.*\\.)?" + re.escape(native_module) + "$"


def quantization_config(method: str, group: int, ignore: list[str]):
    """compressed-tensors' QuantizationConfig for hybridctl's symmetric weight-only scheme (targets: Linear)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    if method == "int8":
        args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    else:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return QuantizationConfig(config_groups={"group_0": scheme}, format=FORMAT, ignore=ignore,
                              quantization_status="compressed")


def plan_compressed(src: Source, *, arch: str = "auto", dtype: torch.dtype | None = None,
                    vocab_size: int | None = None) -> tuple[Any, Source]:
    """(HFPlan whose specs hold the packed tensors, the dense view of the source) — validated, nothing written."""
    from hybridctl import qlinear as Q
    from hybridctl.checkpoint.hf import plan_hf
    from hybridctl.checkpoint.keymaps import HF_BACKBONE

    _require_ct()
    method, group, modules = Q.check_section(src.info["quantization"])
    plan, view = plan_hf(dense_view(src), arch=arch, dtype=dtype, vocab_size=vocab_size)
    bits = 8 if method == "int8" else 4
    hf_mod = {m: HF_BACKBONE.to_foreign(f"{m}.weight").removesuffix(".weight") for m in modules}
    packed: dict[str, tuple[str, str]] = {}  # HF name → (native module, what)
    specs = {}
    for name, (shape, dt) in plan.specs.items():
        mod = next((m for m, h in hf_mod.items() if name == f"{h}.weight"), None)
        if mod is None:
            specs[name] = (shape, dt)
            continue
        n, k = shape
        h = hf_mod[mod]
        specs[f"{h}.weight_packed"] = ((n, -(-k * bits // 32)), torch.int32)
        specs[f"{h}.weight_scale"] = ((n, 1) if method == "int8" else (n, k // group), dt)
        specs[f"{h}.weight_shape"] = ((2,), torch.int64)
        packed |= {f"{h}.{w}": (mod, w) for w in ("weight_packed", "weight_scale", "weight_shape")}
    kept = [_ignore_entry(m) for m in _linear_modules(view.config) if m not in hf_mod]
    if "lm_head.weight" in plan.specs and "lm_head" not in hf_mod and "lm_head" not in kept:
        kept.append("lm_head")  # a tied NemotronH head, written as its own (dense) tensor
    qc = quantization_config(method, group, sorted(kept))
    plan = dataclasses.replace(plan, specs=specs, notes=plan.notes + [
        f"compressed-tensors {FORMAT}: {len(modules)} {method} linears"
        + (f" (group {group})" if method == "int4" else "") + f", {len(kept)} kept dense (ignore list)"])
    return plan, _Packed(view, src, packed, method, qc)


class _Packed:
    """The dense view plus the packed tensors' getter (what write_compressed streams)."""

    def __init__(self, view: Source, qsrc: Source, packed: dict[str, tuple[str, str]], method: str, qc: Any):
        self.view, self.qsrc, self.packed, self.method, self.qc = view, qsrc, packed, method, qc

    def get(self, hf_name: str, plan: Any) -> torch.Tensor:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        from hybridctl import qlinear as Q

        mod, what = self.packed[hf_name]
        q = self.qsrc.get(f"{mod}.qweight")
        rows = plan.specs[hf_name][0][0] if what != "weight_shape" else None
        if what == "weight_shape":
            n = plan.specs[hf_name.replace("weight_shape", "weight_scale")][0][0]
            return torch.tensor([n, q.shape[1] * (2 if self.method == "int4" else 1)], dtype=torch.int64)
        if what == "weight_scale":
            s = self.qsrc.get(f"{mod}.scales")[:rows]
            return s[:, None] if self.method == "int8" else s
        ints = q[:rows] if self.method == "int8" else Q.unpack_int4(q[:rows])
        return pack_to_int32(ints.contiguous(), 8 if self.method == "int8" else 4)


def write_compressed(out: str | Path, plan: Any, packed: _Packed, *, max_shard_size: str | int = "5GB",
                     overwrite: bool = False, progress: Callable[[int], None] | None = None) -> Any:
    """Write the export ``plan_compressed`` planned, atomically and tensor by tensor."""
    from compressed_tensors.compressors import ModelCompressor

    from hybridctl.checkpoint.hf import _write_tokenizer

    view = packed.view

    def get(hf_name: str) -> torch.Tensor:
        if hf_name in packed.packed:
            return packed.get(hf_name, plan)
        n = plan.native_names[hf_name]
        if n not in view.specs:  # a tied model's NemotronH head
            return view.get("embed.weight").clone()
        return view.get(n)

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_sharded(tmp, plan.specs, get, max_shard_size=max_shard_size, progress=progress)
        _write_tokenizer(view, plan.tokenizer, tmp)
        write_json(tmp / "config.json", plan.config)
        ModelCompressor(quantization_config=packed.qc).update_config(str(tmp))
        files = sorted(p.name for p in tmp.iterdir())
    plan.files, plan.out = files, out
    return plan


def refuse_target(src: Source, to: str) -> None:
    """A quantized source goes only to hf (compressed-tensors); one clear line otherwise."""
    if src.info.get("quantization") is not None and to != "hf":
        method = src.info["quantization"].get("method")
        raise HybridctlError(f"{src.path}: a quantized checkpoint ({method}) cannot be converted to {to}: Megatron "
                             "and native writers hold dense weights only; use --to hf (compressed-tensors) or "
                             "convert the original checkpoint")
