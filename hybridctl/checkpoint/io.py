"""Shared checkpoint I/O: atomic output directories, streaming sharded safetensors, lazy safetensors reading.

Everything that writes goes through ``atomic_dir``: a temporary sibling directory renamed into place only when the
whole checkpoint is complete, so a failure never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hybridctl.config import HybridctlError

log = logging.getLogger(__name__)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype tags → torch dtypes: the stored dtypes hybridctl reads
ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8}


def check_out_path(out: str | os.PathLike, sources: Iterable[str | os.PathLike], *, option: str = "--out") -> None:
    """Refuse an output path that is a source, lies inside one, or contains one (paths resolved, symlinks followed):
    writing (or --force replacing) it would destroy the input."""
    o = Path(out).resolve()
    for src in sources:
        s = Path(src).resolve()
        if o == s:
            raise HybridctlError(f"{option} {out} is the source {src}; choose another")
        if s in o.parents:
            raise HybridctlError(f"{option} {out} lies inside the source {src}; choose a path outside it")
        if o in s.parents:
            raise HybridctlError(f"{option} {out} contains the source {src}; replacing it would delete the source")


def _os_error(e: OSError, path: Path) -> HybridctlError:
    return HybridctlError(f"{e.filename or path}: {e.strerror or type(e).__name__}")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success rename it to ``out`` (replacing it if overwrite)."""
    out = Path(out)
    try:
        if out.exists() and not overwrite:
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:
                raise HybridctlError(f"{out}: already exists (choose another --out, or remove it)")
        blocking = next((p for p in (out.parent, *out.parent.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise HybridctlError(f"{blocking}: is a file, but {out} needs it to be a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise _os_error(e, out) from None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file via a temporary file and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: object) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count → bytes (a positive, finite size)."""
    import math

    if isinstance(size, bool) or not isinstance(size, (str, int)):
        raise HybridctlError(f"shard size {size!r}: expected e.g. 5GB, 500MB or a byte count")
    if isinstance(size, int):
        n = size
    else:
        s = size.strip().upper().replace(" ", "")
        units = [("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                 ("B", 1)]
        mult, num = 1, s
        for suffix, m in units:
            if s.endswith(suffix):
                mult, num = m, s[: -len(suffix)]
                break
        try:
            x = float(num) * mult
        except ValueError:
            raise HybridctlError(f"shard size {size!r}: expected e.g. 5GB, 500MB or a byte count") from None
        if not math.isfinite(x):
            raise HybridctlError(f"shard size {size!r}: must be a finite size")
        n = int(x)
    if not 1 <= n <= 2**50:
        raise HybridctlError(f"shard size {size!r}: must be between 1 byte and 1 PiB")
    return n


def one_line(e: BaseException, limit: int = 300) -> str:
    """A library exception as one line of at most ``limit`` characters (its type and its text, whitespace folded)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


def write_sharded(out_dir: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  get: Callable[[str], torch.Tensor], *, max_shard_size: str | int = "5GB",
                  pattern: str = "model{suffix}.safetensors", progress: Callable[[int], None] | None = None,
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors as (sharded) safetensors, streaming: only one shard's tensors are in memory at a time.

    specs: name → (shape, dtype) of every output tensor (the plan comes from huggingface_hub's splitter run on meta
    tensors); get(name) returns the tensor. Writes ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (metadata.total_size, weight_map). Returns the file names written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in specs.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern=pattern,
                                               max_shard_size=parse_size(max_shard_size))
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            t = get(name)
            shape, dt = specs[name]
            if tuple(t.shape) != tuple(shape):
                raise HybridctlError(f"{name}: shape {tuple(t.shape)} differs from the planned {tuple(shape)}")
            shard[name] = t.to(dt).contiguous()
            if progress:
                progress(1)
        try:
            save_file(shard, str(out_dir / filename), metadata={"format": "pt", **(metadata or {})})
        except Exception as e:  # noqa: BLE001 - safetensors' messages span lines; the user gets one
            raise HybridctlError(f"{filename}: safetensors cannot write this shard: {one_line(e)}") from None
        del shard
    if split.is_sharded:
        write_json(out_dir / INDEX_NAME, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    return list(split.filename_to_tensors)


def _check_weight_map(weight_map: object, idx: Path) -> None:
    """An index's weight_map: tensor name → a shard file name in the same directory (no paths, no other types)."""
    if not isinstance(weight_map, dict) or not weight_map:
        raise HybridctlError(f"{idx}: weight_map must be a non-empty object of tensor name → shard file")
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or Path(fname).name != fname or fname in (".", ".."):
            raise HybridctlError(f"{idx}: weight_map[{name!r}] = {fname!r} is not a shard file name in this "
                                 "directory")


class SafetensorsReader:
    """Lazy reader over ``model.safetensors`` or an index + shards (names as stored). Validates on open that every
    shard exists and holds the tensors the index names."""

    def __init__(self, directory: str | os.PathLike, *, single: str = SINGLE_NAME, index: str = INDEX_NAME) -> None:
        self.dir = Path(directory)
        idx = self.dir / index
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise HybridctlError(f"{idx}: not a valid safetensors index ({type(e).__name__}: {e})") from None
            _check_weight_map(weight_map, idx)
        elif (self.dir / single).is_file():
            weight_map = None
        else:
            raise HybridctlError(f"{self.dir}: no {single} or {index} found")
        self._files: dict[str, Path] = {}
        if weight_map is None:
            files = {single: None}
        else:
            files = {}
            for name, fname in weight_map.items():
                files.setdefault(fname, []).append(name)
        self._handles = {}
        for fname, expected in files.items():
            path = self.dir / fname
            if not path.is_file():
                raise HybridctlError(f"{path}: shard named in the index is missing")
            try:
                h = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise HybridctlError(f"{path}: unreadable safetensors file ({e})") from None
            keys = set(h.keys())
            if expected is not None:
                missing = [k for k in expected if k not in keys]
                if missing:
                    raise HybridctlError(f"{path}: lacks {missing[0]!r} which the index places there")
            self._handles[fname] = h
            for k in (keys if expected is None else expected):
                self._files[k] = fname

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._files[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self._files[name]].get_slice(name).get_dtype()

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, torch dtype) of a stored tensor; an unsupported dtype is an error naming the tensor."""
        st = self.dtype(name)
        if st not in ST_DTYPES:
            raise HybridctlError(f"{self.dir}: tensor {name!r} has unsupported dtype {st}")
        return self.shape(name), ST_DTYPES[st]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise HybridctlError(f"{self.dir}: tensor {name!r} not found")
        try:
            return self._handles[self._files[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise HybridctlError(f"{self.dir / self._files[name]}: cannot read {name!r} ({e})") from None


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copy the named files that exist in src to dst; returns those copied."""
    done = []
    for n in names:
        if (src / n).is_file():
            shutil.copy2(src / n, dst / n)
            done.append(n)
    return done


def find_tokenizer_dir(*dirs: Path) -> Path | None:
    """The tokenizer of the first of ``dirs`` that has one (`hybridctl.tokenizer.find_tokenizer`: the directory when
    it holds one of tokenizer.TOKENIZER_MARKERS, else a tokenizer file found there by content), or None.
    ``load_tokenizer`` takes either form."""
    from hybridctl.tokenizer import find_tokenizer

    return next((t for d in dirs if (t := find_tokenizer(Path(d))) is not None), None)


def check_tokenizer_fits(tok: object, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids reach past the model's embedding rows is refused wherever the two meet."""
    n = getattr(tok, "vocab_size", None)
    if isinstance(n, int) and n > vocab_size:
        raise HybridctlError(f"{where}: the tokenizer has {n} ids but the model's vocab_size is {vocab_size}; ids "
                             f">= {vocab_size} would have no embedding row (raise vocab_size, or keep >= {n} rows)")


def carry_tokenizer(tokenizer_dir: Path | None, out: Path, vocab_size: int | None = None) -> str | None:
    """Save the tokenizer found in ``tokenizer_dir`` into ``out`` (hybridctl's own files); returns its kind.
    vocab_size: the model's rows; a larger tokenizer is refused (check_tokenizer_fits)."""
    if tokenizer_dir is None:
        return None
    from hybridctl.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    if vocab_size is not None:
        check_tokenizer_fits(tok, vocab_size, str(tokenizer_dir))
    tok.save(out)
    return tok.kind
