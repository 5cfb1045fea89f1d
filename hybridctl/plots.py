"""PNG plots of bench results (matplotlib, the optional ``plot`` extra, imported only when a plot is drawn).

Inputs are plain row dicts, so any workflow can plot what it measured:
- accuracy rows: ``task_eval.sweep_task``'s (``task``, ``layout``, ``length``, ``depth``, ``accuracy``, ``examples``),
  each with a ``model`` name added by the caller (rows without one are one unnamed model);
- speed rows: ``bench``'s (``model``, ``batch``, ``prompt_len``, ``status``, ``decode_tokens_per_s.mean``/``.std``,
  ``peak_memory_bytes``, ``memory_estimate_bytes``); rows whose ``status`` is not "ok" are left out.

``accuracy_vs_length``, ``needle_heatmap``, ``decode_vs_context``, ``decode_vs_batch``, ``memory_vs_context`` each
write one PNG at ``path`` (atomically: a temp file renamed) and return the path; ``write_plots`` draws every plot the
rows allow into a directory and returns the paths written.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hybridctl.config import HybridctlError

Row = dict[str, Any]


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise HybridctlError("plots need matplotlib: pip install 'hybridctl[plot]'") from None
    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise the one-line HybridctlError now if matplotlib is missing (before a long run whose plots would fail)."""
    _plt()


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 → what a plain open() would have given
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _plt().close(fig)
    return path


def _ok(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if r.get("status", "ok") == "ok"]


def _mean(r: Row, key: str) -> float | None:
    v = r.get(key)
    return v.get("mean") if isinstance(v, dict) else v


def _pooled(rows: Sequence[Row]) -> float:
    """Accuracy over several cells, weighted by their example counts."""
    n = sum(r["examples"] for r in rows)
    return sum(r["accuracy"] * r["examples"] for r in rows) / n if n else float("nan")


def _log2_axis(ax, values: Sequence[float]) -> None:
    vals = sorted(set(values))
    if len(vals) > 1 and vals[-1] / max(vals[0], 1e-9) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(vals)
    ax.set_xticklabels([_short(v) for v in vals], rotation=45 if len(vals) > 6 else 0)


def _log_y_if_wide(ax, values: Sequence[float]) -> None:
    """A log y axis when the values span more than 20× (a 1M- next to a 1B-parameter model), else linear."""
    vals = [v for v in values if v and v > 0]
    if vals and max(vals) / min(vals) > 20:
        ax.set_yscale("log")


def _short(v: float) -> str:
    v = float(v)
    for unit, div in (("M", 2**20), ("K", 2**10)):
        if v >= div and v % (div // 4) == 0:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def accuracy_vs_length(rows: Iterable[Row], path: str | Path, *, title: str | None = None) -> Path:
    """Exact-match accuracy vs target prompt length: one line per (model, task, layout), depths pooled."""
    plt = _plt()
    groups: dict[tuple, dict[int, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r.get("model") or "", r["task"], r.get("layout") or "")][r["length"]].append(r)
    if not groups:
        raise HybridctlError("accuracy_vs_length: no rows to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lengths = []
    for (model, task, layout), by_len in sorted(groups.items()):
        xs = sorted(by_len)
        lengths += xs
        label = " ".join(p for p in (model, task if len({k[1] for k in groups}) > 1 else "", layout) if p)
        ax.plot(xs, [_pooled(by_len[x]) for x in xs], marker="o", label=label or task)
    _log2_axis(ax, lengths)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title or "Accuracy vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def needle_heatmap(rows: Iterable[Row], path: str | Path, *, title: str | None = None) -> Path:
    """Accuracy over depth (rows) × length (columns), one panel per model: the needle-in-a-haystack picture."""
    plt = _plt()
    by_model: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.get("depth") is not None:
            by_model[r.get("model") or ""].append(r)
    if not by_model:
        raise HybridctlError("needle_heatmap: no rows with a depth to plot")
    fig, axes = plt.subplots(1, len(by_model), figsize=(1.2 + 4.2 * len(by_model), 3.8), squeeze=False)
    im = None
    for ax, (model, rs) in zip(axes[0], sorted(by_model.items())):
        lengths, depths = sorted({r["length"] for r in rs}), sorted({r["depth"] for r in rs})
        cells: dict[tuple, list[Row]] = defaultdict(list)
        for r in rs:
            cells[(r["depth"], r["length"])].append(r)
        grid = [[_pooled(cells[(d, x)]) if cells[(d, x)] else float("nan") for x in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [_short(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(model or (rs[0]["task"] if rs else ""))
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(title or "Needle in a haystack: accuracy by depth and length")
    return _save(fig, path)


def _lines(rows: Iterable[Row], path: str | Path, *, x: str, series: str, y: str, ylabel: str, title: str,
           xlabel: str, err: bool = True) -> Path:
    plt = _plt()
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in _ok(rows):
        if _mean(r, y) is not None:
            groups[(r["model"], r[series])].append(r)
    if not groups:
        raise HybridctlError(f"{Path(path).name}: no measured rows to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs_all = []
    for (model, s), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r[x])
        xs = [r[x] for r in rs]
        xs_all += xs
        ys = [_mean(r, y) for r in rs]
        std = [r[y].get("std") or 0.0 if isinstance(r[y], dict) else 0.0 for r in rs]
        label = f"{model}, {series.replace('_', ' ')} {_short(s)}"
        if err and any(std):
            ax.errorbar(xs, ys, yerr=std, marker="o", capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    _log2_axis(ax, xs_all)
    _log_y_if_wide(ax, [_mean(r, y) for rs in groups.values() for r in rs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def decode_vs_context(rows: Iterable[Row], path: str | Path) -> Path:
    """Decode tokens/s (mean ± std over reps) vs prompt length, one line per (model, batch)."""
    return _lines(rows, path, x="prompt_len", series="batch", y="decode_tokens_per_s", ylabel="decode tokens/s",
                  xlabel="prompt length (tokens)", title="Decode throughput vs context")


def decode_vs_batch(rows: Iterable[Row], path: str | Path) -> Path:
    """Decode tokens/s (mean ± std) vs batch size, one line per (model, prompt length)."""
    return _lines(rows, path, x="batch", series="prompt_len", y="decode_tokens_per_s", ylabel="decode tokens/s",
                  xlabel="batch size", title="Decode throughput vs batch")


def memory_vs_context(rows: Iterable[Row], path: str | Path) -> Path:
    """Peak memory (GiB, measured) vs prompt length, one line per (model, batch); the estimate dashed beside it."""
    plt = _plt()
    rows = list(rows)
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["batch"])].append(r)
    if not groups:
        raise HybridctlError("memory_vs_context: no rows to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs_all = []
    for (model, b), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["prompt_len"])
        xs_all += [r["prompt_len"] for r in rs]
        meas = [(r["prompt_len"], r["peak_memory_bytes"] / 2**30) for r in _ok(rs) if r.get("peak_memory_bytes")]
        line = None
        if meas:
            (line,) = ax.plot(*zip(*meas), marker="o", label=f"{model}, batch {b}: measured peak")
        ax.plot([r["prompt_len"] for r in rs], [r["memory_estimate_bytes"] / 2**30 for r in rs], linestyle="--",
                marker="x", color=line.get_color() if line else None, label=f"{model}, batch {b}: estimate")
    _log2_axis(ax, xs_all)
    _log_y_if_wide(ax, [r["memory_estimate_bytes"] / 2**30 for r in rows])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("memory (GiB)")
    ax.set_title("Memory vs context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(directory: str | Path, *, speed: Sequence[Row] = (), tasks: Sequence[Row] = ()) -> list[Path]:
    """Every plot the rows allow, into ``directory``: decode_vs_context.png and memory_vs_context.png (more than one
    prompt length), decode_vs_batch.png (more than one batch), accuracy_<task>.png per task, needle_heatmap.png
    (needle rows with depths). Returns the paths written."""
    d = Path(directory)
    out = []
    ok = _ok(speed)
    if len({r["prompt_len"] for r in ok}) > 1:
        out += [decode_vs_context(ok, d / "decode_vs_context.png"), memory_vs_context(speed, d / "memory_vs_context.png")]
    if len({r["batch"] for r in ok}) > 1:
        out.append(decode_vs_batch(ok, d / "decode_vs_batch.png"))
    for task in sorted({r["task"] for r in tasks}):
        rs = [r for r in tasks if r["task"] == task]
        out.append(accuracy_vs_length(rs, d / f"accuracy_{task}.png", title=f"{task}: accuracy vs context length"))
        if task == "needle" and any(r.get("depth") is not None for r in rs):
            out.append(needle_heatmap(rs, d / "needle_heatmap.png"))
    return out
