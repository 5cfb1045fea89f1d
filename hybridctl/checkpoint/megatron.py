"""Megatron-LM checkpoints: legacy per-rank ``torch`` files and ``torch_dist``, any TP/PP, read and written.

``open_megatron(path)`` accepts a checkpoint root (with ``latest_checkpointed_iteration.txt``) or an iteration
directory (``iter_0000100/``, ``release/``) and detects the format by content: ``metadata.json`` marks torch_dist,
``mp_rank_*`` directories the legacy format. The result is a native-layout ``Source`` (see checkpoint/__init__.py).
Writers: ``write_megatron_dist`` and ``write_megatron_legacy``. Details per format in megatron_legacy.py and
megatron_dist.py; the name table in megatron_keys.py; args ⇄ config in megatron_args.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hybridctl.checkpoint.megatron_dist import count_writes_dist, is_dist_dir, open_dist, write_megatron_dist
from hybridctl.checkpoint.megatron_legacy import (TRACKER, count_writes, is_legacy_dir, open_legacy,
                                                  write_megatron_legacy)
from hybridctl.checkpoint.source import Source
from hybridctl.config import HybridctlError

_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def _available(root: Path) -> list[str]:
    names = sorted(c.name for c in root.iterdir() if c.is_dir() and (_ITER_DIR.match(c.name) or c.name == "release"))
    return names


def resolve_iteration_dir(path: Path, iteration: int | str | None = None) -> tuple[Path, Path]:
    """(root, iteration directory) for a checkpoint root or an iteration directory; ``iteration`` overrides the
    tracker. Errors name what was found when the tracker or the request points nowhere."""
    if not path.is_dir():
        raise HybridctlError(f"{path}: no such checkpoint directory")
    if iteration is None and (is_dist_dir(path) or is_legacy_dir(path)):
        return path.parent, path
    if iteration is None:
        tracker = path / TRACKER
        if not tracker.is_file():
            found = _available(path)
            raise HybridctlError(f"{path}: no {TRACKER}; pass --iteration N"
                                 + (f" (found {', '.join(found)})" if found else " (no iter_* directories either)"))
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise HybridctlError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
        iteration = text
    name = iteration_dir_name(iteration)
    d = path / name
    if not d.is_dir():
        found = _available(path)
        raise HybridctlError(f"{path}: iteration {iteration} ({name}/) does not exist"
                             + (f"; found {', '.join(found)}" if found else ""))
    return path, d


def open_megatron(path: str | Path, *, iteration: int | str | None = None, trust_pickle: bool = False,
                  **_: Any) -> Source:
    """Open a Megatron checkpoint (legacy or torch_dist, any TP/PP) as a Source in native names and layout.

    iteration: which ``iter_*`` to read (default: the tracker's). trust_pickle: unpickle without the allowlist —
    the files may then run arbitrary code; only for checkpoints you produced yourself.
    """
    root, d = resolve_iteration_dir(Path(path), iteration)
    root = root if (root / TRACKER).is_file() else None  # tokenizer files are looked for only in a real root
    if is_dist_dir(d):
        return open_dist(d, root=root, trust_pickle=trust_pickle)
    if is_legacy_dir(d):
        return open_legacy(d, root=root, trust_pickle=trust_pickle)
    raise HybridctlError(f"{d}: neither a torch_dist checkpoint (metadata.json) nor legacy rank files (mp_rank_*)")


__all__ = ["open_megatron", "write_megatron_dist", "write_megatron_legacy", "resolve_iteration_dir",
           "count_writes", "count_writes_dist"]
