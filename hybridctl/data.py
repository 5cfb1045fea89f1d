"""Training data: corpora and synthetic tasks, packed into rows with document ids, as resumable sharded batches.

Sources (``build_loader(source=...)``, a string or a list of strings):
  ``"builtin"``    the embedded corpus (CPython's help topics), read by `hybridctl.corpora`.
  ``"phonebook"``  synthetic lookup (Mamba-2-Hybrid paper, arXiv 2406.07887): ``Name: 555-123-4567`` lines, a blank
                   line, then ``Name: `` of one entry; the answer is its number. Options ``n_entries`` (default: fill
                   the context), ``context_len`` (tokens per example, default ``seq_len + 1``).
  ``"copy"``       a random lowercase string, a newline, the same tokens again. Options ``min_len``, ``max_len``
                   (characters), ``context_len``.
  ``"needle"``     the pass-key task in the evaluation's layout (`hybridctl.tasks`). Options ``context_len``,
                   ``min_context_len`` (each example's length log-uniform between the two; default: fill the row). The tasks themselves live in `hybridctl.tasks`; their exact-match
                   accuracy is `hybridctl.evaluation.task_accuracy`.
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

import dataclasses
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
from hybridctl.tasks import TokenDoc, make_task  # TokenDoc: the unit packing works on
from hybridctl.tokenizer import Tokenizer  # same layer: the one tokenizer interface

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_STATE_FORMAT = "hybridctl.data/1"
_TOKENIZE_GROUP = 64  # documents per encode_batch call (HF tokenizers encode a batch in parallel)


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
    min_doc_tokens: int = 0  # corpus documents with fewer tokens are skipped (long-context rows)

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
            self._task = make_task(name, tokenizer, config.seq_len, config.seed, config.split, config.task_options)
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
                    if len(ids) < self.config.min_doc_tokens:
                        continue
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
                    if len(ids) < self.config.min_doc_tokens:
                        continue
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


# --------------------------------------------------------------------------------------------------------------------
# Mixing for long context: rows drawn by weight from the corpus, the tasks and short sequences
# --------------------------------------------------------------------------------------------------------------------

_MIX_FORMAT = "hybridctl.data.mix/1"


class MixedLoader:
    """Rows of ``seq_len`` tokens, each drawn from one component, the batch contract of `PackedLoader`.

    Components: ``"corpus"`` (the sources, documents of at least ``min_doc_tokens`` tokens, packed at seq_len),
    the tasks ``"phonebook"`` / ``"needle"`` / ``"copy"`` (examples filling seq_len; ``task_options[task]`` their options), with the ``mix`` weights scaled
    by ``1 - short_fraction``; and ``"short"`` (weight ``short_fraction``): seq_len // short_seq_len corpus windows of
    short_seq_len tokens (every document, in another seeded order), each its own sequence (``seq_idx``), the rest
    padding. Global row r's component is a pure function of (seed, r); each component is a one-row-per-batch PackedLoader over the global
    stream, so ``state_dict`` (the row count and every component's cursor) resumes exactly, and ranks take their rows
    as PackedLoader's do. Endless."""

    def __init__(self, config: DataConfig, *, mix: dict[str, float], short_fraction: float, short_seq_len: int,
                 tokenizer: Tokenizer, rank: int, world_size: int,
                 task_options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        from hybridctl.recipe import check_mix

        check_mix(mix, short_fraction, short_seq_len, config.seq_len)
        task_options = dict(task_options or {})
        for name, opts in task_options.items():
            if name not in TASKS or not isinstance(opts, Mapping):
                raise HybridctlError(f"data.task_options.{name}: in a mixed stream, task_options maps a task "
                                     f"({', '.join(TASKS)}) to its options, e.g. task_options.needle.min_context_len")
        if config.epochs is not None:
            raise HybridctlError("data: a mixed stream is endless (epochs must be None)")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.mix, self.short_fraction = dict(mix), short_fraction
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        one = dict(batch_size=1, epochs=None)
        self.parts: dict[str, PackedLoader] = {}
        for name, w in sorted(mix.items()):
            if w > 0:
                opts = dict(sources=(name,), task_options=dict(task_options.get(name, {})), min_doc_tokens=0) \
                    if name != "corpus" else {}
                self.parts[name] = PackedLoader(dataclasses.replace(config, **one, **opts), tokenizer=tokenizer,
                                                rank=0, world_size=1)
        if short_fraction > 0:
            k = config.seq_len // short_seq_len
            self.parts["short"] = PackedLoader(dataclasses.replace(
                config, seq_len=short_seq_len, batch_size=k, epochs=None, min_doc_tokens=0, seed=config.seed + 1),
                tokenizer=tokenizer, rank=0, world_size=1)
        names = [n for n in self.parts if n != "short"]
        weights = [self.mix[n] * (1 - short_fraction) for n in names] + ([short_fraction] if short_fraction else [])
        self.names = names + (["short"] if short_fraction else [])
        self.cum = np.cumsum(weights) / sum(weights)
        self.rows = 0  # global rows drawn so far

    def __iter__(self) -> MixedLoader:
        return self

    def component(self, r: int) -> str:
        """The component of global row ``r``."""
        u = np.random.default_rng([self.config.seed, 0x6D6978, r]).random()
        return self.names[min(int(np.searchsorted(self.cum, u, side="right")), len(self.names) - 1)]

    def _row(self, name: str) -> Row:
        b = next(self.parts[name])
        if name != "short":
            return b["input_ids"][0], b["labels"][0], b["seq_idx"][0]
        k, s = b["input_ids"].shape
        T = self.config.seq_len
        x = torch.full((T,), self.pad, dtype=torch.int64)
        y = torch.full((T,), IGNORE_INDEX, dtype=torch.int64)
        idx = torch.full((T,), 0, dtype=torch.int32)
        x[:k * s], y[:k * s] = b["input_ids"].flatten(), b["labels"].flatten()
        offsets = torch.cat([torch.zeros(1, dtype=torch.int32), (b["seq_idx"].amax(1) + 1).cumsum(0)[:-1].int()])
        idx[:k * s] = (b["seq_idx"] + offsets[:, None]).flatten()
        idx[k * s:] = idx[k * s - 1] + 1
        return x, y, idx

    def __next__(self) -> dict[str, torch.Tensor]:
        B = self.config.batch_size
        mine = []
        for j in range(B * self.world_size):
            row = self._row(self.component(self.rows + j))
            if j // B == self.rank:
                mine.append(row)
        self.rows += B * self.world_size
        x, y, s = (torch.stack(a) for a in zip(*mine))
        return {"input_ids": x, "labels": y, "seq_idx": s}

    def state_dict(self) -> dict[str, Any]:
        return {"format": _MIX_FORMAT, "seed": self.config.seed, "seq_len": self.config.seq_len,
                "split": self.config.split, "mix": dict(sorted(self.mix.items())),
                "short_fraction": self.short_fraction, "rows": self.rows,
                "components": {n: p.state_dict() for n, p in self.parts.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; the mix, seed, split and seq_len must match (batch and world size may change)."""
        if state.get("format") != _MIX_FORMAT:
            raise HybridctlError(f"data state: unknown format {state.get('format')!r} (expected {_MIX_FORMAT!r})")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "split", "mix", "short_fraction"):
            if state.get(key) != mine[key]:
                raise HybridctlError(f"data state: {key} was {state.get(key)!r}, this run has {mine[key]!r}")
        comps = state.get("components")
        if not isinstance(comps, dict) or set(comps) != set(self.parts):
            raise HybridctlError("data state: malformed mixed-stream components")
        for n, p in self.parts.items():
            p.load_state_dict(comps[n])
        self.rows = int(state["rows"])


def build_loader(*, source: str | Sequence[str], tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 split: str = "train", rank: int = 0, world_size: int = 1,
                 task_options: Mapping[str, Any] | None = None, text_field: str = "text", eval_every: int = 20,
                 shuffle_buffer: int = 1024, epochs: int | None = None, mix: Mapping[str, float] | None = None,
                 short_fraction: float = 0.0, short_seq_len: int = 0,
                 min_doc_tokens: int = 0) -> PackedLoader | MixedLoader:
    """The batch iterator for one rank. ``batch_size`` is per rank (global batch = batch_size × world_size);
    ``epochs=None`` repeats forever (each epoch in a new seeded order). See the module docstring. ``mix`` /
    ``short_fraction`` (with ``short_seq_len``): a `MixedLoader` over the source and the tasks (endless)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise HybridctlError(f"data: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    sources = (source,) if isinstance(source, str) else tuple(source)
    mixed = bool(mix or short_fraction)  # mixed: task_options = {task: {option: value}} for the mixed-in tasks
    config = DataConfig(sources=tuple(s.strip() if isinstance(s, str) else s for s in sources), seq_len=seq_len,
                        batch_size=batch_size, seed=seed, split=split,
                        task_options={} if mixed else dict(task_options or {}),
                        text_field=text_field, eval_every=eval_every, shuffle_buffer=shuffle_buffer, epochs=epochs,
                        min_doc_tokens=min_doc_tokens)
    if mixed:
        log.info("data: mix %s, short fraction %g of %d-token sequences, seq_len %d", dict(mix or {}),
                 short_fraction, short_seq_len, seq_len)
        return MixedLoader(config, mix=dict(mix or {"corpus": 1.0}), short_fraction=short_fraction,
                           short_seq_len=short_seq_len, tokenizer=tokenizer, rank=rank, world_size=world_size,
                           task_options=task_options)
    loader = PackedLoader(config, tokenizer=tokenizer, rank=rank, world_size=world_size)
    log.info("data: %s, split %s, seq_len %d, batch %d x %d ranks", ", ".join(sources), split, seq_len, batch_size,
             world_size)
    return loader
