"""Task accuracy swept over context lengths (and target depths): the quality half of ``bench`` and the long-context
evaluation of ``extend-context``, one home.

``sweep_task(model, tokenizer, task, lengths, depths)`` builds ``hybridctl.tasks`` evaluation examples at each target
prompt length (and depth), scores them with ``hybridctl.evaluation.exact_match`` by greedy decoding on the decode
runtime (``runtime_greedy``: the same prefill + recurrent steps ``generate`` runs, batched, without the CPU fast
path's compile), and returns one row per cell::

    {"task": "needle", "layout": None, "length": 1024, "depth": 0.5, "examples": 4, "correct": 3,
     "accuracy": 0.75, "prompt_tokens_mean": 1019.0, "prompt_tokens_max": 1023}

``layout`` is "standard" / "reversed" for phonebook (both swept by default), None otherwise; ``depth`` is None where
the target's place is drawn at random per example (``depths=None``) and for copy. ``records=True`` adds "records":
per example its meta, the decoded output and whether it matched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hybridctl.config import HybridctlError
from hybridctl.evaluation import GreedyFn, exact_match
from hybridctl.tasks import EVAL_TASKS, PHONEBOOK_LAYOUTS, eval_examples
from hybridctl.tokenizer import Tokenizer

log = logging.getLogger(__name__)
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # bench's default needle grid (depth 0 = the first filler sentence)
PHONEBOOK_DEPTHS = (0.0, 0.5, 1.0)  # bench's default phonebook sweep of the queried entry's place
ROW_KEYS = ("task", "layout", "length", "depth", "examples", "correct", "accuracy", "prompt_tokens_mean",
            "prompt_tokens_max")


def runtime_greedy(model: torch.nn.Module, *, vocab: int | None = None, eos_id: int | None = None) -> GreedyFn:
    """A GreedyFn on the decode runtime (``hybridctl.decode``): prompts left-padded into one batch, chunked-scan
    prefill, one recurrent step per token, argmax over the first ``vocab`` logits; each row cut after ``eos_id``
    (kept). Compiles nothing (a per-batch-size compile would dwarf the few answer tokens)."""
    from hybridctl import decode

    def run(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        plan = decode.plan_decode(model, batch=len(prompts), compile=False)
        trace = decode.run(model, prompts, plan, max_new_tokens=max_new_tokens, vocab=vocab)
        out = []
        for ids in trace.new_ids:
            out.append(ids[:ids.index(eos_id) + 1] if eos_id is not None and eos_id in ids else ids)
        return out

    return run


def _check(task: str, lengths: Sequence[int], depths: Sequence[float] | None, layouts: Sequence[str], n: int) -> None:
    if task not in EVAL_TASKS:
        raise HybridctlError(f"unknown task {task!r}; valid: {', '.join(EVAL_TASKS)}")
    if not lengths or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in lengths):
        raise HybridctlError(f"{task}: lengths must be positive integers, got {list(lengths)}")
    if depths is not None:
        if task == "copy":
            raise HybridctlError("copy: the task has no depth (the whole prompt is the target); drop the depths")
        if not depths or any(not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0 for d in depths):
            raise HybridctlError(f"{task}: depths must lie in [0, 1], got {list(depths)}")
    bad = [x for x in layouts if x not in PHONEBOOK_LAYOUTS]
    if bad or not layouts:
        raise HybridctlError(f"phonebook: layouts must be among {PHONEBOOK_LAYOUTS}, got {list(layouts)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise HybridctlError(f"{task}: n must be a positive integer, got {n!r}")


def sweep_task(model: torch.nn.Module, tokenizer: Tokenizer, task: str, lengths: Sequence[int],
               depths: Sequence[float] | None = None, *, n: int = 4, seed: int = 0, device: Any = None,
               layouts: Sequence[str] = PHONEBOOK_LAYOUTS, batch_size: int = 8, records: bool = False,
               generate: GreedyFn | None = None, progress: Callable[[int, int], None] | None = None
               ) -> list[dict[str, Any]]:
    """Exact-match accuracy of ``model`` on ``task`` ("phonebook" | "needle" | "copy") at each target prompt length
    in ``lengths`` (tokens of ``tokenizer``, the model's own) × each depth in ``depths`` (needle / phonebook; None: a
    random depth per example) × each layout in ``layouts`` (phonebook only): ``n`` examples per cell, deterministic
    from ``seed`` (the same examples for every model given the same tokenizer). ``device``: where the model is
    moved first (default: where it is). ``generate``: the GreedyFn to score with (default ``runtime_greedy``).
    ``progress(done, total)`` is called after each cell. Returns one row per cell (module docstring)."""
    _check(task, lengths, depths, layouts if task == "phonebook" else PHONEBOOK_LAYOUTS, n)
    if device is not None:
        model = model.to(device)
    vocab = min(model.cfg.vocab_size, tokenizer.vocab_size)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        log.warning("%s: the tokenizer has %d ids, the model %d; ids beyond the model's are never produced",
                    task, tokenizer.vocab_size, model.cfg.vocab_size)
    gen = generate or runtime_greedy(model, vocab=vocab, eos_id=tokenizer.eos_id)
    cells = [(lay, length, d) for lay in (layouts if task == "phonebook" else (None,))
             for length in lengths for d in (depths if depths is not None and task != "copy" else (None,))]
    rows = []
    for i, (layout, length, depth) in enumerate(cells):
        opts: dict[str, Any] = {"n": n, "seed": seed}
        if task != "copy":
            opts["depth"] = None if depth is None else float(depth)
        if layout is not None:
            opts["layout"] = layout
        examples = eval_examples(task, tokenizer, length, **opts)
        too_big = [t for e in examples for t in e.prompt if t >= model.cfg.vocab_size]
        if too_big:
            raise HybridctlError(f"{task}: token id {too_big[0]} is outside the model's vocabulary "
                                 f"(0..{model.cfg.vocab_size - 1}): wrong tokenizer for this model?")
        score = exact_match(examples, gen, tokenizer, batch_size=batch_size)
        sizes = [len(e.prompt) for e in examples]
        row = {"task": task, "layout": layout, "length": length, "depth": None if depth is None else float(depth),
               "examples": score.examples, "correct": score.correct, "accuracy": score.accuracy,
               "prompt_tokens_mean": sum(sizes) / len(sizes), "prompt_tokens_max": max(sizes)}
        if records:
            row["records"] = score.records
        rows.append(row)
        log.info("%s %s length %d depth %s: %d/%d", task, layout or "", length, depth, score.correct,
                 score.examples)
        if progress is not None:
            progress(i + 1, len(cells))
    return rows
