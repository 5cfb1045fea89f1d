"""``hybridctl quantize``: Mamba-aware weight-only quantization (int8 per channel, int4 group-wise) → a native
checkpoint.

Flow: open any checkpoint → per-tensor plan (policy below) → quantize the planned linears, round-to-nearest or, with
``calib``, GPTQ (Frantar et al. 2022: column-by-column rounding with the error spread over the not-yet-quantized
inputs by the inverse Hessian of the layer's calibration inputs; at int4 each group's scale is chosen, as the
column loop reaches the group, by an activation-aware clipping search: the shrink of max|w| / 7 whose rounding
error weighted by the inputs' mean squares is least) → write a native checkpoint whose config.json
carries a torch-free ``quantization`` section (method, group_size, policy, calibration, the swapped modules, the
kept tensors with reasons) → evaluate source and result on held-out text (perplexity, relative change, greedy
agreement).

Policy (USER_NEEDS.md "Quantization policy", PAPER.md §4): ``A_log``, ``D``, ``dt_bias``, ``conv1d``, every norm and
the embeddings are never quantized; the LM head only with ``include_head`` (never when tied to the embedding). Of
the projections (ModelOpt's policy names): ``default`` = Mamba in/out projections + MLP (what NVIDIA ships for its
hybrids; the few attention layers kept), ``aggressive`` = attention too, ``conservative`` = MLP only.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridctl import qlinear as Q
from hybridctl.config import HybridctlError

log = logging.getLogger(__name__)
POLICIES = {"default": ("mamba", "mlp"), "aggressive": ("mamba", "mlp", "attention"), "conservative": ("mlp",)}
_KIND_NAMES = {"mamba": "Mamba projection", "mlp": "MLP projection", "attention": "attention projection"}


@dataclass
class PlanRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    action: str  # "int8" | "int4 g128" | "kept"
    reason: str
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizeResult:
    source: str
    out: str | None
    method: str
    group_size: int | None
    policy: str
    include_head: bool
    calibration: str  # "rtn" | "gptq"
    dry_run: bool
    plan: list[PlanRow]
    modules: list[str]  # the swapped linears
    bytes_before: int
    bytes_after: int
    eval: dict[str, Any] | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = [asdict(r) | {"shape": list(r.shape)} for r in self.plan]
        d["quantized_tensors"] = len(self.modules)
        d["compression"] = self.bytes_before / max(self.bytes_after, 1)
        return d


# ---- the plan ----------------------------------------------------------------------------------------------------


def _linear_kinds(model: nn.Module) -> dict[str, str]:
    """Linear module name → mamba | attention | mlp | head."""
    from hybridctl.blocks import MLP, Attention, Mamba2Mixer

    kinds = {}
    for name, mod in model.named_modules():
        for cls, kind in ((Mamba2Mixer, "mamba"), (Attention, "attention"), (MLP, "mlp")):
            if isinstance(mod, cls):
                for child, sub in mod.named_children():
                    if type(sub) is nn.Linear:
                        kinds[f"{name}.{child}"] = kind
    if getattr(model, "lm_head", None) is not None:
        kinds["lm_head"] = "head"
    return kinds


def _never_reason(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("A_log", "D", "dt_bias"):
        return f"SSM parameter {leaf}: never quantized"
    if ".conv1d." in name:
        return "depthwise conv1d: never quantized"
    if name.startswith("embed."):
        return "embedding: never quantized"
    if any(part.startswith("norm") for part in name.split(".")):
        return "norm: never quantized"
    return "not a linear weight: kept"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def make_plan(config, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], *, method: str, group_size: int,
              policy: str, include_head: bool) -> tuple[list[PlanRow], list[str]]:
    """One row per tensor of the source (in state-dict order) and the linears to quantize; errors on a group size
    that does not divide a planned layer's input width."""
    from hybridctl.model import build_model

    model = build_model(config)
    kinds = _linear_kinds(model)
    wanted = set(POLICIES[policy]) | ({"head"} if include_head else set())
    label = "int8" if method == "int8" else f"int4 g{group_size}"
    rows, modules = [], []
    for name in model.state_dict():
        shape, dt = tuple(specs[name][0]), specs[name][1]
        before = _nbytes(shape, dt)
        mod, _, leaf = name.rpartition(".")
        kind = kinds.get(mod) if leaf == "weight" else None
        if kind is None:
            reason = "bias: kept" if mod in kinds else _never_reason(name)
            rows.append(PlanRow(name, shape, str(dt).removeprefix("torch."), "kept", reason, before, before))
            continue
        if kind not in wanted:
            reason = ("LM head: kept (include_head quantizes it)" if kind == "head"
                      else f"{_KIND_NAMES[kind]}: kept by policy {policy}")
            rows.append(PlanRow(name, shape, str(dt).removeprefix("torch."), "kept", reason, before, before))
            continue
        n, k = shape
        if method == "int4":
            Q.check_group(k, group_size, mod)
            after = n * k // 2 + n * (k // group_size) * dt.itemsize
        else:
            after = n * k + n * dt.itemsize
        why = "LM head (include_head)" if kind == "head" else f"{_KIND_NAMES[kind]} (policy {policy})"
        rows.append(PlanRow(name, shape, str(dt).removeprefix("torch."), label, why, before, after))
        modules.append(mod)
    return rows, modules


# ---- GPTQ ------------------------------------------------------------------------------------------------------------


def collect_hessians(model: nn.Module, modules: list[str], batches: list[dict[str, torch.Tensor]]
                     ) -> dict[str, torch.Tensor]:
    """H = Σ xᵀx (fp64, [K,K]) of each named linear's inputs over the calibration batches (one forward each)."""
    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            hs[name] = hs.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    dev = _device(model)
    try:
        with torch.no_grad():
            for b in batches:
                model(b["input_ids"].to(dev), seq_idx=_to(b.get("seq_idx"), dev))
    finally:
        for h in handles:
            h.remove()
    return {m: hs[m] / max(counts[m], 1) for m in modules if m in hs}


def clip_scales(w: torch.Tensor, importance: torch.Tensor, group_size: int,
                ratios: tuple[float, ...] = tuple(1.0 - 0.025 * i for i in range(13))) -> torch.Tensor:
    """Activation-aware int4 group scales [N, K/g]: per row and group, the shrink ratio r of max|w| / 7 (r from 1
    down to 0.7) whose rounded weights have the least error Σ_k importance_k (w_k − q_k s)², importance = the
    calibration inputs' mean square per column (the Hessian's diagonal). Ratio 1 is round-to-nearest's scale, so
    the error is never larger than RTN's on that measure."""
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    imp = importance.float().reshape(1, k // group_size, group_size)
    base = (wg.abs().amax(dim=2) / 7.0).clamp(min=1e-12)
    best, best_err = base.clone(), None
    for r in ratios:
        sc = base * r
        q = torch.clamp(torch.round(wg / sc[..., None]), -8, 7)
        err = ((wg - q * sc[..., None]) ** 2 * imp).sum(dim=2)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, sc, best)
        best_err = torch.where(better, err, best_err)
    return best


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, method: str, group_size: int, *, damp: float = 0.01,
                  act_order: bool = False, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for one weight w [N,K] with input Hessian [K,K]: (qweight, scales) in qlinear's layout. int4 scales are
    taken per group from the error-updated weights as the column loop reaches the group (blocks = groups), or, with
    ``act_order`` (columns in order of decreasing Hessian diagonal), fixed up front from the original weights
    ("static groups": the layout keeps consecutive groups); ``clip``: those int4 scales by ``clip_scales`` instead
    of max|w| / 7. int8 scales per row from the original weights."""
    W = w.detach().float().clone()
    n, k = W.shape
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.diag(H).clone()
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype, device=H.device)
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(k, device=W.device)
    Hp = H[perm][:, perm]
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    except torch.linalg.LinAlgError:
        log.warning("quantize: GPTQ Hessian not positive definite; round-to-nearest for this layer")
        return Q.quantize_int8(w) if method == "int8" else Q.quantize_int4(w, group_size)
    bits = 8 if method == "int8" else 4
    block = 128 if method == "int8" or act_order else group_size
    static = None
    if method == "int4" and act_order:
        static = clip_scales(W, diag, group_size) if clip else Q.int4_scales(W, group_size)
    qs = torch.empty(n, k, dtype=torch.int8, device=W.device)
    row_scales = Q.int8_scales(w) if method == "int8" else None
    group_scales = static if static is not None else torch.empty(n, max(1, k // max(group_size, 1)),
                                                                 device=W.device)
    W = W[:, perm]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Hi = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        if method == "int8":
            S = row_scales[:, None].expand(n, i2 - i1)
        elif static is not None:
            S = static[:, perm[i1:i2] // group_size]
        else:  # this block is exactly one group, its scale from the weights as GPTQ has updated them
            g = i1 // group_size
            cols = slice(i1, i2)
            sc = (clip_scales(W1, diag[cols], group_size) if clip else Q.int4_scales(W1, group_size))[:, 0]
            group_scales[:, g] = sc
            S = sc[:, None].expand(n, i2 - i1)
        for j in range(i2 - i1):
            col, s = W1[:, j], S[:, j]
            q = Q.round_to_grid(col, s, bits)
            qs[:, perm[i1 + j]] = q
            e = (col - q.float() * s) / Hi[j, j]
            W1[:, j:] -= e[:, None] * Hi[j, j:][None]
            err[:, j] = e
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    if method == "int8":
        return qs, row_scales
    return Q.pack_int4(qs), group_scales


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(t: torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(dev)


# ---- data and evaluation -------------------------------------------------------------------------------------------


def _batches(source: str, tok: Any, *, split: str, seq_len: int, batch_size: int, n_rows: int, what: str
             ) -> list[dict[str, torch.Tensor]]:
    from hybridctl.data import build_loader

    try:
        loader = build_loader(source=source, tokenizer=tok, seq_len=seq_len, batch_size=batch_size, split=split,
                              epochs=1)
        out, rows = [], 0
        for b in loader:
            out.append({k: b[k] for k in ("input_ids", "labels", "seq_idx") if b.get(k) is not None})
            rows += b["input_ids"].shape[0]
            if rows >= n_rows:
                break
    except HybridctlError as e:
        raise HybridctlError(f"{what} {source!r}: {e}") from None
    except OSError as e:
        raise HybridctlError(f"{what} {source!r}: cannot read ({e})") from None
    if not out:
        raise HybridctlError(f"{what} {source!r}: no sequences of {seq_len} tokens in the {split} split")
    return out


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    from hybridctl.data import IGNORE_INDEX

    total, n = 0.0, 0
    dev = _device(model)
    for b in batches:
        logits = model(b["input_ids"].to(dev), seq_idx=_to(b.get("seq_idx"), dev))
        y = b["labels"].to(dev)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        n += int((y != IGNORE_INDEX).sum())
    return math.exp(total / max(n, 1))


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation of prompt [1,L] by ``n`` tokens through the inference cache."""
    cache = model.allocate_cache(1, prompt.shape[1] + n)
    logits = model(prompt, cache=cache)[:, -1]
    out = []
    for _ in range(n):
        nxt = logits.argmax(-1)
        out.append(int(nxt))
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out


@torch.no_grad()
def agreement(source: nn.Module, result: nn.Module, prompt: torch.Tensor, n: int) -> dict[str, Any]:
    """Greedy agreement over ``n`` tokens: the share of the source's greedy tokens the result also predicts
    (teacher-forced on the source's continuation), and the length of the identical free-running prefix."""
    prompt = prompt.to(_device(source))
    ref = greedy(source, prompt, n)
    mine = greedy(result, prompt, n)
    seq = torch.cat([prompt, torch.tensor([ref[:-1]], device=prompt.device)], dim=1)
    pred = result(seq)[0, prompt.shape[1] - 1:].argmax(-1).tolist()
    same = next((i for i, (a, b) in enumerate(zip(ref, mine)) if a != b), n)
    return {"greedy_tokens": n, "greedy_agreement": sum(a == b for a, b in zip(ref, pred)) / n,
            "greedy_identical_prefix": same}


def evaluate(source: nn.Module, result: nn.Module, batches: list[dict[str, torch.Tensor]], *, greedy_tokens: int,
             prompt_len: int = 32) -> dict[str, Any]:
    ppl_s, ppl_q = perplexity(source, batches), perplexity(result, batches)
    out = {"ppl_source": ppl_s, "ppl_quantized": ppl_q, "ppl_change": ppl_q / ppl_s - 1.0,
           "eval_tokens": sum(int(b["input_ids"].numel()) for b in batches)}
    if greedy_tokens > 0:
        out |= agreement(source, result, batches[0]["input_ids"][:1, :prompt_len], greedy_tokens)
    return out


# ---- the entry function ----------------------------------------------------------------------------------------------


def _check_args(method: str, group_size: int, policy: str, source: Path, out: Path | None, dry_run: bool) -> None:
    if method not in Q.METHODS:
        raise HybridctlError(f"--method: unknown method {method!r} (choose from {', '.join(Q.METHODS)})")
    if method == "int4" and group_size not in Q.GROUP_SIZES:
        raise HybridctlError(f"--group-size: must be one of {', '.join(map(str, Q.GROUP_SIZES))}, got {group_size}")
    if policy not in POLICIES:
        raise HybridctlError(f"--policy: unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    if out is None and not dry_run:
        raise HybridctlError("--out: required (or pass --dry-run)")
    if out is not None:
        if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
            raise HybridctlError(f"--out {out}: is (inside) the source checkpoint; choose another directory")
        if not dry_run and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise HybridctlError(f"{out}: already exists (choose another --out, or remove it)")


def quantized_model(model: nn.Module, modules: list[str], method: str, group_size: int,
                    hessians: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` (fp32) with the named linears swapped for quantized ones (GPTQ where a Hessian is given;
    at int4 with activation-aware clipped group scales, ``clip_scales``: on the README's tiny model that cut GPTQ's
    perplexity increase from 72% of round-to-nearest's to 10%, benchmarks/quantize.md)."""
    qm = copy.deepcopy(model)
    for name in modules:
        lin = qm.get_submodule(name)
        qw = sc = None
        if hessians and name in hessians:
            qw, sc = gptq_quantize(lin.weight, hessians[name], method, group_size, clip=method == "int4")
        Q.set_submodule(qm, name, Q.from_linear(lin, method, group_size, qweight=qw, scales=sc))
    return qm.eval()


def quantize(*, source: str | Path, out: str | Path | None = None, method: str = "int8", group_size: int = 128,
             policy: str = "default", include_head: bool = False, calib: str | None = None,
             calib_samples: int = 128, calib_seq_len: int = 256, eval_data: str | None = "builtin",
             eval_samples: int = 16, eval_seq_len: int = 256, greedy_tokens: int = 200, dry_run: bool = False,
             max_shard_size: str | int = "5GB", device: str = "cpu") -> QuantizeResult:
    """Quantize a checkpoint (see the module docstring). ``eval_data=None`` skips the evaluation; ``dry_run`` only
    plans (no weights read, nothing written); ``device``: where calibration, quantization and evaluation run (fp32)."""
    from hybridctl.checkpoint import open_checkpoint

    t0 = time.perf_counter()
    src_path, out_path = Path(source), (Path(out) if out is not None else None)
    _check_args(method, group_size, policy, src_path, out_path, dry_run)
    src = open_checkpoint(src_path)
    if src.info.get("quantization") is not None:
        raise HybridctlError(f"{src_path}: already quantized ({src.info['quantization'].get('method')}); "
                             "quantize the original checkpoint")
    g = group_size if method == "int4" else None
    rows, modules = make_plan(src.config, src.specs, method=method, group_size=group_size, policy=policy,
                              include_head=include_head)
    res = QuantizeResult(str(src_path), None if out_path is None else str(out_path), method, g, policy,
                         include_head, "gptq" if calib else "rtn", dry_run, rows, modules,
                         sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows))
    if include_head and src.config.tie_embeddings:
        res.notes.append("include_head: the LM head is tied to the embedding, which is never quantized")
    if dry_run:
        res.seconds = time.perf_counter() - t0
        return res
    _run(src, res, out_path, calib=calib, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
         eval_data=eval_data, eval_samples=eval_samples, eval_seq_len=eval_seq_len, greedy_tokens=greedy_tokens,
         max_shard_size=max_shard_size, device=device)
    res.seconds = time.perf_counter() - t0
    return res


def _run(src, res: QuantizeResult, out: Path, *, calib: str | None, calib_samples: int, calib_seq_len: int,
         eval_data: str | None, eval_samples: int, eval_seq_len: int, greedy_tokens: int,
         max_shard_size: str | int, device: str = "cpu") -> None:
    from hybridctl.checkpoint import load_model, load_tokenizer_for

    tok = None
    if calib or eval_data:
        if src.tokenizer_dir is None:
            if calib:
                raise HybridctlError(f"{src.path}: the checkpoint carries no tokenizer, needed to read --calib")
            res.notes.append("evaluation skipped: the checkpoint carries no tokenizer")
            eval_data = None
        else:
            tok = load_tokenizer_for(src)
    calib_batches = _batches(calib, tok, split="train", seq_len=calib_seq_len, batch_size=8, n_rows=calib_samples,
                             what="--calib") if calib else None
    eval_batches = _batches(eval_data, tok, split="eval", seq_len=eval_seq_len, batch_size=4, n_rows=eval_samples,
                            what="--eval-data") if eval_data else None
    model, _ = load_model(src, device=device, dtype=torch.float32)
    hessians = collect_hessians(model, res.modules, calib_batches) if calib_batches else None
    qm = quantized_model(model, res.modules, res.method, res.group_size or 0, hessians)
    write_quantized(qm, src, res, out, max_shard_size=max_shard_size)
    if eval_batches:
        res.eval = evaluate(model, qm, eval_batches, greedy_tokens=greedy_tokens) | {"eval_data": eval_data}
        log.info("quantize: ppl %.4f → %.4f (%+.2f%%)", res.eval["ppl_source"], res.eval["ppl_quantized"],
                 100 * res.eval["ppl_change"])


def quantization_section(res: QuantizeResult) -> dict[str, Any]:
    """The torch-free config.json section (what ``checkpoint.load_model`` swaps, and the record of what was kept)."""
    return {"method": res.method, "group_size": res.group_size, "symmetric": True, "policy": res.policy,
            "include_head": res.include_head, "calibration": res.calibration, "modules": list(res.modules),
            "kept": {r.name: r.reason for r in res.plan if r.action == "kept"}}


def write_quantized(qm: nn.Module, src, res: QuantizeResult, out: Path, *, max_shard_size: str | int) -> None:
    """Atomic native checkpoint: integer tensors as they are, floats in the source's stored dtype (scales in their
    weight's)."""
    from hybridctl.checkpoint import check_specs
    from hybridctl.checkpoint.native import dtype_name, write_native

    sd = {k: v.detach().cpu() for k, v in qm.state_dict().items()}
    specs = {}
    for k, v in sd.items():
        mod, _, leaf = k.rpartition(".")
        stored = src.specs.get(k, src.specs.get(f"{mod}.weight", (None, v.dtype)))[1]
        specs[k] = (tuple(v.shape), stored if v.dtype.is_floating_point else v.dtype)
    section = quantization_section(res)
    check_specs(src.config, specs, "quantize", section)
    write_native(out, config=src.config, specs=specs, get=sd.__getitem__, tokenizer_dir=src.tokenizer_dir,
                 max_shard_size=max_shard_size, validated=True,
                 extra={"dtype": dtype_name(src.dtype), "quantization": section})
