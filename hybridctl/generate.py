"""Text generation: chunked-scan prefill into a preallocated cache, then one recurrent step per token.

The hybrid's payoff is the decode step: constant-size SSM + conv state per Mamba layer and a KV cache in only a few
attention layers. ``generate`` runs

1. prefill: prompts left-padded into one batch [B,L]; padding gets its own document id (``seq_idx`` 0, the prompt 1)
   so it never enters an SSM/conv state and is masked from attention (model.py); RoPE positions start at 0 at each
   prompt's first real token. The chunked SSD scan leaves the final states in the cache.
2. decode: ``HybridLM.decode_step`` — static shapes, the cache position in a device tensor — run eagerly (CPU, under
   ``torch.inference_mode``) or replayed from a CUDA graph captured once per call (GPU), by default over
   ``torch.compile``d layer graphs that fuse each layer's elementwise work (``DecodeStep``). The host synchronises
   only to stream text, or every ``sync_every`` steps to notice EOS / stop strings when nothing is streamed. On CPU
   the step runs on ``cpu_fast_twin(model)``: oneDNN linears (blocked weights for several rows), an Inductor-compiled
   matrix-vector product for the large weights at batch 1, and an in-place SSM update.

Token accounting: ``tokens`` holds each row's generated ids up to (excluding) EOS, or up to and including the token
that completed a stop string; ``text`` is the decoded continuation with the stop string cut off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridctl import kernels
from hybridctl.cpu_decode import _one_line, cpu_fast_twin, raise_recompile_limit
from hybridctl.parallel import resolve_device
from hybridctl.config import HybridctlError
from hybridctl.sampling import SamplingParams, sample

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


def _resolve_model(model_or_path: Any, tokenizer: Any, device: str | None, dtype: str | None, need_tokenizer: bool):
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


def encode_prompts(prompts: str | Sequence[str] | Sequence[Sequence[int]], tokenizer: Any, add_bos: bool | None
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


def _pad_batch(ids: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Left-pad → input_ids [B,L], seq_idx [B,L] (0 padding / 1 prompt; None when all lengths match), RoPE
    positions [B,L] (0 at each prompt's first token) and pad lengths [B]."""
    lengths = torch.tensor([len(p) for p in ids], device=device)
    L = int(lengths.max())
    pad = L - lengths
    input_ids = torch.zeros(len(ids), L, dtype=torch.long, device=device)
    for r, p in enumerate(ids):
        input_ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
    ar = torch.arange(L, device=device)[None]
    positions = (ar - pad[:, None]).clamp(min=0)
    seq_idx = None if bool((pad == 0).all()) else (ar >= pad[:, None]).to(torch.int32)
    return input_ids, seq_idx, positions, pad


# ---- the decode step: eager or CUDA graph -----------------------------------------------------------------------


_compiled_fns: tuple[Callable[..., Tensor], Callable[..., Tensor]] | None = None


def compiled_step_fns() -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """``torch.compile``d ``Block.step`` and ``HybridLM.head`` (one pair per process). Dynamo keys its graphs on the
    layer kind and the shapes, so the 17 Mamba layers of a model share one compiled graph (compile time grows with
    the number of layer kinds, not layers); a new batch size or cache length recompiles once, then runs dynamic."""
    global _compiled_fns
    if _compiled_fns is None:
        from hybridctl.blocks import Block
        from hybridctl.model import HybridLM

        raise_recompile_limit(64)  # Block.step: one graph per layer kind × dtype × device, then dynamic shapes
        _compiled_fns = (torch.compile(Block.step, fullgraph=True), torch.compile(HybridLM.head, fullgraph=True))
    return _compiled_fns


class DecodeStep:
    """Static-buffer decode step around ``model.decode_step``: write the next ids into ``tokens``, call ``run()``,
    read logits [B,V]. ``slot``/``positions`` advance by one per call (on device, inside the graph when captured).

    On CUDA (``use_graph``) the step is warmed up on a side stream and captured once; capture runs the step, so
    it must happen before the prefill fills the cache (``generate`` resets the cache afterwards). ``compile``: the
    layers and the head run as ``torch.compile``d graphs over the pure-PyTorch ops (``kernels.inline_ops``), so
    Inductor fuses each layer's elementwise work (norms, conv, dt, the whole SSM update, gating) into a few kernels
    around the matrix products: ~9 launches per layer instead of ~24. Compilation happens in the warm-up; a
    failure there falls back to the uncompiled step with a warning (``compile_error``)."""

    def __init__(self, model, cache, batch_size: int, device: torch.device, use_graph: bool,
                 compile: bool = False) -> None:
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.graph = None
        self.logits: Tensor | None = None
        self.use_graph = use_graph and device.type == "cuda"
        self.compiled = compile
        self.compile_error: str | None = None

    def _eager(self) -> Tensor:
        if self.compiled:
            layer_step, head = compiled_step_fns()
            with kernels.inline_ops():
                logits = self.model.decode_step(self.tokens, self.cache, self.slot, self.positions,
                                                layer_step=layer_step, head=head)
        else:
            logits = self.model.decode_step(self.tokens, self.cache, self.slot, self.positions)
        self.slot.add_(1)
        self.positions.add_(1)
        return logits

    def _compile(self) -> None:
        """The first compiled call, which compiles; on failure (no C++ compiler, an Inductor bug) the step runs
        uncompiled: one warning line, the whole exception (Dynamo's explanation and hints, the traceback) at INFO,
        which ``-v`` shows. The cache is garbage afterwards: ``generate`` resets it after warm-up.

        The kernel backend is resolved first, outside the traced region: resolving it imports mamba_ssm and logs,
        which Dynamo refuses to trace under ``fullgraph`` ("Attempted to call function marked as skipped" — the
        CLI's default ``--backend`` left it unresolved until the first compiled step, issue 19)."""
        kernels.backend()
        try:
            self._eager()
        except Exception as e:  # noqa: BLE001 - any compiler failure: decode without it, and say so
            self.compiled = False
            self.compile_error = _one_line(e)
            log.warning("generate: torch.compile of the decode step failed, running it uncompiled (%s)%s",
                        self.compile_error, "" if log.isEnabledFor(logging.INFO) else "; -v shows why in full")
            log.info("generate: the compile error in full:", exc_info=e)

    def capture(self, warmup: int = 2) -> None:
        if self.compiled:
            self._compile()
        if not self.use_graph:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton JIT, allocator, cuBLAS workspaces
            for _ in range(warmup):
                self._eager()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._eager()
        torch.cuda.synchronize()

    def set_position(self, slot: int, positions: Tensor) -> None:
        self.slot.fill_(slot)
        self.positions.copy_(positions)

    def run(self) -> Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._eager()


# ---- per-row bookkeeping on the host ----------------------------------------------------------------------------


class _Row:
    """Generated ids, incremental text, stop-string detection and streaming hold-back for one prompt."""

    def __init__(self, tokenizer: Any, eos_id: int | None, stop: Sequence[str]) -> None:
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


def generate(model_or_path: Any, prompts: str | Sequence[str] | Sequence[Sequence[int]], *, tokenizer: Any = None,
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
    caches = persistent_caches() if torch.cuda.is_available() else {}  # before the kernels import (autotuners)
    # resolved here, never first inside a compiled region (DecodeStep._compile says why)
    kernels.set_backend(backend) if backend is not None else kernels.backend()
    sdtype = torch_dtype(state_dtype)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    model, tok, dev = _resolve_model(model_or_path, tokenizer, device, dtype,
                                     need_tokenizer=any(isinstance(p, str) for p in texts) or on_text is not None)
    load_s = time.perf_counter() - t_start
    if dev.type == "cuda":
        _warn_if_ref_on_cuda()
    prompts = texts
    ids = encode_prompts(prompts, tok, add_bos)
    if tok is None and any(stop):
        raise HybridctlError("stop strings need a tokenizer (pass tokenizer=)")
    bad = [(i, t) for i, row in enumerate(ids) for t in row if not 0 <= t < model.cfg.vocab_size]
    if bad:
        i, t = bad[0]
        size = f"; the tokenizer has {tok.vocab_size} ids" if tok is not None else ""
        raise HybridctlError(f"prompt {i}: token id {t} is outside the model's vocabulary "
                             f"(0..{model.cfg.vocab_size - 1})"
                             f"{size}")
    vocab = model.cfg.vocab_size if tok is None else min(model.cfg.vocab_size, tok.vocab_size)
    eos_id = tok.eos_id if (use_eos and tok is not None) else None
    rows = [_Row(tok, eos_id, stop) for _ in ids]
    with torch.inference_mode():
        out = _run(model, ids, rows, params, vocab=vocab, max_new_tokens=max_new_tokens, seed=seed, device=dev,
                   state_dtype=sdtype, cuda_graph=cuda_graph,
                   compile=dev.type == "cuda" if compile is None else compile, cpu_matvec=compile is None,
                   fast_cpu=fast_cpu, on_text=on_text, sync_every=sync_every,
                   warm_prefill=dev.type == "cuda" if warm_prefill is None else warm_prefill)
    p = next(model.parameters())
    # what a caller waits for its first token: loading, warm-up (compile, graph capture), prefill
    out["extra"].update(load_s=load_s, first_token_wall_s=out.pop("t_first") - t_start)
    if dev.type == "cuda":
        out["extra"].update(kernels=kernels.describe(), **({"caches": caches} if caches else {}))
    return GenerateResult(
        texts=[r.text for r in rows], tokens=[r.tokens for r in rows], prompt_tokens=[len(x) for x in ids],
        finish_reasons=[r.finish or "length" for r in rows], batch_size=len(ids), device=str(dev),
        backend=kernels.backend() if dev.type == "cuda" else "ref", dtype=str(p.dtype).removeprefix("torch."),
        state_dtype=str(sdtype).removeprefix("torch."), **out)


CACHE_DEFAULTS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def persistent_caches() -> dict[str, str]:
    """Default the compilers' on-disk caches, where the user set none, to folders under ``$HYBRIDCTL_CACHE_DIR``
    (default ``$XDG_CACHE_HOME/hybridctl``, else ``~/.cache/hybridctl``) and turn on Triton's autotuning cache
    (``TRITON_CACHE_AUTOTUNING=1``): the decode step's Inductor graphs and Triton binaries, and the autotuning
    choices of mamba_ssm's SSD kernels, which are otherwise benchmarked afresh in every process, inside the first
    prefill (issue 19). Inductor's default lives under /tmp. Must run before mamba_ssm is imported (its autotuners
    read the flag when they are built). Returns the variables in effect (what the summary reports)."""
    root = os.environ.get("HYBRIDCTL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hybridctl")
    for var, sub in CACHE_DEFAULTS.items():
        os.environ.setdefault(var, os.path.join(root, sub))
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    return {k: os.environ[k] for k in (*CACHE_DEFAULTS, "TRITON_CACHE_AUTOTUNING")}


_warned_ref = False


def _warn_if_ref_on_cuda() -> None:
    """A CUDA model on the pure-PyTorch path (``auto`` found no mamba_ssm) prefills many times slower: say so once
    per process, with the import error, instead of only at INFO."""
    global _warned_ref
    if kernels.backend() == "ref" and kernels._requested != "ref" and not _warned_ref:
        _warned_ref = True
        log.warning("generate: the Mamba-2 kernels are unavailable (%s): CUDA prefill and decode take the "
                    "pure-PyTorch path, much slower; install with: pip install 'hybridctl[kernels]'",
                    "; ".join(kernels._load().errors) or "?")


def _run(model, ids: list[list[int]], rows: list[_Row], params: SamplingParams, *, vocab: int, max_new_tokens: int,
         seed: int, device: torch.device, state_dtype: torch.dtype, cuda_graph: bool, compile: bool,
         cpu_matvec: bool, fast_cpu: bool, on_text: TextCallback | None, sync_every: int,
         warm_prefill: bool = False) -> dict[str, Any]:
    """Prefill + decode loop; fills ``rows``; returns the timing fields of GenerateResult."""
    bsz = len(ids)
    input_ids, seq_idx, positions, pad = _pad_batch(ids, device)
    L = input_ids.shape[1]
    cache = model.allocate_cache(bsz, L + max_new_tokens, device=device, state_dtype=state_dtype)
    t0 = time.perf_counter()  # warm-up: packing weights (CPU), compiling, capturing the graph (GPU)
    step_model = cpu_fast_twin(model, matvec=bsz == 1 and cpu_matvec) \
        if (fast_cpu and not compile and device.type == "cpu") else model
    step = DecodeStep(step_model, cache, bsz, device, cuda_graph, compile=compile)
    step.capture()  # runs the step: before the prefill, then the cache is cleared
    if warm_prefill:  # the prompt's shapes once: first-use costs out of the timed prefill (see generate)
        model.logits(model(input_ids, seq_idx=seq_idx, cache=cache, positions=positions, return_hidden=True)[:, -1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    cache.reset()
    warmup_s = time.perf_counter() - t0
    gen = torch.Generator(device=device).manual_seed(seed)
    seen = None
    if params.repetition_penalty != 1.0:  # [B,V] bool: tokens in the prompt (not the padding) or generated so far
        seen = torch.zeros(bsz, vocab, dtype=torch.bool, device=device)
        valid = torch.arange(L, device=device)[None] >= pad[:, None]
        real = torch.where(valid, input_ids, input_ids[:, -1:])  # padding → the row's last (real) token
        seen.scatter_(1, real.clamp(max=vocab - 1), True)

    def pick(logits: Tensor) -> Tensor:
        # vocab: Megatron pads embedding/head rows beyond the tokenizer; those ids are never emitted.
        nxt = sample(logits[:, :vocab], params, seen=seen, generator=gen)
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        return nxt

    t1 = time.perf_counter()
    h = model(input_ids, seq_idx=seq_idx, cache=cache, positions=positions, return_hidden=True)
    nxt = pick(model.logits(h[:, -1]))
    generated = torch.empty(bsz, max_new_tokens, dtype=torch.long, device=device)
    generated[:, 0] = nxt
    first = nxt.tolist()
    t2 = time.perf_counter()
    _deliver(rows, [[t] for t in first], on_text)
    step.set_position(L, positions[:, -1] + 1)
    sync = 1 if (on_text is not None or device.type != "cuda") else max(1, sync_every)
    done, steps = 1, 0
    while done < max_new_tokens and not all(r.finish for r in rows):
        n = min(sync, max_new_tokens - done)
        for j in range(done, done + n):
            step.tokens.copy_(nxt)
            nxt = pick(step.run())
            generated[:, j] = nxt
        cache.offset += n
        steps += n
        _deliver(rows, generated[:, done:done + n].tolist(), on_text)
        done += n
    t3 = time.perf_counter()
    for r in rows:
        r.finish_length()
    _deliver(rows, [[] for _ in rows], on_text)
    return dict(prefill_s=t2 - t1, decode_s=t3 - t2, decode_steps=steps, t_first=t2,
                warmup_s=warmup_s, cuda_graph=step.graph is not None,
                extra={"cpu_fast_path": step_model is not model, "compiled": step.compiled,
                       "warm_prefill": warm_prefill,
                       "cpu_compiled_matvec": bool(getattr(step_model, "compiled_matvec", False)),
                       **({"compile_error": step.compile_error} if step.compile_error else {})})


def _deliver(rows: list[_Row], new_ids: list[list[int]], on_text: TextCallback | None) -> None:
    """Hand freshly synced ids to the rows (ids after a row finished are ignored) and stream their text."""
    for i, (row, block) in enumerate(zip(rows, new_ids)):
        for t in block:
            row.push(t)
        if on_text is not None:
            piece = row.take_stream()
            if piece:
                on_text(i, piece)
