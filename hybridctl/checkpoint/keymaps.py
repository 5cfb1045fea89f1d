"""Name tables between hybridctl's native state-dict names and other formats, each with its inverse.

A `KeyMap` is an ordered list of rules ``(native template, foreign template)``. Templates are literal names with
placeholders: ``{i}`` a layer index (digits) and ``{rest}`` any suffix. The same rules run in both directions, so
``to_native(to_foreign(n)) == n`` holds by construction (tests check it on every table). Tensor layouts are
unchanged by every table in this file: the native layout *is* Hugging Face's (in_proj rows ``[z, x, B, C, dt]``,
conv1d channels ``[x, B, C]``), so only names differ.

Sections: Hugging Face (NemotronH, Mamba2ForCausalLM, mamba_ssm). Other formats add their tables in their own section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hybridctl.config import HybridctlError

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "rest": r"(?P<rest>.+)"}


def _compile(template: str) -> re.Pattern[str]:
    """'layers.{i}.{rest}' → ^layers\\.(?P<i>\\d+)\\.(?P<rest>.+)$"""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(_PLACEHOLDERS[m.group(1)])
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


@dataclass(frozen=True)
class KeyMap:
    """An invertible name table. ``rules``: (native template, foreign template), first match wins."""

    name: str
    rules: tuple[tuple[str, str], ...]

    def _apply(self, key: str, src: int) -> str | None:
        for rule in self.rules:
            m = _compile(rule[src]).match(key)
            if m:
                return rule[1 - src].format(**m.groupdict())
        return None

    def to_foreign(self, native: str) -> str:
        out = self._apply(native, 0)
        if out is None:
            raise HybridctlError(f"{self.name}: no name for native tensor {native!r}")
        return out

    def to_native(self, foreign: str) -> str | None:
        """The native name, or None when the name is not in this table (the caller decides whether that is an
        error)."""
        return self._apply(foreign, 1)


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------------------------

# transformers' NemotronHForCausalLM and Mamba2ForCausalLM share one on-disk layout (`backbone.` prefix, plural
# `embeddings`); mixer names under layers.{i}.mixer are already the native ones.
HF_BACKBONE = KeyMap("hf", (
    ("embed.weight", "backbone.embeddings.weight"),
    ("layers.{i}.{rest}", "backbone.layers.{i}.{rest}"),
    ("norm_f.weight", "backbone.norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
))

# transformers 5 renames `backbone.` to `model.` in memory for NemotronH and writes `backbone.` back on save; a
# state dict saved some other way (torch.save(model.state_dict()) → safetensors) carries `model.`. Read-only alias.
HF_MODEL_PREFIX = KeyMap("hf-model-prefix", (
    ("embed.weight", "model.embeddings.weight"),
    ("layers.{i}.{rest}", "model.layers.{i}.{rest}"),
    ("norm_f.weight", "model.norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
))

# mamba_ssm MambaLMHeadModel: singular `embedding`.
MAMBA_SSM = KeyMap("mamba_ssm", (
    ("embed.weight", "backbone.embedding.weight"),
    ("layers.{i}.{rest}", "backbone.layers.{i}.{rest}"),
    ("norm_f.weight", "backbone.norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
))

# NemotronH's layers_block_type names ↔ the pattern alphabet (transformers' own _pattern_to_list table; MoE 'E' is
# listed so that it is recognised and refused with a clear message, not mistaken for an unknown type).
NEMOTRON_BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
NEMOTRON_BLOCK_SYMBOLS = {v: k for k, v in NEMOTRON_BLOCK_TYPES.items()}
# Legacy NemotronH remote-code configs used these names for the same blocks.
NEMOTRON_BLOCK_SYMBOLS.update({"mamba": "M", "attention": "*"})

# MLP activation: hybridctl name ↔ transformers ACT2FN name. gelu is the exact (erf) GELU in both; relu2 is
# squared ReLU in both. swiglu has no NemotronH equivalent (its MLP has no gate projection).
HF_MLP_ACT = {"gelu": "gelu", "relu2": "relu2"}
HF_MLP_ACT_INV = {v: k for k, v in HF_MLP_ACT.items()}
