"""Tokenizers: the built-in byte-level one, Hugging Face ``tokenizer.json`` and SentencePiece ``.model``.

All three share one small interface (`Tokenizer`): ``encode``/``decode``, ``vocab_size``, ``bos_id``/``eos_id``/
``pad_id`` (``None`` when the tokenizer has no such token), ``add_bos`` (whether prompts get a BOS by default — taken
from the tokenizer's *own* configuration, FORMATS.md §6), ``save(directory)`` and a ``kind`` string.

Detection is by content, never by a checkpoint's name: `load_tokenizer` looks in a directory for the
``hybridctl_tokenizer.json`` marker that every ``save`` writes (``{"kind": ...}``), then ``tokenizer.json``, then
``tokenizer.model``, then any file that *is* a tokenizer (`find_tokenizer`: a tokenizers JSON by its schema, a
SentencePiece protobuf by its wire format — the paper's Megatron releases ship ``mt_nlg_plus_…_256k.model``); a
direct file path is recognised by what it holds (JSON marker, tokenizers JSON, or a SentencePiece protobuf).

Streaming: `StreamDecoder` turns ids arriving one at a time into text, emitting only complete characters (a multi-byte
UTF-8 character split over several ids comes out once its last byte arrives).
"""

from __future__ import annotations

import codecs
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hybridctl.config import HybridctlError

log = logging.getLogger(__name__)

MARKER_FILE = "hybridctl_tokenizer.json"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_MAP_FILE = "special_tokens_map.json"
SP_FILE = "tokenizer.model"
# Any one of these marks a directory holding a tokenizer load_tokenizer reads (in the order it tries them).
TOKENIZER_MARKERS = (MARKER_FILE, HF_FILE, SP_FILE)
# What an export copies along from a tokenizer directory: every file Hugging Face loaders read, and ours.
TOKENIZER_FILES = (HF_FILE, HF_CONFIG_FILE, HF_SPECIAL_MAP_FILE, SP_FILE, "vocab.json", "merges.txt",
                   "added_tokens.json", MARKER_FILE)
# Used only when neither tokenizer_config.json nor special_tokens_map.json names the EOS token: the end-of-text
# tokens of the common tokenizer families, looked up among the tokenizer's own special tokens.
_KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]")


class Tokenizer(ABC):
    """The interface every tokenizer implements. Ids are plain ``int``; specials may be ``None``."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool

    @abstractmethod
    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text without any special token."""

    @abstractmethod
    def _decode_plain(self, ids: list[int]) -> str:
        """Text of ``ids`` (already range-checked), skipping special tokens."""

    @abstractmethod
    def save(self, directory: str | Path) -> list[Path]:
        """Write this tokenizer's files (and the marker) into ``directory``; return the paths written."""

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Ids of ``text``; a BOS is prepended when ``add_bos`` (default: the tokenizer's own ``add_bos``)."""
        return self.encode_batch([text], add_bos=add_bos)[0]

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """`encode` over many texts at once (HF tokenizers run this in parallel)."""
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is None:
            raise HybridctlError(f"tokenizer ({self.kind}) has no BOS token; encode with add_bos=False")
        out = self._encode_plain(list(texts))
        return [[self.bos_id, *ids] for ids in out] if want_bos else out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are skipped, invalid UTF-8 becomes U+FFFD. Out-of-range ids are errors."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise HybridctlError(f"token id {bad[0]} is outside the tokenizer's vocabulary (0..{self.vocab_size - 1});"
                                 f" a model with a padded vocabulary must mask those logits")
        return self._decode_plain(ids)

    def stream_decoder(self, context: Sequence[int] = ()) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence. ``context``: the prompt's ids (the last few are
        kept), so the first generated word gets its leading space from SentencePiece / byte-level BPE."""
        return StreamDecoder(self, context)

    def describe(self) -> str:
        return (f"{self.kind} tokenizer: vocab {self.vocab_size}, bos {self.bos_id}, eos {self.eos_id}, "
                f"pad {self.pad_id}, add_bos {self.add_bos}")


# --------------------------------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenisation: ``push(id)`` returns the newly completed text (possibly ``""``).

    Generic over tokenizers (the offsets scheme of text-generation-inference): decode a short window that starts one
    step before the text already emitted, so that word-boundary rules (SentencePiece's leading "▁", byte-level BPE)
    see the same context both times, and hold the text back while it ends in U+FFFD — an incomplete UTF-8 sequence.
    ``flush()`` returns whatever is left (incomplete bytes as U+FFFD) at the end of generation.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = [int(i) for i in context][-4:]  # enough to settle a word boundary
        self._prefix = 0  # window start: one emitted step of context
        self._read = len(self._ids)  # ids before this are already emitted (or are the prompt)
        self._prefix_text: str | None = None  # decode(ids[prefix:read]); unchanged until the next emission

    def _prefix_decoded(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        return self._prefix_text

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._prefix_decoded()
        new_text = self._tok.decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # Drop ids that no longer matter so a long generation does not re-decode from the start.
        self._ids, self._prefix, self._read = self._ids[self._read:], 0, len(self._ids) - self._read
        self._prefix_text = None  # the window moved
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        prefix_text = self._prefix_decoded()
        new_text = self._tok.decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read, self._prefix_text = [], 0, 0, None
        return new_text[len(prefix_text):]


class _ByteStreamDecoder(StreamDecoder):
    """Exact streaming for `ByteTokenizer`: Python's incremental UTF-8 decoder holds back partial characters."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        super().__init__(tokenizer)  # bytes need no context: a character is complete or it is not
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id >= 256:
            self._tok.decode([token_id])  # range check only: specials decode to nothing
            return ""
        return self._utf8.decode(bytes([token_id]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def decode_stream(tokenizer: Tokenizer, ids: Iterable[int], context: Sequence[int] = ()) -> Iterator[str]:
    """Yield text pieces as ``ids`` arrive (only complete characters; the remainder at the end)."""
    dec = tokenizer.stream_decoder(context)
    for i in ids:
        piece = dec.push(i)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail


# --------------------------------------------------------------------------------------------------------------------
# The three tokenizers
# --------------------------------------------------------------------------------------------------------------------


def _write_marker(directory: Path, kind: str, **extra: Any) -> Path:
    path = directory / MARKER_FILE
    path.write_text(json.dumps({"kind": kind, **extra}, indent=2) + "\n")
    return path


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HybridctlError(f"{what} {path} is not readable JSON: {e}") from None


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255 are bytes, 256 BOS, 257 EOS, 258 PAD (``vocab_size`` 259). Adds BOS by default so an
    empty prompt still has a token to condition on."""

    kind = "byte"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def __init__(self, *, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def _decode_plain(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self, context: Sequence[int] = ()) -> StreamDecoder:
        return _ByteStreamDecoder(self)

    def save(self, directory: str | Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return [_write_marker(directory, self.kind, add_bos=self.add_bos)]

    def save_hf(self, directory: str | Path) -> list[Path]:
        """A tokenizers-library twin of this tokenizer (ids 0..255 = bytes, then BOS/EOS/PAD) as ``tokenizer.json`` +
        ``tokenizer_config.json``, so that AutoTokenizer loads an HF export: byte-level pre-tokenisation, one token
        per byte, no merges."""
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, processors

        directory = Path(directory)
        # GPT-2's byte → printable-unicode table (what the ByteLevel pre-tokenizer emits), in byte order.
        printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        extra = iter(range(256, 512))
        chars = {b: chr(b if b in printable else next(extra)) for b in range(256)}
        t = HFTok(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        t.decoder = decoders.ByteLevel()
        specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
        t.add_special_tokens(specials)
        assert [t.token_to_id(s) for s in specials] == [self.bos_id, self.eos_id, self.pad_id]
        if self.add_bos:
            t.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                             special_tokens=[("<|bos|>", self.bos_id)])
        t.save(str(directory / HF_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1],
                  "pad_token": specials[2], "add_bos_token": self.add_bos, "model_max_length": 1 << 30}
        (directory / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        return [directory / HF_FILE, directory / HF_CONFIG_FILE]


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``), honouring ``tokenizer_config.json``.

    Specials come from ``tokenizer_config.json`` / ``special_tokens_map.json`` (``bos_token``, ``eos_token``,
    ``pad_token``); ``add_bos`` from ``add_bos_token`` there, else from the tokenizer's own post-processor (a
    template that puts the BOS in front, as Llama-3's does). Encoding never runs the post-processor itself, so a BOS
    appears exactly when ``add_bos`` says so and no EOS is appended to prompts.
    """

    kind = "hf"

    def __init__(self, tokenizer_file: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTok

        path = Path(tokenizer_file)
        try:
            self._tok = _HFTok.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise HybridctlError(f"cannot load Hugging Face tokenizer {path}: {e}") from None
        self._config = self._optional_json(path.parent / HF_CONFIG_FILE)
        self._special_map = self._optional_json(path.parent / HF_SPECIAL_MAP_FILE)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special("bos_token")
        self.eos_id = self._special("eos_token")
        self.pad_id = self._special("pad_token")
        if self.eos_id is None:
            specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
            self.eos_id = next((self._tok.token_to_id(t) for t in _KNOWN_EOS if t in specials), None)
        prefix = self._template_prefix()
        if self.bos_id is None and len(prefix) == 1:
            self.bos_id = prefix[0]  # the template's start token is this tokenizer's BOS
        if isinstance(self._config.get("add_bos_token"), bool):
            self.add_bos = self._config["add_bos_token"] and self.bos_id is not None
        else:
            self.add_bos = self.bos_id is not None and prefix == [self.bos_id]

    @staticmethod
    def _optional_json(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        data = _read_json(path, "tokenizer config")
        if not isinstance(data, dict):
            raise HybridctlError(f"tokenizer config {path} must hold a JSON object")
        return data

    def _special(self, name: str) -> int | None:
        content = _token_content(self._config.get(name)) or _token_content(self._special_map.get(name))
        if content is None:
            return None
        token_id = self._tok.token_to_id(content)
        if token_id is None:
            raise HybridctlError(f"tokenizer config names {name} {content!r}, which is not in the vocabulary")
        return token_id

    def _template_prefix(self) -> list[int]:
        """Ids the post-processor puts in front of a text (found by encoding "a" with and without specials)."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode_plain(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / HF_FILE))
        written = [directory / HF_FILE]
        config = dict(self._config) or {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.setdefault("add_bos_token", self.add_bos)
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if token_id is not None and key not in config:
                config[key] = self._tok.id_to_token(token_id)
        (directory / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        written.append(directory / HF_CONFIG_FILE)
        if self._special_map:
            (directory / HF_SPECIAL_MAP_FILE).write_text(json.dumps(self._special_map, indent=2) + "\n")
            written.append(directory / HF_SPECIAL_MAP_FILE)
        return [*written, _write_marker(directory, self.kind)]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``tokenizer.model``). Specials are the model's own (``-1`` → ``None``).

    A SentencePiece model carries no "add BOS" setting, so ``add_bos`` is ``add_bos_token`` from a
    ``tokenizer_config.json`` beside the model when there is one, else ``False`` — Megatron's GPT SentencePiece
    tokenizer (the paper's models) adds none.
    """

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece

        path = Path(model_file)
        try:
            self._proto = path.read_bytes()
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._proto)
        except (OSError, RuntimeError) as e:
            raise HybridctlError(f"cannot load SentencePiece model {path}: {str(e).strip() or 'not a model'}") from None
        config_path = path.parent / HF_CONFIG_FILE
        self._config = _read_json(config_path, "tokenizer config") if config_path.is_file() else {}
        if not isinstance(self._config, dict):
            raise HybridctlError(f"tokenizer config {config_path} must hold a JSON object")
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()))
        self.add_bos = bool(self._config.get("add_bos_token", False)) and self.bos_id is not None

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def _decode_plain(self, ids: list[int]) -> str:
        # Control pieces (BOS/EOS/PAD) decode to nothing in SentencePiece; byte pieces of a partial character
        # become U+FFFD.
        return self._sp.decode(ids)

    def save(self, directory: str | Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SP_FILE).write_bytes(self._proto)
        config = dict(self._config)
        config.setdefault("add_bos_token", self.add_bos)
        (directory / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return [directory / SP_FILE, directory / HF_CONFIG_FILE, _write_marker(directory, self.kind)]


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _from_marker(path: Path) -> Tokenizer:
    marker = _read_json(path, "tokenizer marker")
    kind = marker.get("kind") if isinstance(marker, dict) else None
    if kind == "byte":
        return ByteTokenizer(add_bos=bool(marker.get("add_bos", True)))
    files = {"hf": HF_FILE, "sentencepiece": SP_FILE}
    if kind in files:
        target = path.parent / files[kind]
        if not target.is_file():
            raise HybridctlError(f"{path} says the tokenizer is {kind!r} but {target} is missing")
        return HFTokenizer(target) if kind == "hf" else SentencePieceTokenizer(target)
    raise HybridctlError(f"{path}: unknown tokenizer kind {kind!r}; expected 'byte', 'hf' or 'sentencepiece'")


def _from_file(path: Path) -> Tokenizer:
    """A tokenizer file recognised by content: JSON (marker or tokenizers) or else a SentencePiece protobuf."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        data = _read_json(path, "tokenizer file")
        if isinstance(data, dict) and "kind" in data:
            return _from_marker(path)
        if isinstance(data, dict) and "model" in data:
            return HFTokenizer(path)
        raise HybridctlError(f"{path} is JSON but neither a tokenizers 'tokenizer.json' nor a hybridctl marker")
    return SentencePieceTokenizer(path)


# ---- detection by content -----------------------------------------------------------------------------------------

_NOT_TOKENIZERS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".distcp", ".npy", ".idx", ".py", ".txt", ".md")
_MAX_TOKENIZER_BYTES = 256 << 20


def _varint_end(data: bytes, i: int) -> int | None:
    """Index after the protobuf varint starting at ``data[i]`` (None when truncated or longer than 10 bytes)."""
    for j in range(i, min(i + 10, len(data))):
        if data[j] < 0x80:
            return j + 1
    return None


def tokenizer_file_kind(path: Path) -> str | None:
    """``"hf"`` for a tokenizers ``tokenizer.json`` (an object whose ``model`` object has a ``vocab``/``type``),
    ``"sentencepiece"`` for a SentencePiece ModelProto (first field ``pieces``, a message whose first field is the
    piece string, and loadable by sentencepiece), else None — whatever the file is called."""
    try:
        size = path.stat().st_size
        if not path.is_file() or size == 0 or size > _MAX_TOKENIZER_BYTES:
            return None
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if head.lstrip().startswith(b"{"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        model = data.get("model") if isinstance(data, dict) else None
        ok = isinstance(model, dict) and ("vocab" in model or "type" in model) and "added_tokens" in data
        return "hf" if ok else None
    end = _varint_end(head, 1) if head[:1] == b"\x0a" else None  # field 1 (pieces), length-delimited
    if end is None or head[end:end + 1] != b"\x0a":  # SentencePiece.piece, field 1, length-delimited
        return None
    try:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
        return "sentencepiece" if sp.get_piece_size() > 0 else None
    except (OSError, RuntimeError, ImportError):
        return None


def find_tokenizer(directory: Path) -> Path | None:
    """Where the tokenizer of a checkpoint directory is: the directory itself when it holds one under a standard name
    (``hybridctl_tokenizer.json``, ``tokenizer.json``, ``tokenizer.model``), else the one file in it that is a
    tokenizer by content (e.g. Megatron releases' ``mt_nlg_plus_multilingual_…_256k.model``); None when there is none.
    Several candidates: tokenizers JSON before SentencePiece, then by name, and the choice is logged."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    if any((directory / f).is_file() for f in TOKENIZER_MARKERS):
        return directory
    found: dict[str, list[Path]] = {"hf": [], "sentencepiece": []}
    for p in sorted(directory.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() in _NOT_TOKENIZERS or p.name == "config.json":
            continue
        kind = tokenizer_file_kind(p)
        if kind is not None:
            found[kind].append(p)
    candidates = found["hf"] + found["sentencepiece"]
    if not candidates:
        return None
    if len(candidates) > 1:
        log.warning("%s: several tokenizer files (%s); using %s", directory,
                    ", ".join(p.name for p in candidates), candidates[0].name)
    else:
        log.info("%s: tokenizer found by content: %s", directory, candidates[0].name)
    return candidates[0]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer stored at ``path``: a directory (checkpoint) or a tokenizer file.

    In a directory: ``hybridctl_tokenizer.json`` (what `Tokenizer.save` writes) wins, then ``tokenizer.json``, then
    ``tokenizer.model``.
    """
    path = Path(path)
    if path.is_dir():
        for name, loader in ((MARKER_FILE, _from_marker), (HF_FILE, HFTokenizer), (SP_FILE, SentencePieceTokenizer)):
            if (path / name).is_file():
                tok = loader(path / name)
                log.info("loaded %s from %s", tok.describe(), path)
                return tok
        found = find_tokenizer(path)
        if found is not None:
            return _from_file(found)
        raise HybridctlError(f"no tokenizer in {path}: expected {MARKER_FILE}, {HF_FILE}, {SP_FILE} or a file that is "
                             "a tokenizers JSON or a SentencePiece model")
    if path.is_file():
        return _from_file(path)
    raise HybridctlError(f"tokenizer not found: {path}")


def build_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a recipe value: ``"byte"`` (built in) or a path accepted by `load_tokenizer`."""
    if not isinstance(spec, str) or not spec.strip():
        raise HybridctlError(f"tokenizer: expected 'byte' or a path, got {spec!r}")
    return ByteTokenizer() if spec.strip() == "byte" else load_tokenizer(spec.strip())
