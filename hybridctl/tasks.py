"""Synthetic tasks, one home: the training tasks the loader packs, and evaluation examples for long context.

Training tasks (``data.build_loader(source="phonebook" | "copy")``; their options in data.py's docstring): example i is
a pure function of (seed, split, i), so any position can be resumed. ``make_task`` builds one; ``TokenDoc`` is what the
loader packs.

Evaluation examples (``EvalExample``: prompt ids, answer ids and texts, and where the target sits), each generator
given a tokenizer and a target prompt length in tokens, deterministic from ``seed``:
  ``phonebook_examples``  the paper's Phonebook (PAPER.md): lines ``Name: 555-555-5555``; *standard* layout: the book,
                          2-3 shots ``What is the phone number for {name}?\nAnswer: {phone}``, then the query;
                          *reversed*: the target named before the book. ``depth`` (0..1) places the queried entry.
  ``needle_examples``     one pass key at ``depth`` in a filler text, then the question.
  ``copy_examples``       a random lowercase string, a newline: the answer is the same string.
Scoring is `hybridctl.evaluation.exact_match` (first line of the greedy continuation == the answer text).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hybridctl.config import HybridctlError
from hybridctl.corpora import SPLITS
from hybridctl.tokenizer import Tokenizer

@dataclass
class TokenDoc:
    """One tokenised document: ``ids`` int64 [L]; ``targets`` bool [L] marks tokens that may be predicted."""

    ids: np.ndarray
    targets: np.ndarray


_TASK_OPTIONS = {"phonebook": ("n_entries", "context_len", "layout", "min_entries", "shots"), "copy": ("min_len", "max_len", "context_len"),
                 "needle": ("context_len",)}
_CONSONANTS, _VOWELS = "bcdfghklmnprstvz", "aeiou"
# phonebook training layouts: "lines" (``Name: number`` lines, a blank line, ``Name: ``), or the evaluation prompts'
# own "standard" / "reversed" layout (``phonebook_examples``), or "both" (one of the two per example)
TRAIN_LAYOUTS = ("lines", "standard", "reversed", "both")


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
            if key == "layout":
                if v not in TRAIN_LAYOUTS:
                    raise HybridctlError(f"{name}.layout: must be one of {', '.join(TRAIN_LAYOUTS)}, got {v!r}")
            elif key == "shots":
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise HybridctlError(f"{name}.shots: must be a non-negative integer, got {v!r}")
            elif v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
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
        layout = self.options.get("layout", "lines")
        if layout != "lines":
            return self._paper(i, layout)
        if {"min_entries", "shots"} & set(self.options):
            raise HybridctlError("phonebook: min_entries and shots need layout standard, reversed or both")
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

    def _paper(self, i: int, layout: str) -> TokenDoc:
        """An evaluation-layout example (``phonebook_examples``' prompt) for training: the book, up to ``shots``
        solved questions about other entries, the query; targets: every answer, the newline after each shot's
        answer and the EOS after the query's (so a model learns where an answer ends). Pieces are encoded apart."""
        rng = self.rng(i)
        if layout == "both":
            layout = PHONEBOOK_LAYOUTS[int(rng.integers(2))]
        most, depth = self.options.get("n_entries"), float(rng.random())
        fewest, shots = self.options.get("min_entries") or most or 1, self.options.get("shots", 2)
        if most is not None and fewest > most:
            raise HybridctlError(f"phonebook: min_entries {fewest} exceeds n_entries {most}")
        k = int(rng.integers(fewest, most + 1)) if most else None
        count = max(k or self.budget // 4, shots + 1)
        entries = _entries(rng, count, chunk=count + 4)
        answer = len(self.encode(f" {entries[0][1]}")) + 1  # + EOS
        if k is None:  # as many entries as fit the budget (the pieces' encoding may be longer: step back below)
            fewest = 1
            text = lambda k: _phonebook_text(entries, k, min(shots, k - 1), layout, depth)[0]  # noqa: E731
            k = _fit("phonebook", self.tok, self.budget - answer, text, 1, len(entries))[1]
        while True:
            doc = self._paper_doc(entries, k, min(shots, k - 1), layout, depth)
            if len(doc.ids) <= self.budget:
                return doc
            if k <= fewest:  # a drawn size that does not fit steps down towards min_entries
                raise HybridctlError(f"phonebook: {k} entries in the {layout} layout take {len(doc.ids)} tokens, "
                                     f"over {self.budget}; raise seq_len/context_len or lower n_entries")
            k -= 1

    def _paper_doc(self, entries: list[tuple[str, str]], k: int, shots: int, layout: str, depth: float) -> TokenDoc:
        pieces, _, _, phone = _phonebook_pieces(entries, k, shots, layout, depth)
        pieces.append((f" {phone}", True))
        ids, targets = list(self.bos), [False] * len(self.bos)
        for (_, is_target), piece_ids in zip(pieces, self.tok.encode_batch([t for t, _ in pieces], add_bos=False)):
            ids += piece_ids
            targets += [is_target] * len(piece_ids)
        return TokenDoc(np.array(ids + [self.eos], np.int64), np.array(targets + [True], bool))

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



_TASK_OPTIONS["needle"] = ("context_len", "min_context_len")  # here, beside the task it configures


def task_option_names(name: str) -> tuple[str, ...]:
    """The options the training task ``name`` takes."""
    return tuple(_TASK_OPTIONS[name])


class _Needle(_Task):
    """The pass-key task in the evaluation layout (``needle_examples``), as training examples: filler sentences
    filling the example's budget, the needle at a uniformly random depth, the question; the target is the key. The
    ids are built from the pieces' own encodings (no search), so the prompt may merge differently from its text.
    Options: ``context_len`` (the budget; default the row), ``min_context_len`` (each example's budget drawn
    log-uniformly in [min_context_len, context_len], at least one filler sentence: rows of several examples)."""

    def example(self, i: int) -> TokenDoc:
        rng = self.rng(i)
        key = str(int(rng.integers(10000, 100000)))
        needle, question = self.encode(_NEEDLE.format(key=key)), self.newline + self.encode(_NEEDLE_QUESTION)
        answer = self.encode(f" {key}")
        sentences = [self.encode(s + ". ") for s in _FILLER.split(". ") if s.strip(". ")]
        fixed = len(self.bos) + len(needle) + len(question) + len(answer) + 1
        budget, lo = self.budget, self.options.get("min_context_len")
        if lo is not None:  # log-uniform in [lo, budget]: several short examples per row, some at full length
            if lo > budget:
                raise HybridctlError(f"needle.min_context_len: {lo} exceeds the example budget {budget}")
            drawn = int(round(math.exp(rng.uniform(math.log(lo), math.log(budget)))))
            budget = min(budget, max(drawn, fixed + max(len(s) for s in sentences)))  # at least one sentence
        room = budget - fixed
        if room < 0:
            raise HybridctlError(f"needle: an example needs over {fixed} tokens; raise seq_len")
        filler: list[list[int]] = []
        while room >= len(sentences[len(filler) % len(sentences)]):
            filler.append(sentences[len(filler) % len(sentences)])
            room -= len(filler[-1])
        filler.insert(int(rng.integers(len(filler) + 1)), needle)
        return self.finish(self.bos + [t for piece in filler for t in piece] + question, answer)


def make_task(name: str, tokenizer: Tokenizer, seq_len: int, seed: int, split: str,
              options: Mapping[str, Any]) -> _Task:
    """The training task ``name`` ("phonebook", "copy" or "needle"): ``.documents(epoch, start)`` yields
    (i, TokenDoc)."""
    cls = {"phonebook": _Phonebook, "copy": _Copy, "needle": _Needle}[name]
    return cls(name, tokenizer, seq_len, seed, split, options)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation examples: (prompt, answer) at a target prompt length, for exact-match scoring by greedy generation
# --------------------------------------------------------------------------------------------------------------------

EVAL_TASKS = ("phonebook", "needle", "copy")
PHONEBOOK_LAYOUTS = ("standard", "reversed")
_QUESTION = "What is the phone number for {name}?\nAnswer:"
_REVERSED_HEAD = ("Please find the phone number for {name}. I will ask you for this phone number later. Memorize it. "
                  "Remember {name}. Here is the phonebook:\n")
_REVERSED_TAIL = ("Okay, that is the end of the phonebook. Remember when I asked you to memorize the phone number for "
                  "{name}?\n")
# the pass-key filler of Mohtashami & Jaggi (2023), the usual self-contained needle-in-a-haystack text
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_NEEDLE_QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class EvalExample:
    """One evaluation example: ``prompt`` ids (BOS included when the tokenizer adds one), ``answer`` the expected
    continuation (ids of ``answer_text``, which the scorer compares), ``meta`` where the target sits."""

    prompt: list[int]
    answer: list[int]
    prompt_text: str
    answer_text: str
    meta: dict[str, Any] = field(default_factory=dict)


def _check_eval_args(what: str, target_len: int, n: int, depth: float | None) -> None:
    if not isinstance(target_len, int) or isinstance(target_len, bool) or target_len < 1:
        raise HybridctlError(f"{what}: target_len must be a positive integer, got {target_len!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise HybridctlError(f"{what}: n must be a positive integer, got {n!r}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise HybridctlError(f"{what}: depth must be in [0, 1], got {depth!r}")


def _fit(what: str, tok: Tokenizer, target_len: int, build, lo: int, hi: int) -> tuple[str, int]:
    """The longest prompt text ``build(k)`` (k in [lo, hi], length non-decreasing in k) whose ids fit ``target_len``:
    a binary search over k with the real tokenizer (merges across pieces make token counts non-additive)."""
    def size(k: int) -> int:
        return len(tok.encode(build(k)))

    if size(lo) > target_len:
        raise HybridctlError(f"{what}: even the smallest prompt takes {size(lo)} tokens, over target_len "
                             f"{target_len}; raise target_len")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= target_len else (lo, mid - 1)
    return build(lo), lo


def _example(tok: Tokenizer, prompt_text: str, answer_text: str, **meta: Any) -> EvalExample:
    return EvalExample(tok.encode(prompt_text), tok.encode(answer_text, add_bos=False), prompt_text, answer_text,
                       dict(meta))


def _entries(rng: np.random.Generator, count: int, chunk: int = 64) -> list[tuple[str, str]]:
    """``count`` phonebook entries with distinct names (drawn ``chunk`` at a time)."""
    out: dict[str, str] = {}
    for chunk in _phone_entries(rng, chunk):
        for name, phone in chunk:
            out.setdefault(name, phone)
            if len(out) == count:
                return list(out.items())
    raise AssertionError("unreachable")


def hash_order(text: str) -> int:
    """A fixed pseudo-random order key of a string (CRC32: stable across processes, unlike ``hash``)."""
    return zlib.crc32(text.encode())


def _phonebook_pieces(entries: list[tuple[str, str]], k: int, shots: int, layout: str,
                      depth: float) -> tuple[list[tuple[str, bool]], int, str, str]:
    """(prompt as (text, is_target) pieces, index of the target in the book, name, phone) of a k-entry book drawn
    from ``entries`` (entries[0] is the target, entries[1:shots+1] the shots; the rest fill the book, in
    ``hash_order``). The targets are the shots' answers ``" ddd-ddd-dddd"`` and the newline closing each."""
    book = list(entries[shots + 1:shots + 1 + max(k - shots - 1, 0)] + entries[1:shots + 1])
    book.sort(key=lambda e: hash_order(e[0]))  # the shots' entries anywhere in the book, reproducibly
    where = round(depth * len(book))
    book.insert(where, entries[0])
    name, phone = entries[0]
    lines = "".join(f"{n}: {p}\n" for n, p in book)
    pieces = [(lines + "\n", False)] if layout == "standard" else [
        (_REVERSED_HEAD.format(name=name) + lines + _REVERSED_TAIL.format(name=name) + "\n", False)]
    for n, p in entries[1:shots + 1]:
        pieces += [(_QUESTION.format(name=n), False), (f" {p}", True), ("\n", True), ("\n", False)]
    pieces.append((_QUESTION.format(name=name), False))
    return pieces, where, name, phone


def _phonebook_text(entries: list[tuple[str, str]], k: int, shots: int, layout: str,
                    depth: float) -> tuple[str, int, str, str]:
    """``_phonebook_pieces`` joined into the prompt text."""
    pieces, where, name, phone = _phonebook_pieces(entries, k, shots, layout, depth)
    return "".join(t for t, _ in pieces), where, name, phone


def phonebook_examples(tokenizer: Tokenizer, target_len: int, *, n: int = 1, depth: float | None = None,
                       layout: str = "standard", shots: int = 2, seed: int = 0) -> list[EvalExample]:
    """``n`` Phonebook prompts of at most ``target_len`` tokens (as many entries as fit), answer ``" ddd-ddd-dddd"``.

    depth: where the queried entry sits in the book, 0 = first line, 1 = last (None: uniform at random per example).
    The shots ask for other entries of the same book. ``meta``: layout, entries, position (index), depth."""
    _check_eval_args("phonebook", target_len, n, depth)
    if layout not in PHONEBOOK_LAYOUTS:
        raise HybridctlError(f"phonebook: layout must be one of {PHONEBOOK_LAYOUTS}, got {layout!r}")
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise HybridctlError(f"phonebook: shots must be a non-negative integer, got {shots!r}")
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        d = float(rng.random()) if depth is None else depth
        upper = max(target_len // 4, shots + 1)  # an entry takes more than 4 tokens in any tokenizer we know
        entries = _entries(rng, upper)
        text, k = _fit("phonebook", tokenizer, target_len,
                       lambda k: _phonebook_text(entries, k, shots, layout, d)[0], shots + 1, upper)
        _, where, name, phone = _phonebook_text(entries, k, shots, layout, d)
        out.append(_example(tokenizer, text, f" {phone}", task="phonebook", layout=layout, entries=k, position=where,
                            depth=where / max(k - 1, 1), name=name))
    return out


def needle_examples(tokenizer: Tokenizer, target_len: int, *, n: int = 1, depth: float | None = None,
                    seed: int = 0) -> list[EvalExample]:
    """``n`` pass-key prompts of at most ``target_len`` tokens: filler sentences with one needle ("The pass key is
    NNNNN. ...") at ``depth`` (0 = first sentence, 1 = last; None: random), then the question; answer ``" NNNNN"``."""
    _check_eval_args("needle", target_len, n, depth)
    sentences = [s + "." for s in _FILLER.split(". ") if s.strip(". ")]
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        d = float(rng.random()) if depth is None else depth
        key = str(int(rng.integers(10000, 100000)))

        def build(k: int, d=d, key=key) -> str:
            filler = [sentences[j % len(sentences)] + " " for j in range(k)]
            filler.insert(round(d * k), _NEEDLE.format(key=key))
            return "".join(filler) + "\n" + _NEEDLE_QUESTION

        text, k = _fit("needle", tokenizer, target_len, build, 0, max(target_len, 1))
        out.append(_example(tokenizer, text, f" {key}", task="needle", depth=round(d * k) / max(k, 1),
                            filler_sentences=k))
    return out


def copy_examples(tokenizer: Tokenizer, target_len: int, *, n: int = 1, seed: int = 0) -> list[EvalExample]:
    """``n`` copy prompts: a random lowercase string (as long as fits ``target_len`` with its copy), a newline; the
    answer is the string again (the training task's layout, sized to the target length)."""
    _check_eval_args("copy", target_len, n, None)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 3, i])
        chars = "".join(chr(97 + c) for c in rng.integers(26, size=max(target_len, 1)))
        # the prompt plus the same string again must fit target_len + len(answer): halve the budget
        budget = target_len // 2 + 1
        text, k = _fit("copy", tokenizer, budget, lambda k: chars[:k] + "\n", 1, len(chars))
        if len(tokenizer.encode(text)) > target_len:
            raise HybridctlError(f"copy: target_len {target_len} is too small")
        out.append(_example(tokenizer, text, chars[:k], task="copy", length=k))
    return out


def eval_examples(task: str, tokenizer: Tokenizer, target_len: int, **options: Any) -> list[EvalExample]:
    """``phonebook_examples`` / ``needle_examples`` / ``copy_examples`` by name."""
    makers = {"phonebook": phonebook_examples, "needle": needle_examples, "copy": copy_examples}
    if task not in makers:
        raise HybridctlError(f"unknown evaluation task {task!r}; valid: {', '.join(EVAL_TASKS)}")
    try:
        return makers[task](tokenizer, target_len, **options)
    except TypeError as e:
        raise HybridctlError(f"{task}: {e}") from None
