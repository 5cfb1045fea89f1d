"""A long-document corpus with no download: the running Python's standard-library sources as JSONL, one file per
document (``{"text": ...}``), in sorted path order, tests and vendored packages left out, up to ``--max-mb``.

Source files are real long documents (names defined near the top are used thousands of bytes later), which is what
context extension trains on; the embedded corpus (CPython's help topics) holds no document near 16K-32K bytes.
Used by benchmarks/extend_context_gpu.sh (the H200 run, issue #17):

    python3 benchmarks/stdlib_corpus.py /tmp/corpus.jsonl --max-mb 12
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
from pathlib import Path

SKIP = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "ensurepip", "__pycache__")


def documents(root: Path, max_bytes: int):
    total = 0
    for path in sorted(root.rglob("*.py")):
        if any(part in SKIP for part in path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        total += len(text.encode())
        if total > max_bytes:
            return
        yield text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-mb", type=float, default=12.0)
    ap.add_argument("--root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    a = ap.parse_args()
    tmp = a.out.with_suffix(a.out.suffix + ".tmp")
    n = size = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for text in documents(a.root, int(a.max_mb * 2**20)):
            f.write(json.dumps({"text": text}) + "\n")
            n, size = n + 1, size + len(text.encode())
    os.replace(tmp, a.out)
    print(json.dumps({"corpus": str(a.out), "root": str(a.root), "documents": n, "bytes": size}))


if __name__ == "__main__":
    main()
