"""``bench``'s output: the JSON object's schema (one written-down structure, checked by ``validate``) and the terminal
tables (``format_report``; ``--dry-run`` prints the grid and the memory estimate per row).

Schema notation: a type (or tuple of types; ``None`` allowed where listed) for a leaf, a dict for an object (every key
required; ``"*"`` maps any further keys), a one-element list for an array of that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))
STATS = {"mean": NUM, "std": NUM, "reps": [NUM]}
OPT_STATS = (STATS, type(None))

SPEED_ROW = {
    "model": str, "batch": int, "prompt_len": int, "new_tokens": int,
    "status": str,  # "ok" | "oom" | "planned" (dry run)
    "error": OPT_STR,  # "out of memory: ..." when status is "oom"
    "memory_estimate_bytes": int,
    "memory_estimate": {"weights": int, "ssm_state": int, "kv_cache": int, "activations": int, "total": int},
    "ssm_state_bytes": int, "kv_cache_bytes": int,
    "prefill_tokens_per_s": OPT_STATS, "decode_tokens_per_s": OPT_STATS, "ttft_s": OPT_STATS,
    "step_time_s": ({"p50": OPT_NUM, "p90": OPT_NUM, "p99": OPT_NUM, "resolution_steps": int}, type(None)),
    "warmup_s": OPT_NUM, "compile_s": OPT_NUM, "per_call_warmup_s": OPT_NUM, "decode_steps": (int, type(None)),
    "peak_memory_bytes": (int, type(None)), "peak_memory_source": OPT_STR,
    "decode_bytes_per_step": (int, type(None)), "roofline_fraction": OPT_NUM,
    "plan": (dict, type(None)),  # decode.DecodePlan.as_dict(): what ran
    "ratio_to_baseline": {"decode": OPT_NUM, "prefill": OPT_NUM},
}
TASK_ROW = {"model": str, "task": str, "layout": OPT_STR, "length": int, "depth": OPT_NUM, "examples": int,
            "correct": int, "accuracy": NUM, "prompt_tokens_mean": NUM, "prompt_tokens_max": int}
PPL_ROW = {"model": str, "file": str, "tokens": int, "window": int, "predicted": int, "loss": NUM, "ppl": NUM,
           "buckets": [{"lo": int, "hi": int, "tokens": int, "loss": NUM, "ppl": NUM}]}
SCHEMA = {
    "hybridctl_version": str, "device": str, "dtype": str, "dry_run": bool,
    "environment": {"device": str, "device_name": str, "torch": str, "triton": OPT_STR, "python": str,
                    "platform": str, "backend": str, "threads": int, "state_dtype": str,
                    "bandwidth_bytes_per_s": OPT_NUM, "bandwidth_source": str, "memory_capacity_bytes": int,
                    "memory_capacity_source": str, "decode_plan": (dict, type(None)), "*": object},
    "grid": {"batch": [int], "prompt_len": [int], "new_tokens": int, "reps": int, "warmup": int, "speed": bool,
             "task": OPT_STR, "lengths": ([int], type(None)), "depths": ([NUM], type(None)), "samples": int,
             "seed": int},
    "models": [{"name": str, "kind": str, "ref": str, "pattern": str, "params": int, "dtype": str,
                "weights_bytes": int, "baseline": bool}],
    "speed": [SPEED_ROW],
    "quality": {"ppl": [PPL_ROW], "tasks": [TASK_ROW]},
    "plots": [str],
}


def validate(obj: Any, schema: Any = SCHEMA, where: str = "$") -> list[str]:
    """Every place ``obj`` departs from ``schema`` (empty: it conforms), as "path: problem" strings."""
    if isinstance(schema, tuple) and any(isinstance(s, (dict, list)) for s in schema):
        attempts = [validate(obj, s, where) for s in schema]
        return [] if any(not a for a in attempts) else min(attempts, key=len)
    if isinstance(schema, dict):
        if not isinstance(obj, dict):
            return [f"{where}: expected an object, got {type(obj).__name__}"]
        errs = [f"{where}: missing key {k!r}" for k in schema if k != "*" and k not in obj]
        extra = [k for k in obj if k not in schema]
        if extra and "*" not in schema:
            errs.append(f"{where}: unexpected key(s) {extra}")
        for k, sub in schema.items():
            if k in obj:
                errs += validate(obj[k], sub, f"{where}.{k}")
        return errs
    if isinstance(schema, list):
        if not isinstance(obj, list):
            return [f"{where}: expected an array, got {type(obj).__name__}"]
        return [e for i, item in enumerate(obj) for e in validate(item, schema[0], f"{where}[{i}]")]
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(obj, bool) and bool not in types and object not in types:
        return [f"{where}: expected {'/'.join(t.__name__ for t in types)}, got bool"]
    return [] if isinstance(obj, types) else [f"{where}: expected {'/'.join(t.__name__ for t in types)}, got "
                                              f"{type(obj).__name__}"]


# ---- terminal tables ------------------------------------------------------------------------------------------------


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _grid(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _speed_table(rows: list[dict[str, Any]], dry_run: bool) -> str:
    if dry_run:
        header = ("model", "batch", "prompt", "weights", "state", "kv cache", "activations", "estimate", "fits")
        return _grid(header, [(r["model"], r["batch"], r["prompt_len"], _bytes(r["memory_estimate"]["weights"]),
                               _bytes(r["ssm_state_bytes"]), _bytes(r["kv_cache_bytes"]),
                               _bytes(r["memory_estimate"]["activations"]), _bytes(r["memory_estimate_bytes"]),
                               "no (out of memory)" if r["status"] == "oom" else "yes") for r in rows])
    header = ("model", "batch", "prompt", "prefill tok/s", "decode tok/s", "× base", "TTFT s", "p50/p99 ms",
              "peak mem", "state", "kv cache", "roofline", "warm-up s")
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append((r["model"], r["batch"], r["prompt_len"], r["error"] or r["status"], *[""] * 9))
            continue
        d, p = r["decode_tokens_per_s"], r["prefill_tokens_per_s"]
        st, ratio = r["step_time_s"], r["ratio_to_baseline"]["decode"]
        out.append((r["model"], r["batch"], r["prompt_len"], f"{p['mean']:.0f}", f"{d['mean']:.1f} ± {d['std']:.1f}",
                    _num(ratio, ".2f"), f"{r['ttft_s']['mean']:.3f}",
                    f"{_num(st['p50'] and st['p50'] * 1e3, '.2f')}/{_num(st['p99'] and st['p99'] * 1e3, '.2f')}",
                    _bytes(r["peak_memory_bytes"]), _bytes(r["ssm_state_bytes"]), _bytes(r["kv_cache_bytes"]),
                    _num(r["roofline_fraction"] and 100 * r["roofline_fraction"], ".0f") + "%"
                    if r["roofline_fraction"] is not None else "-", f"{r['warmup_s']:.1f}"))
    return _grid(header, out)


def format_report(res: dict[str, Any]) -> str:
    """The readable terminal report: environment, models, speed table, quality tables, plots written."""
    env = res["environment"]
    bw = env["bandwidth_bytes_per_s"]
    plan = env.get("decode_plan") or {}
    lines = [f"device {env['device']} ({env['device_name']}) | torch {env['torch']} | triton {env['triton'] or '-'} "
             f"| backend {env['backend']} | {env['threads']} threads | state {env['state_dtype']}",
             f"bandwidth {'-' if bw is None else f'{bw / 1e9:.1f} GB/s'} ({env['bandwidth_source']}) | memory "
             f"limit {_bytes(env['memory_capacity_bytes'])} ({env['memory_capacity_source']})"
             + (f" | decode plan {plan.get('mode')}" if plan else ""),
             "models: " + ", ".join(f"{m['name']} ({m['kind']}, {m['params'] / 1e6:.3g}M params, {m['dtype']}"
                                    f"{', baseline' if m['baseline'] else ''})" for m in res["models"])]
    if res["speed"]:
        g = res["grid"]
        lines += ["", f"speed: {g['new_tokens']} new tokens, {g['reps']} reps after {g['warmup']} warm-up"
                  + (" (dry run: memory estimate per row)" if res["dry_run"] else ""),
                  _speed_table(res["speed"], res["dry_run"])]
    for r in res["quality"]["ppl"]:
        lines += ["", f"perplexity {r['model']}: {r['ppl']:.3f} (loss {r['loss']:.4f} nats) over {r['predicted']} "
                  f"predictions, window {r['window']}, {r['file']}",
                  _grid(("positions", "tokens", "loss", "ppl"),
                        [(f"[{b['lo']}, {b['hi']})", b["tokens"], _num(b["loss"], ".4f"), _num(b["ppl"], ".3f"))
                         for b in r["buckets"]])]
    tasks = res["quality"]["tasks"]
    if tasks:
        lines += ["", f"task {tasks[0]['task']}: exact-match accuracy",
                  _grid(("model", "layout", "length", "depth", "accuracy", "correct", "prompt tokens"),
                        [(r["model"], r["layout"] or "-", r["length"], "-" if r["depth"] is None else
                          f"{r['depth']:.0%}", f"{r['accuracy']:.2f}", f"{r['correct']}/{r['examples']}",
                          f"{r['prompt_tokens_mean']:.0f}") for r in tasks])]
    if res["plots"]:
        lines += ["", "plots: " + ", ".join(res["plots"])]
    return "\n".join(lines)
