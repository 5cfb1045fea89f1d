"""Text generation, the verb: prompts → ids, per-row EOS / stop strings / streamed text, the result object.

The decode itself (prefill into a preallocated cache, one static-shape recurrent step per token, the mode: CUDA
graph, compiled, CPU fast path or eager) is decode.py's runtime, which ``bench`` times too: ``generate`` resolves a
``DecodePlan`` once (``plan_decode``), calls ``decode.run`` with an ``on_token`` callback that feeds the rows, and
reports the plan that ran (``extra["decode_plan"]``, in ``--json``). The host synchronises only to stream text, or
every ``sync_every`` steps to notice EOS / stop strings when nothing is streamed.

Token accounting: ``tokens`` holds each row's generated ids up to (excluding) EOS, or up to and including the token
that completed a stop string; ``text`` is the decoded continuation with the stop string cut off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hybridctl import decode, kernels
from hybridctl.config import HybridctlError
from hybridctl.parallel import resolve_device
from hybridctl.sampling import SamplingParams

if TYPE_CHECKING:
    from hybridctl.checkpoint import Source
    from hybridctl.model import HybridLM
    from hybridctl.tokenizer import Tokenizer

log = logging.getLogger(__name__)
Tensor = torch.Tensor
TextCallback = Callable[[int, str], None]  # (prompt index, new text)


@dataclass
class GenerateResult:
    """One generation call. Per-prompt lists are in prompt order; rates count every row of the batch."""

    texts: list[str]
    tokens: list[list[int]]
    prompt_tokens: list[int]
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    batch_size: int
    prefill_s: float  # prompt forward + first sample
    decode_s: float  # the remaining steps (warm-up excluded)
    decode_steps: int
    warmup_s: float  # compiling the decode step + CUDA-graph capture (+ a first prefill on CUDA; ≈0 when eager)
    device: str
    backend: str
    dtype: str
    state_dtype: str
    cuda_graph: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def time_to_first_token_s(self) -> float:
        """The prompt forward plus the first sample: ``prefill_s`` (kept as its own name in the JSON summary)."""
        return self.prefill_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch_size * max(self.prompt_tokens, default=0) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.decode_steps / self.decode_s if self.decode_s else 0.0

    def summary(self) -> dict[str, Any]:
        """Batch-level facts (timings, device) without the per-prompt lists."""
        d = {k: v for k, v in asdict(self).items() if k not in ("texts", "tokens", "prompt_tokens",
                                                                  "finish_reasons", "extra")}
        d.update(self.extra, time_to_first_token_s=self.time_to_first_token_s,
                 prefill_tokens_per_s=self.prefill_tokens_per_s,
                 decode_tokens_per_s=self.decode_tokens_per_s)
        return d

    def per_prompt(self, i: int) -> dict[str, Any]:
        """Everything about prompt ``i``: its text/tokens plus the batch-level summary."""
        return {"text": self.texts[i], "tokens": self.tokens[i], "prompt_tokens": self.prompt_tokens[i],
                "finish_reason": self.finish_reasons[i], **self.summary()}


# ---- inputs -----------------------------------------------------------------------------------------------------


def _resolve_model(model_or_path: HybridLM | str | Path | Source, tokenizer: Tokenizer | str | None,
                   device: str | None, dtype: str | None, need_tokenizer: bool
                   ) -> tuple[HybridLM, Tokenizer | None, torch.device]:
    """(model, tokenizer or None, device). A path is loaded with its own tokenizer unless one is given; a
    checkpoint without one is fine for token-id prompts (``need_tokenizer`` False)."""
    from hybridctl.checkpoint import Source, load_model, load_tokenizer_for
    from hybridctl.checkpoint.native import torch_dtype

    if isinstance(model_or_path, torch.nn.Module):
        dev = next(model_or_path.parameters()).device
        if device is not None and resolve_device(device) != dev:
            dev = resolve_device(device)
            model_or_path = model_or_path.to(dev)
        if dtype is not None:
            model_or_path = model_or_path.to(torch_dtype(dtype))
        if isinstance(tokenizer, str):
            from hybridctl.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(tokenizer)
        return model_or_path.eval(), tokenizer, dev
    if not isinstance(model_or_path, (str, Path, Source)):
        raise HybridctlError(f"generate: expected a model or a checkpoint path, got {type(model_or_path).__name__}")
    dev = resolve_device(device)
    model, src = load_model(model_or_path, device=dev, dtype=torch_dtype(dtype) if dtype else None)
    if tokenizer is not None and not isinstance(tokenizer, str):
        tok = tokenizer
    elif tokenizer is None and src.tokenizer_dir is None and not need_tokenizer:
        tok = None
    else:
        tok = load_tokenizer_for(src, tokenizer)
    return model, tok, dev


def encode_prompts(prompts: str | Sequence[str] | Sequence[Sequence[int]], tokenizer: Tokenizer | None,
                   add_bos: bool | None
                   ) -> list[list[int]]:
    """Prompts (text, or token-id lists) → id lists; text needs a tokenizer. Empty prompts are refused."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise HybridctlError("generate: no prompt given")
    ids: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise HybridctlError("generate: text prompts need a tokenizer (pass tokenizer= or token ids)")
            ids.append(tokenizer.encode(p, add_bos=add_bos))
        else:
            ids.append([int(t) for t in p])
        if not ids[-1]:
            raise HybridctlError(f"prompt {i} is empty after tokenisation (and the tokenizer adds no BOS)")
    return ids


# ---- per-row bookkeeping on the host ----------------------------------------------------------------------------


class _Row:
    """Generated ids, incremental text, stop-string detection and streaming hold-back for one prompt."""

    def __init__(self, tokenizer: Tokenizer | None, eos_id: int | None, stop: Sequence[str]) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of text already streamed
        self._checked = 0  # characters of text already searched for stop strings
        self.finish: str | None = None
        self.eos_id, self.stop = eos_id, [s for s in stop if s]
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None

    def push(self, token_id: int) -> None:
        if self.finish is not None:
            return
        if self.eos_id is not None and token_id == self.eos_id:
            self.finish = "eos"
            self._flush()
            return
        self.tokens.append(token_id)
        if self.decoder is not None:
            self._checked = len(self.text)
            self.text += self.decoder.push(token_id)
            self._check_stop()

    def _flush(self) -> None:
        if self.decoder is not None:
            self._checked = len(self.text)
            self.text += self.decoder.flush()
            self._check_stop()

    def _check_stop(self) -> None:
        if not self.stop:
            return
        # only a match that ends in the new text is new: start len(stop) - 1 characters before it
        start = max(0, self._checked - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish = "stop"

    def finish_length(self) -> None:
        if self.finish is None:
            self.finish = "length"
            self._flush()

    def take_stream(self) -> str:
        """New text that can be shown: holds back a tail that might still become a stop string."""
        end = len(self.text)
        if self.finish is None and self.stop:
            for s in self.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        end = max(end, self.emitted)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


# ---- the entry function -----------------------------------------------------------------------------------------


def generate(model_or_path: HybridLM | str | Path | Source, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             tokenizer: Tokenizer | str | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
             use_eos: bool = True, add_bos: bool | None = None, device: str | None = None, dtype: str | None = None,
             backend: str | None = None, state_dtype: str = "float32", cuda_graph: bool = True,
             compile: bool | None = None, fast_cpu: bool = True, on_text: TextCallback | None = None,
             sync_every: int = 16, warm_prefill: bool | None = None) -> GenerateResult:
    """Generate continuations for one prompt or a batch.

    model_or_path: a HybridLM (with ``tokenizer`` a Tokenizer, 'byte', a path, or None for id prompts) or any
    checkpoint ``load_model`` reads. A HybridLM given with ``device`` / ``dtype`` that differ from its own is moved /
    cast IN PLACE (``nn.Module.to``: the caller's model changes; a copy would double the memory) and left in eval
    mode (its tokenizer unless ``tokenizer`` overrides). prompts: text(s) or id lists
    (one batch; different lengths are left-padded). ``on_text(i, piece)`` streams decoded text of prompt i as it is
    produced (stop strings are held back until they can no longer match). Never emits an id >= the tokenizer's
    vocabulary (Megatron pads the model's vocab). ``cuda_graph``: replay the decode step from a CUDA graph (GPU);
    ``compile``: run the decode step as ``torch.compile``d layer graphs (DecodeStep; None = on CUDA, off on the
    CPU, where the fast path below is faster; compile time is reported in ``warmup_s``). ``fast_cpu``: decode with
    oneDNN linears and, at batch 1 with ``compile`` None, a compiled matrix-vector product for the large weights
    (CPU fp32, see cpu_fast_twin; its compile, seconds once per process, is in ``warmup_s``; ``compile=False``
    compiles nothing). ``warm_prefill`` (None = on CUDA): the warm-up also runs the prompt's forward once, so the
    one-off costs of a process's first prefill (loading the Triton binaries and autotuning choices from the disk
    caches, cuDNN/cuBLAS set-up at the prompt's shapes: ~0.35 s on an H200, 6× a 6.5K-token prefill) are reported in
    ``warmup_s`` and ``time_to_first_token_s`` is the prefill itself; ``first_token_wall_s`` in ``extra`` is what the
    caller waited in all (loading, warm-up, prefill). Returns a GenerateResult.
    """
    from hybridctl.checkpoint.native import torch_dtype

    if max_new_tokens < 1:
        raise HybridctlError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    t_start = time.perf_counter()
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    caches = decode.prepare(backend)  # before the model: compiler caches, then the kernel backend
    sdtype = torch_dtype(state_dtype)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    model, tok, dev = _resolve_model(model_or_path, tokenizer, device, dtype,
                                     need_tokenizer=any(isinstance(p, str) for p in texts) or on_text is not None)
    load_s = time.perf_counter() - t_start
    if dev.type == "cuda":
        decode.warn_if_ref_on_cuda()
    ids = encode_prompts(texts, tok, add_bos)
    vocab = _check_ids(ids, model, tok, stop)
    eos_id = tok.eos_id if (use_eos and tok is not None) else None
    rows = [_Row(tok, eos_id, stop) for _ in ids]
    plan = decode.plan_decode(model, batch=len(ids), compile=compile, cuda_graph=cuda_graph, fast_cpu=fast_cpu,
                              warm_prefill=warm_prefill, sync_every=sync_every, streaming=on_text is not None,
                              state_dtype=sdtype)

    def on_token(new_ids: list[list[int]]) -> bool:
        _deliver(rows, new_ids, on_text)
        return all(r.finish for r in rows)

    trace = decode.run(model, ids, plan, params, max_new_tokens=max_new_tokens, seed=seed, vocab=vocab,
                       on_token=on_token)
    for r in rows:
        r.finish_length()
    _deliver(rows, [[] for _ in rows], on_text)
    return _result(rows, trace, plan, dev, caches, load_s=load_s, t_start=t_start)


def _result(rows: list[_Row], trace: decode.DecodeTrace, plan: decode.DecodePlan, dev: torch.device,
            caches: dict[str, str], *, load_s: float, t_start: float) -> GenerateResult:
    """The GenerateResult of a run: the rows' text and tokens, the trace's timings, the plan that ran."""
    ran = trace.plan
    extra = {"cpu_fast_path": ran.cpu_fast_path, "compiled": ran.compiled, "warm_prefill": ran.warm_prefill,
             "cpu_compiled_matvec": ran.cpu_matvec, "compile_s": trace.compile_s, "decode_plan": ran.as_dict(),
             # what a caller waits for its first token: loading, warm-up (compile, graph capture), prefill
             "load_s": load_s, "first_token_wall_s": trace.t_first - t_start}
    if plan.compiled and not ran.compiled:
        extra["compile_error"] = ran.fallback_reason.removeprefix(decode.COMPILE_FAILED)
    if dev.type == "cuda":
        extra.update(kernels=kernels.describe(), **({"caches": caches} if caches else {}))
    return GenerateResult(
        texts=[r.text for r in rows], tokens=[r.tokens for r in rows], prompt_tokens=trace.prompt_tokens,
        finish_reasons=[r.finish or "length" for r in rows], batch_size=len(rows), prefill_s=trace.prefill_s,
        decode_s=trace.decode_s, decode_steps=trace.decode_steps, warmup_s=trace.warmup_s, device=str(dev),
        backend=ran.backend, dtype=ran.dtype, state_dtype=ran.state_dtype, cuda_graph=ran.cuda_graph, extra=extra)


def _check_ids(ids: list[list[int]], model: HybridLM, tok: Tokenizer | None, stop: Sequence[str]) -> int:
    """Refuse ids outside the model's vocabulary and stop strings without a tokenizer; returns the vocabulary the
    sampler may pick from (the tokenizer's where smaller: Megatron pads the model's)."""
    if tok is None and any(stop):
        raise HybridctlError("stop strings need a tokenizer (pass tokenizer=)")
    bad = [(i, t) for i, row in enumerate(ids) for t in row if not 0 <= t < model.cfg.vocab_size]
    if bad:
        i, t = bad[0]
        size = f"; the tokenizer has {tok.vocab_size} ids" if tok is not None else ""
        raise HybridctlError(f"prompt {i}: token id {t} is outside the model's vocabulary "
                             f"(0..{model.cfg.vocab_size - 1}){size}")
    return model.cfg.vocab_size if tok is None else min(model.cfg.vocab_size, tok.vocab_size)


def _deliver(rows: list[_Row], new_ids: list[list[int]], on_text: TextCallback | None) -> None:
    """Hand freshly synced ids to the rows (ids after a row finished are ignored) and stream their text."""
    for i, (row, block) in enumerate(zip(rows, new_ids)):
        for t in block:
            row.push(t)
        if on_text is not None:
            piece = row.take_stream()
            if piece:
                on_text(i, piece)
