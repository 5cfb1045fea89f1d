"""Evaluation, one home: losses, held-out evaluation over batches, perplexity by context position, task accuracy, and
exact-match scoring of (prompt, answer) examples through any greedy-generation callable.

- ``lm_loss_sum`` / ``perplexity``: the training loss and its exp (train.py's step and evaluation use them).
- ``evaluate``: token-mean held-out loss (and task exact-match) over micro-batches of the data loader's contract,
  summed over ranks.
- ``perplexity_by_position``: loss/perplexity of a token stream bucketed by the position a token is predicted at
  inside sliding windows (every window scores all of its positions, so each bucket averages over windows).
- ``task_accuracy``: exact match / token accuracy on the labelled positions of a batch (the training tasks).
- ``exact_match``: score `hybridctl.tasks` EvalExamples with a ``GreedyFn`` — ``fn(prompts, max_new_tokens) →
  continuations`` (token id lists); ``greedy_forward(model)`` is the plain reference one (full forward per token);
  a decode runtime (``generate``, ``bench``) plugs in the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hybridctl import parallel
from hybridctl.config import HybridctlError
from hybridctl.data import IGNORE_INDEX
from hybridctl.tasks import EvalExample
from hybridctl.tokenizer import Tokenizer

GreedyFn = Callable[[list[list[int]], int], list[list[int]]]


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(80) so a diverged run reports a finite number."""
    return math.exp(min(loss, 80.0))


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over labelled positions (labels == -100 skipped), in fp32. logits [B,T,V], labels [B,T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def chunked_lm_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int) -> torch.Tensor:
    """``lm_loss_sum(head(hidden), labels)`` without ever holding more than ``chunk_tokens`` rows of logits: the
    flattened tokens are cut into chunks, each chunk's head + fp32 cross-entropy runs under activation
    checkpointing (recomputed in backward), and the chunk sums are added. hidden [B,T,D], labels [B,T]."""
    from torch.utils.checkpoint import checkpoint

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")

    h, y = hidden.flatten(0, 1), labels.flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(piece, h[i:i + chunk_tokens], y[i:i + chunk_tokens], use_reentrant=False)
    return total


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


@torch.no_grad()
def evaluate(model, batches: Iterator[Mapping[str, torch.Tensor]], *, max_batches: int, device: torch.device,
             task: bool = False, autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Held-out loss (token mean) over up to ``max_batches`` micro-batches per rank (summed over ranks when
    distributed); task exact-match when ``task``. Returns ``eval_loss``/``eval_ppl`` (and ``eval_accuracy``)."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, tokens, exact matches, examples
    for _ in range(max_batches):
        b = next(batches, None)
        if b is None:
            break
        x, y, s = (b[k].to(device) for k in ("input_ids", "labels", "seq_idx"))
        with autocast():
            logits = model(x, seq_idx=s)
        sums[0] += lm_loss_sum(logits, y).double()
        sums[1] += (y != IGNORE_INDEX).sum()
        if task:
            acc = task_accuracy(logits, {"labels": y, "seq_idx": s})
            sums[2] += acc.exact_match * acc.examples
            sums[3] += acc.examples
    model.train()
    parallel.all_reduce_sum(sums)
    out = {}
    if sums[1] > 0:
        out["eval_loss"] = float(sums[0] / sums[1])
        out["eval_ppl"] = perplexity(out["eval_loss"])
    if sums[3] > 0:
        out["eval_accuracy"] = float(sums[2] / sums[3])
    return out


# ---- perplexity by position -----------------------------------------------------------------------------------------


def position_buckets(window: int) -> list[int]:
    """Bucket edges 0, 1, 2, 4, …, ``window`` (powers of two): position p falls in [edges[i], edges[i+1])."""
    edges = [0]
    while edges[-1] < window:
        edges.append(min(max(1, 2 * edges[-1]), window))
    return edges


def perplexity_by_position(model, tokens: Sequence[int] | torch.Tensor, *, window: int, stride: int | None = None,
                           edges: Sequence[int] | None = None, batch_size: int = 1, device: Any = None,
                           autocast: Callable[[], Any] = contextlib.nullcontext) -> list[dict[str, float]]:
    """Loss by context position over a token stream, with sliding windows.

    Windows of ``window`` + 1 tokens start every ``stride`` tokens (default ``window``: disjoint). In each, the token
    at window offset p + 1 is predicted from the p + 1 tokens before it and counted in the bucket holding p (edges:
    ``position_buckets(window)`` unless given; strictly increasing, from 0, the last one ``window``). Returns one row
    per bucket: ``lo``, ``hi`` (positions [lo, hi)), ``tokens`` (predictions counted), ``loss`` (mean NLL, nats),
    ``ppl``. A bucket no window reached has tokens 0 and loss/ppl NaN."""
    ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
    stride = window if stride is None else stride
    if window < 1 or stride < 1 or batch_size < 1:
        raise HybridctlError(f"perplexity: window, stride and batch_size must be >= 1, got {window}, {stride}, "
                             f"{batch_size}")
    if ids.numel() < window + 1:
        raise HybridctlError(f"perplexity: the stream has {ids.numel()} tokens, fewer than window + 1 = {window + 1}")
    edges = list(position_buckets(window) if edges is None else edges)
    if edges[0] != 0 or edges[-1] != window or any(b <= a for a, b in zip(edges, edges[1:])):
        raise HybridctlError(f"perplexity: bucket edges must rise strictly from 0 to window={window}, got {edges}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    bucket = torch.bucketize(torch.arange(window), torch.tensor(edges[1:]), right=True).to(device)
    nll = torch.zeros(len(edges) - 1, dtype=torch.float64, device=device)
    count = torch.zeros(len(edges) - 1, dtype=torch.float64, device=device)
    starts = list(range(0, ids.numel() - window, stride))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            rows = torch.stack([ids[s:s + window + 1] for s in starts[i:i + batch_size]]).to(device)
            with autocast():
                logits = model(rows[:, :-1])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
            per_tok = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")  # [B, window]
            nll.index_add_(0, bucket, per_tok.double().sum(0))
            count.index_add_(0, bucket, torch.full((window,), float(rows.shape[0]), dtype=torch.float64,
                                                   device=device))
    model.train(was_training)
    out = []
    for j, (lo, hi) in enumerate(zip(edges, edges[1:])):
        n = float(count[j])
        loss = float(nll[j]) / n if n else math.nan
        out.append({"lo": lo, "hi": hi, "tokens": int(n), "loss": loss, "ppl": perplexity(loss) if n else math.nan})
    return out


# ---- exact match by greedy generation -------------------------------------------------------------------------------


def greedy_forward(model, *, device: Any = None, eos_id: int | None = None, vocab_size: int | None = None
                   ) -> GreedyFn:
    """The reference GreedyFn: one full forward over prompt + generated tokens per new token (no cache), argmax over
    the first ``vocab_size`` logits (a tokenizer's vocabulary inside a padded one; default all), each prompt alone
    (no padding). Stops a row at ``eos_id`` (kept in its output). Slow; exact by construction."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def run(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        model.eval()
        out = []
        for prompt in prompts:
            seq, new = torch.tensor([prompt], dtype=torch.long, device=dev), []
            for _ in range(max_new_tokens):
                nxt = int(model(seq)[0, -1, :vocab_size].argmax())
                new.append(nxt)
                if nxt == eos_id:
                    break
                seq = torch.cat([seq, seq.new_tensor([[nxt]])], dim=1)
            out.append(new)
        return out

    return run


@dataclass
class ExactMatch:
    """``accuracy``: fraction of examples whose continuation's first line equals the answer (both stripped);
    ``records``: per example its ``meta`` plus ``output`` (decoded continuation) and ``correct``."""

    accuracy: float
    correct: int
    examples: int
    records: list[dict[str, Any]] = field(default_factory=list)


def answer_matches(output: str, answer: str) -> bool:
    """Exact match of an answer: the continuation's first line, whitespace-stripped, equals the answer stripped."""
    return output.lstrip(" ").split("\n", 1)[0].strip() == answer.strip()


def exact_match(examples: Iterable[EvalExample], generate: GreedyFn, tokenizer: Tokenizer, *, batch_size: int = 8,
                max_new_tokens: int | None = None) -> ExactMatch:
    """Score examples by greedy generation: ``generate(prompts, max_new_tokens)`` → new token ids per prompt (it may
    stop early); ``max_new_tokens`` defaults to the longest answer's token count + 2."""
    examples = list(examples)
    if not examples:
        raise HybridctlError("exact_match: no examples")
    budget = max_new_tokens or max(len(e.answer) for e in examples) + 2
    records = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        outs = generate([e.prompt for e in chunk], budget)
        if len(outs) != len(chunk):
            raise HybridctlError(f"exact_match: the generator returned {len(outs)} continuations for {len(chunk)}")
        for e, ids in zip(chunk, outs):
            text = tokenizer.decode(list(ids))
            records.append({**e.meta, "output": text, "answer": e.answer_text,
                            "correct": answer_matches(text, e.answer_text)})
    correct = sum(r["correct"] for r in records)
    return ExactMatch(correct / len(records), correct, len(records), records)
