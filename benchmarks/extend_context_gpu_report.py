"""Collect the stages of benchmarks/extend_context_gpu.sh (issue #17) into OUT/results.json, print a summary table,
and draw OUT/ppl_by_position.png and OUT/accuracy_vs_length.png (when matplotlib imports). Run after every stage, so
a cut call still returns every finished stage; also redraws the plots from a results.json on another machine:

    python3 benchmarks/extend_context_gpu_report.py WORKDIR OUT          # from the stages' run directories
    python3 benchmarks/extend_context_gpu_report.py --replot results.json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

STAGES = ("hyb", "hyb16", "mam", "mam16", "hyb32", "mam32")  # the script's order
EVAL_FILES = ("plan.json", "eval_before.json", "eval_after.json", "report.json")


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def headline(rows: list[dict], summary: dict | None, report: dict | None) -> dict:
    """tokens/s (median of the logged windows after the first, which holds the JIT/autotune), peak memory."""
    evals = [r for r in rows if "eval_loss" in r]
    rows = [r for r in rows if "loss" in r]
    tps = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")] or \
        [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    mem = [r["max_memory_gib"] for r in rows if r.get("max_memory_gib") is not None]
    train = (report or {}).get("train") or (summary or {})
    peak = train.get("peak_memory_bytes")
    return {"steps": rows[-1]["step"] if rows else None, "final_loss": rows[-1]["loss"] if rows else None,
            "tokens_per_s_steady": statistics.median(tps) if tps else None,
            "tokens_per_s_whole": train.get("tokens_per_s"), "peak_memory_gib": peak / 2**30 if peak else
            (max(mem) if mem else None), "eval_loss": train.get("eval_loss", evals[-1]["eval_loss"] if evals else None)}


def stage(w: Path, name: str) -> dict | None:
    d = w / name
    if not d.is_dir() and not (w / f"{name}.rc").is_file():
        return None
    rc = (w / f"{name}.rc").read_text().strip() if (w / f"{name}.rc").is_file() else None
    out = {"exit": int(rc) if rc and rc.lstrip("-").isdigit() else rc, "summary": _json(w / f"{name}.summary.json"),
           "metrics": _metrics(d / "metrics.jsonl")}
    for f in EVAL_FILES:
        out[f.removesuffix(".json")] = _json(d / f)
    report = out["report"]
    out["headline"] = headline(out["metrics"], out["summary"], report)
    plan = out["plan"] or {}
    trained = ((_json(d / "final" / "config.json") or {}).get("model") or {}).get("max_seq_len")
    out["headline"].update(seq_len=plan.get("seq_len", trained),
                           micro_batch=plan.get("micro_batch"),
                           activation_checkpointing=plan.get("activation_checkpointing"),
                           planned_total_gib=(plan.get("memory") or {}).get("total", 0) / 2**30 or None)
    if report:
        out["headline"]["compare"] = report["compare"]
    return out


def table(res: dict) -> str:
    lines = ["| stage | exit | seq | mb | tokens/s | peak GiB (plan) | ppl <base b→a | ppl >base b→a | short loss Δ "
             "| needle b→a | phonebook b→a |", "|" + "---|" * 11]
    f = (lambda x, p=3: "-" if x is None else f"{x:.{p}g}")
    for name in STAGES:
        s = res["stages"].get(name)
        if s is None:
            continue
        h, c = s["headline"], s["headline"].get("compare") or {}
        acc = {t: " ".join(f"{k}:{f(v['before'], 2)}→{f(v['after'], 2)}" for k, v in c.get(t, {}).items())
               for t in ("needle", "phonebook")}
        pw, pb, sl = c.get("ppl_within_base", {}), c.get("ppl_beyond_base", {}), c.get("short_context_loss", {})
        lines.append(f"| {name} | {s['exit']} | {h['seq_len']} | {h['micro_batch'] or '-'} | "
                     f"{f(h['tokens_per_s_steady'], 5)} | {f(h['peak_memory_gib'])} ({f(h['planned_total_gib'])}) | "
                     f"{f(pw.get('before'))}→{f(pw.get('after'))} | {f(pb.get('before'))}→{f(pb.get('after'))} | "
                     f"{'-' if sl.get('change') is None else format(sl['change'], '+.2%')} | "
                     f"{acc['needle'] or '-'} | {acc['phonebook'] or '-'} |")
    return "\n".join(lines)


def plots(res: dict, out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = [(n, s) for n, s in res["stages"].items() if s and n[-1].isdigit() and (s["eval_before"] or s["report"])]
    if not runs:
        return []
    made = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, s) in enumerate(runs):
        for when, style in (("eval_before", "--"), ("eval_after", "-")):
            ev = s.get(when)
            if not ev:
                continue
            b = [r for r in ev["perplexity"]["buckets"] if r["lo"] >= 1]
            ax.plot([(r["lo"] + r["hi"]) / 2 for r in b], [r["ppl"] for r in b], style, marker=".", color=f"C{i}",
                    label=f"{name} {when[5:]}")
    ax.set(xscale="log", yscale="log", xlabel="position (bucket middle)", ylabel="perplexity",
           title="Perplexity by position: 4K base (before) vs extended (after)")
    ax.legend(fontsize=7)
    made.append(_save(fig, out / "ppl_by_position.png", plt))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, task in zip(axes, ("needle", "phonebook")):
        for i, (name, s) in enumerate(runs):
            c = (s["headline"].get("compare") or {}).get(task) or {}
            xs = sorted(c, key=int)
            for when, style in (("before", "--"), ("after", "-")):
                ys = [c[x][when] for x in xs]
                if any(y is not None for y in ys):
                    ax.plot([int(x) for x in xs], ys, style, marker="o", color=f"C{i}", label=f"{name} {when}")
        ax.set(xscale="log", xlabel="context length (tokens)", ylabel="exact match", title=task, ylim=(-0.05, 1.05))
        ax.legend(fontsize=7)
    made.append(_save(fig, out / "accuracy_vs_length.png", plt))
    return made


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="the script's work directory, or results.json with --replot")
    ap.add_argument("out")
    ap.add_argument("--replot", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.replot:
        res = json.loads(Path(a.src).read_text())
    else:
        w = Path(a.src)
        res = {"stages": {n: stage(w, n) for n in STAGES}, "commit": os.environ.get("GIT_COMMIT")}
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out / "results.json")
        heat = w / "hyb16" / "plots" / "needle_heatmap.png"
        if heat.is_file():
            shutil.copy(heat, out / "hyb16_needle_heatmap.png")
    print(table(res))
    for p in plots(res, out):
        print("plot:", p)


if __name__ == "__main__":
    main()
