"""Training data: corpora and synthetic tasks, packed into rows with document ids, as resumable sharded batches.

Sources (``build_loader(source=...)``, a string or a list of strings):
  ``"builtin"``    the embedded corpus (CPython's help topics), read by `hybridctl.corpora`.
  ``"phonebook"``  synthetic lookup (Mamba-2-Hybrid paper, arXiv 2406.07887): ``Name: 555-123-4567`` lines, a blank
                   line, then ``Name: `` of one entry; the answer is its number. Options ``n_entries`` (default: fill
                   the context), ``context_len`` (tokens per example, default ``seq_len + 1``).
  ``"copy"``       a random lowercase string, a newline, the same tokens again. Options ``min_len``, ``max_len``
                   (characters), ``context_len``.
  a file, a directory, a glob (text, JSONL, zstd of those; blank lines separate plain-text documents) or a Megatron
                   prefix: read by `hybridctl.corpora` (its docstring gives the formats). Megatron documents are token
                   ids, used as stored, plus EOS when a document does not already end with it.

Batch contract (each ``next(loader)``), T = ``seq_len``, B = ``batch_size`` (per rank):
  ``input_ids`` int64 [B, T], ``labels`` int64 [B, T], ``seq_idx`` int32 [B, T].
  Documents are tokenised as ``[BOS if tokenizer.add_bos] + text + [EOS]`` and concatenated; corpus rows are windows
  of T + 1 tokens taken with stride T, so every token after a document's first is a target exactly once and a long
  document continues in the next row (with fresh state: its ``seq_idx`` restarts at 0). ``labels[t]`` is the token
  at t + 1, or -100 when t + 1 starts a new document (nothing predicts across a boundary — the EOS closing a
  document *is* predicted, the next document's first token is not), when t + 1 is padding, or, for tasks, when it is
  not an answer token. ``seq_idx[b, t]`` numbers the documents of row b from 0, non-decreasing: the model resets
  SSM state and masks attention where it changes. Task examples are never split: whole examples fill a row and the
  rest is PAD (EOS when the tokenizer has no PAD) with its own ``seq_idx``.

Order, resume, split, sharding:
  Deterministic from ``seed``: per epoch, a seeded permutation of documents (builtin, Megatron) or of files plus a
  ``shuffle_buffer``-document shuffle buffer (files: streamed, never loaded whole). ``state_dict()`` is the stream
  position of the next global batch (epoch, document position, token offset); a loader given it with
  ``load_state_dict`` yields exactly the batches the uninterrupted one would. Resuming a file corpus re-reads (does
  not re-tokenise) the documents before the position. The state is the same on every rank.
  Held-out split: a document is ``eval`` iff a hash of its content (Megatron: of its index) is 0 mod
  ``eval_every``; independent of the seed, so train and eval are disjoint. Tasks draw eval examples from another
  seed stream.
  Sharding: all ranks build the same global row stream; global batch g is rows [g·B·W, (g+1)·B·W) and rank r takes
  rows g·B·W + r·B … + B. Concatenating the ranks' batches in rank order gives exactly one process's batch with
  ``batch_size = B·W`` (every rank tokenises every document; only its own rows become tensors).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hybridctl.config import HybridctlError
from hybridctl.corpora import SPLITS, TASKS, open_corpus
from hybridctl.recipe import at_least
from hybridctl.tokenizer import Tokenizer  # same layer: the one tokenizer interface

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_STATE_FORMAT = "hybridctl.data/1"
_TOKENIZE_GROUP = 64  # documents per encode_batch call (HF tokenizers encode a batch in parallel)


@dataclass
class TokenDoc:
    """One tokenised document: ``ids`` int64 [L]; ``targets`` bool [L] marks tokens that may be predicted."""

    ids: np.ndarray
    targets: np.ndarray


# --------------------------------------------------------------------------------------------------------------------
# Synthetic tasks: example i is a pure function of (seed, split, i), so any position can be resumed
# --------------------------------------------------------------------------------------------------------------------

_TASK_OPTIONS = {"phonebook": ("n_entries", "context_len"), "copy": ("min_len", "max_len", "context_len")}
_CONSONANTS, _VOWELS = "bcdfghklmnprstvz", "aeiou"


def _phone_entries(rng: np.random.Generator, chunk: int = 64) -> Iterator[list[tuple[str, str]]]:
    """Endless chunks of ("Xxxx Yyyyy", "ddd-ddd-dddd") pairs: names of 2-3 consonant-vowel syllables per word.
    Drawn ``chunk`` entries at a time (one numpy call per field): scalar draws dominated the cost."""
    while True:
        syllables, digits = rng.integers(2, 4, size=(chunk, 2)).tolist(), rng.integers(10, size=(chunk, 10)).tolist()
        cons, vow = rng.integers(16, size=(chunk, 2, 3)).tolist(), rng.integers(5, size=(chunk, 2, 3)).tolist()
        out = []
        for j in range(chunk):
            words = ("".join(_CONSONANTS[c] + _VOWELS[v] for c, v in zip(cons[j][w], vow[j][w][:syllables[j][w]]))
                     for w in (0, 1))
            d = "".join(map(str, digits[j]))
            out.append((" ".join(w.capitalize() for w in words), f"{d[:3]}-{d[3:6]}-{d[6:]}"))
        yield out


class _Task:
    """Shared parts: options, the token budget per example, BOS/EOS, per-example RNG."""

    def __init__(self, name: str, tokenizer: Tokenizer, seq_len: int, seed: int, split: str,
                 options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - set(_TASK_OPTIONS[name]))
        if unknown:
            raise HybridctlError(f"{name}: unknown option(s) {unknown}; valid: {list(_TASK_OPTIONS[name])}")
        for key, v in options.items():
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise HybridctlError(f"{name}.{key}: must be a positive integer, got {v!r}")
        self.name, self.options, self.seed, self.split_code = name, dict(options), seed, SPLITS.index(split)
        self.budget = self.options.get("context_len") or seq_len + 1
        if self.budget > seq_len + 1:
            raise HybridctlError(f"{name}.context_len: {self.budget} exceeds a row of seq_len + 1 = {seq_len + 1}")
        self.tok = tokenizer
        self.bos = [tokenizer.bos_id] if tokenizer.add_bos else []
        self.eos = tokenizer.eos_id
        self.newline = self.encode("\n")
        self.example(0)  # fail on impossible options now, not at some later step

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=False)

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.split_code, i])

    def finish(self, prompt: list[int], answer: list[int]) -> TokenDoc:
        """``prompt + answer + [EOS]``; only the answer tokens are targets."""
        ids = np.array(prompt + answer + [self.eos], np.int64)
        targets = np.zeros(len(ids), bool)
        targets[len(prompt):len(prompt) + len(answer)] = True
        return TokenDoc(ids, targets)

    def example(self, i: int) -> TokenDoc:
        raise NotImplementedError

    def documents(self, epoch: int, start: int) -> Iterator[tuple[int, TokenDoc]]:
        for i in itertools.count(start):  # endless: the epoch never ends
            yield i, self.example(i)


class _Phonebook(_Task):
    def example(self, i: int) -> TokenDoc:
        rng, n_entries = self.rng(i), self.options.get("n_entries")
        names: set[str] = set()
        entries: list[tuple[list[int], list[int]]] = []  # (ids of "Name: ", ids of the number)
        used, reserve = len(self.bos) + len(self.newline), 0  # reserve: the longest query + answer + EOS so far
        misses = 0  # consecutive candidates that did not fit
        candidates = self._candidates(rng)
        while n_entries is None or len(entries) < n_entries:
            name, key, value = next(candidates)
            if name in names:
                continue
            size, query = len(key) + len(value) + len(self.newline), len(key) + len(value) + 1
            if used + size + max(reserve, query) > self.budget:
                if n_entries is None and entries:
                    break
                misses += 1  # names vary in length: a shorter one may still fit
                if misses < 100:
                    continue
                raise HybridctlError(f"phonebook: {len(entries) + 1} entries do not fit {self.budget} tokens; "
                                     f"raise seq_len/context_len or lower n_entries")
            misses = 0
            names.add(name)
            entries.append((key, value))
            used, reserve = used + size, max(reserve, query)
        key, value = entries[int(rng.integers(len(entries)))]
        book = [t for k, v in entries for t in (*k, *v, *self.newline)]
        return self.finish(self.bos + book + self.newline + key, value)

    def _candidates(self, rng: np.random.Generator) -> Iterator[tuple[str, list[int], list[int]]]:
        """(name, ids of "Name: ", ids of the number); each chunk is tokenised in one encode_batch call."""
        for chunk in _phone_entries(rng):
            ids = self.tok.encode_batch([f"{n}: " for n, _ in chunk] + [num for _, num in chunk], add_bos=False)
            yield from ((name, ids[j], ids[len(chunk) + j]) for j, (name, _) in enumerate(chunk))


class _Copy(_Task):
    def example(self, i: int) -> TokenDoc:
        room = (self.budget - len(self.bos) - len(self.newline) - 1) // 2  # tokens per copy
        lo, hi = self.options.get("min_len") or 1, self.options.get("max_len") or room
        if room < 1 or not lo <= hi <= room:
            raise HybridctlError(f"copy: need min_len <= max_len <= {max(room, 0)} for {self.budget}-token "
                                 f"examples, got min_len={lo}, max_len={hi}")
        rng = self.rng(i)
        text = "".join(chr(97 + c) for c in rng.integers(26, size=int(rng.integers(lo, hi + 1))))
        ids = self.encode(text)[:room]  # a tokenizer that spends more tokens than characters is cut to fit
        return self.finish(self.bos + ids + self.newline, ids)


@dataclass
class TaskAccuracy:
    """``exact_match``: fraction of examples whose answer tokens are all right; ``token_accuracy`` per token."""

    exact_match: float
    token_accuracy: float
    examples: int
    tokens: int


def task_accuracy(logits_or_predictions: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> TaskAccuracy:
    """Accuracy on the labelled positions of ``batch`` (the answers, for tasks).

    ``logits_or_predictions``: logits [B, T, V] (argmax taken) or predicted ids [B, T], aligned with
    ``batch["labels"]`` [B, T]. An example is one (row, ``seq_idx``) group with at least one label.
    """
    pred = logits_or_predictions
    pred = pred.argmax(-1) if pred.dim() == 3 else pred
    labels, seq_idx = batch["labels"], batch["seq_idx"].long()
    if pred.shape != labels.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} do not match labels {tuple(labels.shape)}")
    B, T = labels.shape
    valid = labels != IGNORE_INDEX
    correct = (pred.to(labels.device) == labels) & valid
    group = torch.arange(B, device=labels.device)[:, None] * (T + 1) + seq_idx  # (row, document) → one id
    n_valid = torch.bincount(group[valid], minlength=B * (T + 1))
    n_correct = torch.bincount(group[correct], minlength=B * (T + 1))
    examples, tokens = int((n_valid > 0).sum()), int(valid.sum())
    exact = int(((n_correct == n_valid) & (n_valid > 0)).sum())
    return TaskAccuracy(exact_match=exact / max(examples, 1), token_accuracy=int(correct.sum()) / max(tokens, 1),
                        examples=examples, tokens=tokens)


# --------------------------------------------------------------------------------------------------------------------
# Packing: a stream of ((epoch, position), TokenDoc) → rows of T + 1 tokens with document ids
# --------------------------------------------------------------------------------------------------------------------

Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens int64 [T+1], targets bool [T+1], doc ids int32 [T+1]
Cursor = tuple[int, int, int]  # (epoch, position, token offset) where a row starts


def _pack_stream(docs: Iterator[tuple[tuple[int, int], TokenDoc]], n: int, offset: int) -> Iterator[tuple[Row, Cursor]]:
    """Windows of ``n`` tokens over the concatenated documents with stride ``n - 1`` (the last token of a row is a
    label only, and is the next row's first input). The first document is entered at ``offset``. Yields each row
    with the cursor of the next one."""
    pending: list[tuple[tuple[int, int], TokenDoc]] = []
    avail = -offset
    while True:
        while avail < n:
            item = next(docs, None)
            if item is None:
                return  # a partial last row is dropped
            pending.append(item)
            avail += len(item[1].ids)
        parts, need, skip = [], n, offset
        for j, (_, doc) in enumerate(pending):
            take = min(len(doc.ids) - skip, need)
            parts.append((doc.ids[skip:skip + take], doc.targets[skip:skip + take], np.full(take, j, np.int32)))
            need, skip = need - take, 0
            if not need:
                break
        advance = n - 1
        while advance:
            rest = len(pending[0][1].ids) - offset
            if rest > advance:
                offset, advance = offset + advance, 0
            else:
                pending.pop(0)
                offset, advance = 0, advance - rest
        avail -= n - 1
        (epoch, pos), _ = pending[0]
        yield tuple(np.concatenate(c) for c in zip(*parts)), (epoch, pos, offset)


def _pack_whole(docs: Iterator[tuple[tuple[int, int], TokenDoc]], n: int, pad_id: int) -> Iterator[tuple[Row, Cursor]]:
    """Rows of whole examples (never split), the rest padding with its own document id."""
    pending = next(docs, None)
    while pending is not None:
        parts: list[TokenDoc] = []
        used = 0
        while pending is not None and used + len(pending[1].ids) <= n:
            parts.append(pending[1])
            used += len(pending[1].ids)
            pending = next(docs, None)
        if not parts:
            raise HybridctlError(f"an example of {len(pending[1].ids)} tokens does not fit a row of {n}")
        if pending is None:
            return  # finite stream: the partial row is dropped
        pad = n - used
        tokens = np.concatenate([d.ids for d in parts] + [np.full(pad, pad_id, np.int64)])
        targets = np.concatenate([d.targets for d in parts] + [np.zeros(pad, bool)])
        doc_ids = np.concatenate([np.full(len(d.ids), j, np.int32) for j, d in enumerate(parts)]
                                 + [np.full(pad, len(parts), np.int32)])
        (epoch, pos), _ = pending
        yield (tokens, targets, doc_ids), (epoch, pos, 0)


def _row_to_example(row: Row) -> Row:
    """(input_ids [T], labels [T], seq_idx [T]) of one row; see the batch contract in the module docstring."""
    tokens, targets, doc = row
    same_doc = doc[1:] == doc[:-1]
    labels = np.where(targets[1:] & same_doc, tokens[1:], IGNORE_INDEX)
    return tokens[:-1], labels, doc[:-1] - doc[0]


# --------------------------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Everything that defines the global batch stream (rank and world size only pick rows from it)."""

    sources: tuple[str, ...]
    seq_len: int
    batch_size: int
    seed: int
    split: str
    task_options: dict[str, Any]
    text_field: str
    eval_every: int
    shuffle_buffer: int
    epochs: int | None

    def __post_init__(self) -> None:
        at_least("data", seq_len=(self.seq_len, 1), batch_size=(self.batch_size, 1), seed=(self.seed, 0),
                 eval_every=(self.eval_every, 2), shuffle_buffer=(self.shuffle_buffer, 1),
                 **({"epochs": (self.epochs, 1)} if self.epochs is not None else {}))  # None: endless
        if self.split not in SPLITS:
            raise HybridctlError(f"data.split: must be 'train' or 'eval', got {self.split!r}")
        if not self.sources or not all(isinstance(s, str) and s.strip() for s in self.sources):
            raise HybridctlError(f"data.source: expected a non-empty string or list of strings, got {self.sources!r}")
        named = [s for s in self.sources if s in ("builtin", *TASKS)]
        if named and len(self.sources) > 1:
            raise HybridctlError(f"data.source: {named[0]!r} cannot be combined with other sources")
        if self.task_options and self.sources[0] not in TASKS:
            raise HybridctlError(f"data.task_options: only for the tasks {', '.join(TASKS)}")


class PackedLoader:
    """Endless (or ``epochs``-long) iterator of batches; see the module docstring for the contract.

    ``state_dict()`` / ``load_state_dict()`` capture the position of the next global batch (plain ints and strings,
    JSON-serialisable, identical on every rank).
    """

    def __init__(self, config: DataConfig, *, tokenizer: Tokenizer, rank: int, world_size: int) -> None:
        if tokenizer.eos_id is None:
            raise HybridctlError(f"tokenizer ({tokenizer.kind}) has no EOS token; packing appends one per document")
        self.config, self.tokenizer, self.rank, self.world_size = config, tokenizer, rank, world_size
        name = config.sources[0]
        self._task = None
        if name in TASKS:
            cls = _Phonebook if name == "phonebook" else _Copy
            self._task = cls(name, tokenizer, config.seq_len, config.seed, config.split, config.task_options)
        self._source = self._task if self._task is not None else open_corpus(
            config.sources, seed=config.seed, split=config.split, eval_every=config.eval_every,
            text_field=config.text_field, shuffle_buffer=config.shuffle_buffer)
        self._cursor: Cursor = (0, 0, 0)
        self._rows: Iterator[tuple[Row, Cursor]] | None = None

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """``{"input_ids": int64 [B, T], "labels": int64 [B, T], "seq_idx": int32 [B, T]}``."""
        if self._rows is None:
            self._rows = self._row_stream()
        B = self.config.batch_size
        mine: list[Row] = []
        for r in range(B * self.world_size):
            item = next(self._rows, None)
            if item is None:
                self._rows = iter(())  # stay exhausted; the partial global batch is dropped
                raise StopIteration
            row, cursor = item
            if r // B == self.rank:
                mine.append(_row_to_example(row))
        self._cursor = cursor
        x, y, s = (np.stack(a) for a in zip(*mine))
        return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y.astype(np.int64)),
                "seq_idx": torch.from_numpy(s.astype(np.int32))}

    def _row_stream(self) -> Iterator[tuple[Row, Cursor]]:
        epoch, pos, offset = self._cursor
        docs = self._doc_stream(epoch, pos)
        n = self.config.seq_len + 1
        if self._task is not None:
            pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
            return _pack_whole(docs, n, pad)
        return _pack_stream(docs, n, offset)

    def _doc_stream(self, epoch: int, pos: int) -> Iterator[tuple[tuple[int, int], TokenDoc]]:
        while self.config.epochs is None or epoch < self.config.epochs:
            seen = 0
            docs = self._source.documents(epoch, pos)
            for p, doc in docs if self._task is not None else self._tokenized(docs):
                seen += 1
                yield (epoch, p), doc
            if not seen and not pos:
                raise HybridctlError(f"no documents in the {self.config.split!r} split of "
                                     f"{', '.join(self.config.sources)} (eval_every={self.config.eval_every})")
            epoch, pos = epoch + 1, 0

    def _tokenized(self, items: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, TokenDoc]]:
        """Raw documents → TokenDoc: text as ``[BOS?] + ids + [EOS]``; Megatron ids checked, EOS added if absent."""
        eos, vocab = self.tokenizer.eos_id, self.tokenizer.vocab_size
        while group := list(itertools.islice(items, _TOKENIZE_GROUP)):
            texts = [d for _, d in group if isinstance(d, str)]
            encoded = iter(self.tokenizer.encode_batch(texts) if texts else [])
            for pos, doc in group:
                if isinstance(doc, str):
                    ids = np.array([*next(encoded), eos], np.int64)
                else:
                    ids = np.asarray(doc, np.int64)
                    if not ids.size:
                        continue
                    bad = ids[(ids < 0) | (ids >= vocab)]
                    if bad.size:
                        raise HybridctlError(f"Megatron document at position {pos} holds token id {int(bad[0])} "
                                             f"outside the tokenizer's vocabulary of {vocab}; wrong tokenizer?")
                    if ids[-1] != eos:
                        ids = np.append(ids, eos)
                yield pos, TokenDoc(ids, np.ones(len(ids), bool))

    def state_dict(self) -> dict[str, Any]:
        epoch, pos, offset = self._cursor
        c = self.config
        return {"format": _STATE_FORMAT, "sources": list(c.sources), "split": c.split, "seed": c.seed,
                "seq_len": c.seq_len, "epoch": epoch, "position": pos, "offset": offset}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; the sources, split, seed and seq_len must match (batch size and world size may
        change: the global row stream continues where it stopped). Keys this version no longer writes (``batches``,
        ``global_batch_size``) are ignored."""
        if state.get("format") != _STATE_FORMAT:
            raise HybridctlError(f"data state: unknown format {state.get('format')!r} (expected {_STATE_FORMAT!r})")
        mine = self.state_dict()
        try:
            for key in ("sources", "split", "seed", "seq_len"):
                if (list(state[key]) if key == "sources" else state[key]) != mine[key]:
                    raise HybridctlError(f"data state: {key} was {state[key]!r}, this run has {mine[key]!r}")
            cursor = (int(state["epoch"]), int(state["position"]), int(state["offset"]))
        except (KeyError, TypeError, ValueError) as e:
            raise HybridctlError(f"data state: malformed ({type(e).__name__}: {e})") from None
        self._cursor, self._rows = cursor, None


def build_loader(*, source: str | Sequence[str], tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 split: str = "train", rank: int = 0, world_size: int = 1,
                 task_options: Mapping[str, Any] | None = None, text_field: str = "text", eval_every: int = 20,
                 shuffle_buffer: int = 1024, epochs: int | None = None) -> PackedLoader:
    """The batch iterator for one rank. ``batch_size`` is per rank (global batch = batch_size × world_size);
    ``epochs=None`` repeats forever (each epoch in a new seeded order). See the module docstring."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise HybridctlError(f"data: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    sources = (source,) if isinstance(source, str) else tuple(source)
    config = DataConfig(sources=tuple(s.strip() if isinstance(s, str) else s for s in sources), seq_len=seq_len,
                        batch_size=batch_size, seed=seed, split=split, task_options=dict(task_options or {}),
                        text_field=text_field, eval_every=eval_every, shuffle_buffer=shuffle_buffer, epochs=epochs)
    loader = PackedLoader(config, tokenizer=tokenizer, rank=rank, world_size=world_size)
    log.info("data: %s, split %s, seq_len %d, batch %d x %d ranks", ", ".join(sources), split, seq_len, batch_size,
             world_size)
    return loader
