"""Training recipes: typed, torch-free dataclasses loaded from TOML, with ``--set section.key=value`` overrides.

A recipe is one TOML file with a few top-level keys (``name``, ``seed``) and one table per concern:

  [model]       preset / pattern / config (overrides of ModelConfig fields), or init_from (any readable checkpoint)
  [data]        source (builtin | phonebook | copy | files/globs | Megatron prefix), seq_len, held-out split options
  [tokenizer]   name: "byte" or a tokenizer path (default: the init_from checkpoint's tokenizer, else byte)
  [optim]       steps or a token budget, micro/global batch (→ gradient accumulation), lr schedule, AdamW, clipping
  [precision]   dtype: auto (bf16 autocast + fp32 master weights on CUDA, fp32 on CPU) | float32 | bfloat16
  [checkpoint]  dir (the run directory), interval, keep_last, export (final native checkpoint)
  [eval]        interval, batches
  [logging]     interval, progress, peak_tflops (for MFU)
  [parallel]    compile, activation_checkpointing, reshard_after_forward, fsdp_param_dtype (FSDP2)

Unknown keys are errors that name the closest valid key; values are type-checked with messages naming the field.
``resolve_recipe`` expands the model section into the complete ModelConfig dict, so the resolved recipe saved in a run
directory (``dump_toml``) describes the run on its own.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridctl.config import HybridctlError, ModelConfig, apply_overrides, parse_pattern, preset_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class ModelSection:
    preset: str | None = None  # default "tiny" when neither pattern nor init_from decides
    pattern: str | None = None  # replaces the preset's pattern
    init_from: str | None = None  # a checkpoint directory (native / HF / Megatron): its config and weights
    config: dict = field(default_factory=dict)  # ModelConfig fields (nested tables for mamba/attention/mlp)
    rope_base: float | None = None  # with init_from: replaces the checkpoint's attention.rope_base (context extension)

    def __post_init__(self) -> None:
        if self.init_from is not None and (self.preset or self.pattern or self.config):
            raise HybridctlError("model.init_from: the checkpoint's config.json defines the model; remove "
                                 "model.preset / model.pattern / model.config")
        if self.rope_base is not None and (self.init_from is None or not self.rope_base > 0):
            raise HybridctlError("model.rope_base: a positive base, only with model.init_from (elsewhere set "
                                 "model.config.attention.rope_base)")


@dataclass
class DataSection:
    source: str | list = "builtin"  # builtin | phonebook | copy | file, directory, glob or Megatron prefix (or a list)
    seq_len: int = 256
    eval_every: int = 20  # held-out split: a document is eval iff hash(content) % eval_every == 0
    text_field: str = "text"  # JSONL field
    shuffle_buffer: int = 1024
    task_options: dict = field(default_factory=dict)  # phonebook: n_entries, context_len; copy: min_len, max_len
    # long-context mixing (data.build_loader's MixedLoader; extend-context writes these): rows drawn by weight from
    # "corpus" (the source) and the tasks "phonebook" / "needle" / "copy" at seq_len; weights sum to 1
    mix: dict = field(default_factory=dict)
    short_fraction: float = 0.0  # fraction of rows made of short_seq_len-token sequences (each its own document)
    short_seq_len: int = 0  # the short sequences' length (required when short_fraction > 0)
    min_doc_tokens: int = 0  # in mixed rows, corpus documents shorter than this are skipped (long documents only)

    def __post_init__(self) -> None:
        at_least("data", seq_len=(self.seq_len, 1), eval_every=(self.eval_every, 2),
                  shuffle_buffer=(self.shuffle_buffer, 1), short_seq_len=(self.short_seq_len, 0),
                  min_doc_tokens=(self.min_doc_tokens, 0))
        check_mix(self.mix, self.short_fraction, self.short_seq_len, self.seq_len)
        if isinstance(self.source, list) and not all(isinstance(s, str) for s in self.source):
            raise HybridctlError("data.source: a list of sources must hold strings only")

    @property
    def task(self) -> str | None:
        return self.source if self.source in ("phonebook", "copy", "needle") else None


@dataclass
class TokenizerSection:
    name: str | None = None  # "byte" or a path (tokenizer.json / tokenizer.model / a directory)


@dataclass
class OptimSection:
    steps: int | None = None  # optimizer steps; or derive them from a token budget
    tokens: int | None = None  # token budget: steps = ceil(tokens / (global_batch * seq_len))
    micro_batch: int = 8  # sequences per device per forward/backward
    global_batch: int = 8  # sequences per optimizer step (all devices, all accumulation steps)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays linearly to min_lr
    weight_decay: float = 0.1  # not applied to A_log, D, dt_bias, norms and biases (model.no_weight_decay)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.tokens is None):
            raise HybridctlError("optim: give exactly one of optim.steps and optim.tokens")
        at_least("optim", micro_batch=(self.micro_batch, 1), global_batch=(self.global_batch, 1),
                  warmup_steps=(self.warmup_steps, 0),
                  **({"steps": (self.steps, 1)} if self.steps is not None else {"tokens": (self.tokens, 1)}))
        if self.global_batch % self.micro_batch:
            raise HybridctlError(f"optim.global_batch: {self.global_batch} is not a multiple of micro_batch "
                                 f"{self.micro_batch}")
        if self.schedule not in SCHEDULES:
            raise HybridctlError(f"optim.schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise HybridctlError(f"optim.min_lr: need 0 <= min_lr <= lr and lr > 0, got {self.min_lr}, {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise HybridctlError(f"optim.{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise HybridctlError(f"optim.decay_fraction: must be in [0, 1], got {self.decay_fraction}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise HybridctlError("optim.weight_decay / grad_clip must be >= 0 and optim.eps > 0")


@dataclass
class PrecisionSection:
    dtype: str = "auto"  # auto: bf16 autocast with fp32 master weights on CUDA, fp32 on CPU

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS:
            raise HybridctlError(f"precision.dtype: must be one of {', '.join(PRECISIONS)}, got {self.dtype!r}")


@dataclass
class CheckpointSection:
    dir: str = "runs/default"  # the run directory: checkpoints/, metrics.jsonl, recipe.toml, final/
    interval: int = 0  # optimizer steps between resumable checkpoints; 0: only at the end
    keep_last: int = 2  # resumable checkpoints kept (the newest k)
    export: bool = True  # write a native safetensors checkpoint (with tokenizer) to <dir>/final at the end
    export_dtype: str = "float32"  # float32 | bfloat16

    def __post_init__(self) -> None:
        at_least("checkpoint", interval=(self.interval, 0), keep_last=(self.keep_last, 1))
        if self.export_dtype not in ("float32", "bfloat16"):
            raise HybridctlError(f"checkpoint.export_dtype: float32 or bfloat16, got {self.export_dtype!r}")


@dataclass
class EvalSection:
    interval: int = 0  # optimizer steps between evaluations; 0: only at the end
    batches: int = 4  # micro-batches per evaluation (per device)

    def __post_init__(self) -> None:
        at_least("eval", interval=(self.interval, 0), batches=(self.batches, 0))


@dataclass
class LoggingSection:
    interval: int = 10  # steps between metric lines
    progress: bool = True  # tqdm bar on stderr (rank 0)
    peak_tflops: float | None = None  # accelerator peak for MFU (default: known datasheet value for the GPU)

    def __post_init__(self) -> None:
        at_least("logging", interval=(self.interval, 1))


@dataclass
class ParallelSection:
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    reshard_after_forward: bool = True  # FSDP2: free gathered parameters after forward (ZeRO-3); False ≈ ZeRO-2
    # FSDP2 all-gather dtype under bf16: "float32" gathers the fp32 master weights and lets autocast cast the matmul
    # inputs — the same numerics as one device; "bfloat16" halves the gather traffic but also rounds norms, A_log,
    # dt_bias and D to bf16, so 1- and N-device losses differ beyond noise.
    fsdp_param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.fsdp_param_dtype not in ("float32", "bfloat16"):
            raise HybridctlError(f"parallel.fsdp_param_dtype: must be float32 or bfloat16, got "
                                 f"{self.fsdp_param_dtype!r}")


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(steps=100))
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    # ---- derived ---------------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        o = self.optim
        if o.steps is not None:
            return o.steps
        return math.ceil(o.tokens / (o.global_batch * self.data.seq_len))

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank: global_batch / (micro_batch · world_size)."""
        o = self.optim
        per_step = o.micro_batch * world_size
        if o.global_batch % per_step:
            raise HybridctlError(f"optim.global_batch ({o.global_batch}) must be a multiple of micro_batch × "
                                 f"world size ({o.micro_batch} × {world_size})")
        return o.global_batch // per_step

    def model_config(self) -> ModelConfig | None:
        """The model's config (None when it comes from model.init_from, read at train time)."""
        if self.model.init_from is not None:
            return None
        return ModelConfig.from_dict(self.model.config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MIX_COMPONENTS = ("corpus", "phonebook", "needle", "copy")


def check_mix(mix: dict, short_fraction: float, short_seq_len: int, seq_len: int) -> None:
    """data.mix: known components, weights >= 0 summing to 1; short_fraction in [0, 1) with a short_seq_len that
    fits seq_len."""
    for k, v in mix.items():
        if k not in MIX_COMPONENTS:
            raise HybridctlError(f"data.mix: unknown component {k!r}; valid: {', '.join(MIX_COMPONENTS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise HybridctlError(f"data.mix.{k}: must be a number >= 0, got {v!r}")
    if mix and abs(sum(mix.values()) - 1.0) > 1e-6:
        raise HybridctlError(f"data.mix: the weights must sum to 1, got {sum(mix.values()):g} "
                             f"({', '.join(f'{k}={v:g}' for k, v in mix.items())})")
    if not 0.0 <= short_fraction < 1.0:
        raise HybridctlError(f"data.short_fraction: must be in [0, 1), got {short_fraction}")
    if short_fraction > 0 and not 1 <= short_seq_len <= seq_len:
        raise HybridctlError(f"data.short_seq_len: short_fraction > 0 needs 1 <= short_seq_len <= seq_len "
                             f"({seq_len}), got {short_seq_len}")


def at_least(owner: str, **values: tuple[Any, int]) -> None:
    """Each ``name=(value, low)`` must be an int (not a bool) >= low; the message names ``owner.name``."""
    for name, (v, low) in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise HybridctlError(f"{owner}.{name}: must be an integer >= {low}, got {v!r}")


# ---- typed construction from a dict ---------------------------------------------------------------------------------


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # finite: inf / nan (TOML has both) would pass every positivity check
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**63 - 1
    return isinstance(value, origin or tp)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _build(cls: type, d: Any, owner: str) -> Any:
    """A dataclass from a dict: unknown keys suggest the closest valid one; every value is type-checked."""
    _check_keys(cls, d, owner)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        path, tp = (f"{owner}.{k}" if owner else k), hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, path)
        elif not _type_ok(v, tp):
            if isinstance(v, float) and not math.isfinite(v):
                raise HybridctlError(f"{path}: expected a finite number, got {v!r}")
            raise HybridctlError(f"{path}: expected {_type_name(tp)}, got {type(v).__name__} {v!r}")
        else:
            kwargs[k] = float(v) if tp is float else v
    return cls(**kwargs)


def _check_keys(cls: type, d: Any, owner: str) -> None:
    """Only the key names of a (partial) dict against a dataclass, recursively: unknown → closest valid key."""
    if not isinstance(d, dict):
        raise HybridctlError(f"{owner or 'recipe'}: expected a table, got {type(d).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        if k not in fields:
            close = difflib.get_close_matches(k, fields, n=1)
            pre = f"{owner}." if owner else ""
            hint = f"; did you mean {pre}{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            raise HybridctlError(f"{pre}{k}: unknown key{hint}")
        if dataclasses.is_dataclass(hints[k]):
            _check_keys(hints[k], v, f"{owner}.{k}" if owner else k)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursively for tables present in both."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def resolve_recipe(raw: dict[str, Any], overrides: list[str] | None = None, *, init_from: str | None = None,
                   where: str = "recipe") -> Recipe:
    """Raw TOML dict + ``--set`` overrides → a validated Recipe whose model.config is the complete ModelConfig.

    Order: unknown keys are rejected first (with a suggestion); ``--set model.config.*`` is applied after the preset
    and pattern are expanded (so any ModelConfig field can be set); every other ``--set`` before.
    init_from (``--init-from``): start from that checkpoint instead of the recipe's model section.
    """
    _check_keys(Recipe, raw, "")
    if init_from is not None:
        raw = dict(raw, model={"init_from": str(init_from)})
    d = _merge(Recipe().to_dict(), {k: v for k, v in raw.items() if k != "model"})
    d["model"] = _merge(dataclasses.asdict(ModelSection()), raw.get("model", {}))
    if "tokens" in raw.get("optim", {}) and "steps" not in raw["optim"]:
        d["optim"]["steps"] = None  # a token budget replaces the default step count
    overrides = list(overrides or [])
    model_sets = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.config.")]
    apply_overrides(d, [o for o in overrides if o not in model_sets])
    m = d["model"]
    if m.get("init_from") is None:
        if not isinstance(m.get("config"), dict):
            raise HybridctlError("model.config: expected a table of ModelConfig fields")
        _check_keys(ModelConfig, m["config"], "model.config")
        for k in ("preset", "pattern"):
            if m.get(k) is not None and not isinstance(m[k], str):
                raise HybridctlError(f"model.{k}: expected str, got {type(m[k]).__name__} {m[k]!r}")
        cfg = preset_dict(m.get("preset") or "tiny")
        if m.get("pattern"):
            cfg["pattern"] = parse_pattern(m["pattern"])
        cfg = _merge(cfg, m["config"])
        apply_overrides({"model": {"config": cfg}}, model_sets)
        ModelConfig.from_dict(cfg)  # validate now, with the config's own messages
        m["config"] = cfg
    elif model_sets:
        raise HybridctlError("--set model.config.*: not with model.init_from (the checkpoint defines the model)")
    try:
        return _build(Recipe, d, "")
    except TypeError as e:  # a dataclass constructor rejecting a value the type check let through
        raise HybridctlError(f"{where}: {e}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, init_from: str | None = None) -> Recipe:
    """Read a TOML recipe, apply ``--set`` overrides (and ``--init-from``), validate."""
    p = Path(path)
    if not p.is_file():
        raise HybridctlError(f"{p}: no such recipe file")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise HybridctlError(f"{p}: invalid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise HybridctlError(f"{p}: not valid UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise HybridctlError(f"{p}: cannot read ({e.strerror or e})") from None
    return resolve_recipe(raw, overrides, init_from=init_from, where=str(p))


# ---- writing the resolved recipe --------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise HybridctlError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(d: dict[str, Any], _prefix: str = "") -> str:
    """A nested dict of scalars/lists as TOML (None values are omitted: TOML has no null, and None is the default
    wherever it is allowed)."""
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{_prefix}{k}"
        body = dump_toml(v, f"{name}.")
        out += f"\n\n[{name}]\n{body}" if body.strip() else f"\n\n[{name}]"
    return out.strip() + "\n" if not _prefix else out.strip()


def recipe_files(directory: str | Path = "recipes") -> list[Path]:
    return sorted(Path(directory).glob("*.toml"))


__all__ = ["Recipe", "load_recipe", "resolve_recipe", "dump_toml", "recipe_files", "SCHEDULES", "MIX_COMPONENTS",
           "check_mix"]
