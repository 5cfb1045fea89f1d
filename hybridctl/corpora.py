"""Corpora: the documents of a data source, in a seeded order, filtered to one split. `hybridctl.data` packs them.

Sources (a string or a list of strings; the synthetic tasks ``"phonebook"`` and ``"copy"`` are made in tasks.py):
  ``"builtin"``    the embedded corpus: CPython's ``pydoc_data.topics`` help texts, one document per topic (sorted).
  a file, a directory (every non-hidden file below it), or a glob — each file recognised by content: zstd magic
                   ``28 B5 2F FD`` → decompressed as a stream; a first non-blank line holding a JSON object → JSONL
                   (one document per line, field ``text_field``); anything else → plain text where **blank lines
                   separate documents** (streaming, bounded memory, and a held-out split works for single-file corpora;
                   for whole-file documents write JSONL).
  a Megatron prefix (``PATH`` with ``PATH.bin`` + ``PATH.idx``, or either file itself): documents are token ids,
                   yielded as stored (the loader appends EOS when a document does not already end with it).

Order and split:
  Deterministic from ``seed``: per epoch, a seeded permutation of documents (builtin, Megatron) or of files plus a
  ``shuffle_buffer``-document shuffle buffer (files: streamed, never loaded whole). A corpus yields
  ``(position, document)`` from any position in an epoch's order; a file corpus re-reads the documents before it.
  Held-out split: a document is ``eval`` iff a hash of its content (Megatron: of its index) is 0 mod
  ``eval_every``; independent of the seed, so train and eval are disjoint.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from glob import glob
from pathlib import Path

import numpy as np

from hybridctl.config import HybridctlError

# Source names that are synthetic tasks, not corpora: the tasks are made in data.py, which imports these names from
# here (corpora.py never imports data.py); the error for an unknown source lists them.
TASKS = ("phonebook", "copy", "needle")
SPLITS = ("train", "eval")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# --------------------------------------------------------------------------------------------------------------------
# Megatron indexed dataset (MMIDIDX): header, int32 sizes, int64 byte pointers, int64 document index
# --------------------------------------------------------------------------------------------------------------------

_MMIDIDX = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version (1), dtype code, sequence count, document-index length: 34 bytes
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}  # 6/7 are floats


def _has_megatron_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_MMIDIDX)) == _MMIDIDX
    except OSError:
        return False


class MegatronDataset:
    """Read-only view of ``prefix.bin`` / ``prefix.idx`` (Megatron-LM ``IndexedDataset``), memory-mapped.

    The index holds ``sizes`` int32 [S] (tokens per sequence), ``pointers`` int64 [S] (byte offsets into .bin) and
    ``doc_idx`` int64 [D + 1] (sequence ranges per document, starting at 0 and ending at S).
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for p in (idx, bin_):
            if not p.is_file():
                raise HybridctlError(f"Megatron dataset {prefix}: {p} is missing")
        with open(idx, "rb") as f:
            raw = f.read(_HEADER.size)
        if len(raw) < _HEADER.size or raw[:9] != _MMIDIDX:
            raise HybridctlError(f"{idx}: not a Megatron index (expected header {_MMIDIDX!r})")
        _, version, code, n_seq, n_doc = _HEADER.unpack(raw)
        if version != 1:
            raise HybridctlError(f"{idx}: unsupported index version {version} (only 1 is known)")
        if code not in _DTYPE_CODES:
            raise HybridctlError(f"{idx}: dtype code {code} is not an integer token type")
        self.dtype = np.dtype(_DTYPE_CODES[code]).newbyteorder("<")
        need = _HEADER.size + 12 * n_seq + 8 * n_doc
        if idx.stat().st_size < need:
            raise HybridctlError(f"{idx}: truncated ({idx.stat().st_size} bytes, the header promises {need})")
        mm = np.memmap(idx, dtype=np.uint8, mode="r")
        self.sizes = np.frombuffer(mm, "<i4", n_seq, _HEADER.size)
        self.pointers = np.frombuffer(mm, "<i8", n_seq, _HEADER.size + 4 * n_seq)
        self.doc_idx = np.frombuffer(mm, "<i8", n_doc, _HEADER.size + 12 * n_seq)
        if n_doc < 1 or self.doc_idx[0] != 0 or self.doc_idx[-1] != n_seq or np.any(np.diff(self.doc_idx) < 0):
            raise HybridctlError(f"{idx}: inconsistent document index (must rise from 0 to {n_seq})")
        data_bytes = int(self.pointers[-1] + self.sizes[-1] * self.dtype.itemsize) if n_seq else 0
        if bin_.stat().st_size < data_bytes:
            raise HybridctlError(f"{bin_}: truncated ({bin_.stat().st_size} bytes, the index needs {data_bytes})")
        self._bin = np.memmap(bin_, dtype=self.dtype, mode="r") if data_bytes else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.doc_idx) - 1

    def document(self, k: int) -> np.ndarray:
        """Token ids of document ``k``: the concatenation of its sequences, [L] in the stored dtype."""
        lo, hi = int(self.doc_idx[k]), int(self.doc_idx[k + 1])
        parts = [self._bin[p // self.dtype.itemsize:p // self.dtype.itemsize + n]
                 for p, n in zip(self.pointers[lo:hi].tolist(), self.sizes[lo:hi].tolist())]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


def write_megatron_dataset(prefix: str | Path, documents: Iterable[Sequence[int] | np.ndarray], *,
                           dtype: type[np.integer] = np.int32) -> tuple[Path, Path]:
    """Write documents of token ids as ``prefix.bin`` + ``prefix.idx`` (one sequence per document)."""
    code = next((c for c, t in _DTYPE_CODES.items() if np.dtype(t) == np.dtype(dtype)), None)
    if code is None:
        names = sorted(np.dtype(t).name for t in _DTYPE_CODES.values())
        raise HybridctlError(f"Megatron dataset dtype must be one of {names}, got {np.dtype(dtype).name}")
    dt = np.dtype(dtype).newbyteorder("<")
    bin_, idx = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    sizes: list[int] = []
    with open(bin_, "wb") as f:
        for doc in documents:
            arr = np.asarray(doc)
            if arr.size and (arr.min() < np.iinfo(dt).min or arr.max() > np.iinfo(dt).max):
                raise HybridctlError(f"document {len(sizes)}: token ids do not fit {dt.name}")
            f.write(arr.astype(dt).tobytes())
            sizes.append(arr.size)
    size_arr = np.array(sizes, "<i4")
    pointers = np.concatenate([[0], np.cumsum(size_arr, dtype=np.int64)[:-1]]).astype("<i8") * dt.itemsize
    with open(idx, "wb") as f:
        f.write(_HEADER.pack(_MMIDIDX, 1, code, len(sizes), len(sizes) + 1))
        f.write(size_arr.tobytes() + pointers[:len(sizes)].tobytes() + np.arange(len(sizes) + 1, dtype="<i8").tobytes())
    return bin_, idx


# --------------------------------------------------------------------------------------------------------------------
# Corpora: each yields (position, document) from a position in an epoch's order, already filtered to one split
# --------------------------------------------------------------------------------------------------------------------


def _content_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _index_hash(k: int) -> int:
    """splitmix64: a well-mixed hash of a document index (Megatron documents are addressed by index)."""
    m = (1 << 64) - 1
    k = (k + 0x9E3779B97F4A7C15) & m
    k = ((k ^ (k >> 30)) * 0xBF58476D1CE4E5B9) & m
    k = ((k ^ (k >> 27)) * 0x94D049BB133111EB) & m
    return k ^ (k >> 31)


def _in_split(h: int, split: str, eval_every: int) -> bool:
    return (h % eval_every == 0) == (split == "eval")


def builtin_documents() -> list[str]:
    """The embedded default corpus: CPython's help topics (a few hundred kB), sorted by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise HybridctlError("the built-in corpus needs CPython's pydoc_data, missing from this Python") from None
    return [topics[k] for k in sorted(topics)]


class _MemoryCorpus:
    def __init__(self, texts: list[str], *, seed: int, split: str, eval_every: int) -> None:
        self.texts = [t for t in texts if _in_split(_content_hash(t.encode()), split, eval_every)]
        self.seed = seed

    def documents(self, epoch: int, start: int) -> Iterator[tuple[int, str]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.texts))
        for pos in range(start, len(order)):
            yield pos, self.texts[order[pos]]


class _MegatronCorpus:
    def __init__(self, prefixes: list[Path], *, seed: int, split: str, eval_every: int) -> None:
        self.datasets = [MegatronDataset(p) for p in prefixes]
        self.bounds = np.cumsum([0] + [len(d) for d in self.datasets])
        self.seed, self.split, self.eval_every = seed, split, eval_every

    def documents(self, epoch: int, start: int) -> Iterator[tuple[int, np.ndarray]]:
        # A full permutation costs 8 bytes per document — what Megatron's own document index costs.
        order = np.random.default_rng([self.seed, epoch]).permutation(int(self.bounds[-1]))
        for pos in range(start, len(order)):
            k = int(order[pos])
            if _in_split(_index_hash(k), self.split, self.eval_every):
                d = int(np.searchsorted(self.bounds, k, side="right")) - 1
                yield pos, self.datasets[d].document(k - int(self.bounds[d]))


def _open_text(path: Path) -> io.TextIOWrapper:
    """A text stream over ``path``, decompressing zstd (recognised by its magic bytes) on the fly."""
    import zstandard

    f = open(path, "rb")
    compressed = f.read(4) == _ZSTD_MAGIC
    f.seek(0)
    raw = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) if compressed else f
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    buf: list[str] = []
    for line in lines:
        if line.strip():
            buf.append(line)
        elif buf:
            yield "".join(buf).rstrip("\n")
            buf = []
    if buf:
        yield "".join(buf).rstrip("\n")


def _jsonl_docs(lines: Iterable[str], path: Path, text_field: str) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HybridctlError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            keys = sorted(obj) if isinstance(obj, dict) else []
            raise HybridctlError(f"{path}:{n}: no string field {text_field!r} (keys: {keys}); set text_field")
        if text.strip():
            yield text


def _read_documents(path: Path, text_field: str) -> Iterator[str]:
    """Documents of one file, format recognised from its content (see the module docstring)."""
    import zstandard

    try:
        with _open_text(path) as f:
            head = f.read(8192)
            if "\x00" in head:
                raise HybridctlError(f"{path}: binary data; expected text, JSONL, zstd of those, or a Megatron prefix")
            head += f.readline()  # complete the last line so the first one is whole
            first = next((ln for ln in head.splitlines() if ln.strip()), "").strip()
            lines = itertools.chain(io.StringIO(head), f)
            yield from (_jsonl_docs(lines, path, text_field) if _is_json_object(first) else _paragraphs(lines))
    except (OSError, zstandard.ZstdError) as e:
        raise HybridctlError(f"cannot read {path}: {e}") from None


def _is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


class _FileCorpus:
    def __init__(self, files: list[Path], *, seed: int, split: str, eval_every: int, text_field: str,
                 shuffle_buffer: int) -> None:
        self.files, self.seed, self.split, self.eval_every = files, seed, split, eval_every
        self.text_field, self.shuffle_buffer = text_field, shuffle_buffer

    def documents(self, epoch: int, start: int) -> Iterator[tuple[int, str]]:
        rng = np.random.default_rng([self.seed, epoch])
        docs = (t for i in rng.permutation(len(self.files)) for t in _read_documents(self.files[i], self.text_field)
                if _in_split(_content_hash(t.encode()), self.split, self.eval_every))
        # Positions before `start` are re-read (the shuffle buffer must see them) but not tokenised.
        for pos, text in enumerate(_shuffle_buffer(docs, rng, self.shuffle_buffer)):
            if pos >= start:
                yield pos, text


def _shuffle_buffer(items: Iterable[str], rng: np.random.Generator, size: int) -> Iterator[str]:
    buf: list[str] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def _megatron_prefix_of(path: Path) -> Path | None:
    """The Megatron prefix that ``path`` (a prefix, its .idx or its .bin) names, else None."""
    candidates = [path, path.with_suffix("")] if path.suffix in (".idx", ".bin") else [path]
    for prefix in candidates:
        if _has_megatron_magic(Path(f"{prefix}.idx")) and Path(f"{prefix}.bin").is_file():
            return prefix
    if _has_megatron_magic(path):
        raise HybridctlError(f"{path} is a Megatron index without its .bin; give the prefix {path.with_suffix('')}")
    return None


def _expand(spec: str) -> list[Path]:
    """Files and Megatron prefixes that one source string names."""
    path = Path(spec).expanduser()
    if _megatron_prefix_of(path) is not None and not path.is_dir():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    elif path.is_file():
        found = [path]
    elif any(ch in spec for ch in "*?["):
        found = sorted(Path(p) for p in glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
    else:
        raise HybridctlError(f"data source not found: {spec!r} (expected 'builtin', {', '.join(map(repr, TASKS))}, "
                             f"a file, a directory, a glob or a Megatron prefix)")
    if not found:
        raise HybridctlError(f"data source {spec!r} names no files")
    return found


def open_corpus(sources: Sequence[str], *, seed: int, split: str, eval_every: int, text_field: str,
                shuffle_buffer: int) -> _MemoryCorpus | _MegatronCorpus | _FileCorpus:
    if list(sources) == ["builtin"]:
        return _MemoryCorpus(builtin_documents(), seed=seed, split=split, eval_every=eval_every)
    files: list[Path] = []
    prefixes: list[Path] = []
    for spec in sources:
        for p in _expand(spec):
            prefix = _megatron_prefix_of(p)
            target = prefixes if prefix is not None else files
            if (prefix or p) not in target:  # a glob matching both .bin and .idx names one prefix once
                target.append(prefix or p)
    if files and prefixes:
        raise HybridctlError("data sources mix Megatron datasets with text/JSONL files; use one kind per run")
    if prefixes:
        return _MegatronCorpus(prefixes, seed=seed, split=split, eval_every=eval_every)
    return _FileCorpus(files, seed=seed, split=split, eval_every=eval_every, text_field=text_field,
                       shuffle_buffer=shuffle_buffer)


def iter_documents(source: str | Sequence[str], *, split: str = "train", seed: int = 0, epoch: int = 0,
                   eval_every: int = 20, text_field: str = "text", shuffle_buffer: int = 1024
                   ) -> Iterator[str | np.ndarray]:
    """The documents of a corpus source in the order `build_loader` reads them (text, or token ids for Megatron)."""
    if split not in SPLITS:
        raise HybridctlError(f"data.split: must be 'train' or 'eval', got {split!r}")
    sources = [source] if isinstance(source, str) else list(source)
    corpus = open_corpus(sources, seed=seed, split=split, eval_every=eval_every, text_field=text_field,
                         shuffle_buffer=shuffle_buffer)
    return (doc for _, doc in corpus.documents(epoch, 0))

