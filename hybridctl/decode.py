"""The decode runtime below the workflows: prefill into a preallocated cache, then one static-shape step per token.

``generate`` (the verb: prompts, stop strings, streaming, the result object) and ``bench`` run exactly this::

    prepare(backend)                          # compiler caches + kernel backend, before the model is loaded
    plan = plan_decode(model, batch=B, ...)   # what will run, decided once (DecodePlan)
    trace = run(model, ids, plan, params, max_new_tokens=N, seed=s, on_token=...)   # DecodeTrace

1. prefill: prompts left-padded into one batch [B,L]; padding gets its own document id (``seq_idx`` 0, the prompt 1)
   so it never enters an SSM/conv state and is masked from attention (model.py); RoPE positions start at 0 at each
   prompt's first real token. The chunked SSD scan leaves the final states in the cache.
2. decode: ``HybridLM.decode_step`` — static shapes, the cache position in a device tensor — run by ``DecodeStep``
   in one of the plan's modes: ``cuda-graph`` (replayed from a CUDA graph captured once per call, by default over
   ``torch.compile``d layer graphs), ``compiled`` (those layer graphs without a graph), ``cpu-fast-matvec`` /
   ``cpu-fast`` (the CPU fast path of cpu_decode.py: prepacked oneDNN linears, at batch 1 a compiled matrix-vector
   product for the large weights) or ``eager``. The host synchronises every ``plan.sync_every`` steps (1 on the
   CPU and when streaming) to hand the new ids to ``on_token``, which may stop the run.

Inference transforms are module swaps applied from outside (gpt-fast's way): cpu_decode's ``_PackedLinear`` and
qlinear's ``Int8/Int4WeightOnlyLinear`` replace ``nn.Linear`` modules of the model (or of a twin sharing its
tensors); nothing shadows a method. Contract of a linear replacement (what blocks.py / model.py / this module rely
on):

- a ``torch.nn.Module`` whose ``forward(x [..., in_features]) -> [..., out_features]`` in ``x``'s dtype computes
  ``x Wᵀ + b`` for any leading shape (prefill [B,T,K], the decode step's [B,K]);
- its type is not ``nn.Linear``: ``blocks._linear`` then calls it as a module (norm / activation applied before,
  residual added after) instead of reading ``.weight`` for the fused GEMV, ``HybridLM.logits`` / ``head`` call a
  swapped ``lm_head`` (a tied model's twin may set one over the embedding table) instead of reading a matrix, and
  ``cpu_fast_twin``, which repacks only exact ``nn.Linear`` modules, leaves it alone;
- a ``weight`` attribute only where it is the dense fp matrix (``_PackedLinear``); a quantized one has none, so code
  that would read the dense matrix fails loudly; its state lives in buffers/parameters (``state_dict`` round trips,
  ``copy.deepcopy`` with a memo of the model's tensors shares them);
- constructible on the meta device from the shapes alone (``build → swap → to_empty/load(assign=True)``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hybridctl import kernels
from hybridctl.cpu_decode import _one_line, cpu_fast_refusal, cpu_fast_twin, matvec_error, raise_recompile_limit
from hybridctl.sampling import SamplingParams, sample

if TYPE_CHECKING:
    from hybridctl.model import HybridLM

log = logging.getLogger("hybridctl.generate")  # its messages are generate's (and bench's, which runs the same)
Tensor = torch.Tensor
COMPILE_FAILED = "torch.compile of the decode step failed: "
MODES = ("cuda-graph", "compiled", "cpu-fast-matvec", "cpu-fast", "eager")
TokenCallback = Callable[[list[list[int]]], Any]  # new ids per row since the last call → truthy to stop


# ---- the plan: what will run, decided once ------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class DecodePlan:
    """How the decode steps run, resolved once by ``plan_decode``; ``run`` returns the plan that actually ran (a
    compile that failed downgrades ``compiled`` / ``mode`` and says why in ``fallback_reason``).

    mode: one of MODES. compiled: the layer step runs as ``torch.compile``d graphs (DecodeStep). cuda_graph: replayed
    from a captured CUDA graph. cpu_fast_path / cpu_matvec: the step runs on ``cpu_fast_twin`` (with the compiled
    batch-1 matrix-vector product). warm_prefill: the warm-up also runs the prompt's forward once. sync_every: host
    synchronisations (and ``on_token`` calls) every that many steps."""

    device: str
    dtype: str
    state_dtype: str
    backend: str
    mode: str
    batch: int
    compiled: bool
    cuda_graph: bool
    cpu_fast_path: bool
    cpu_matvec: bool
    warm_prefill: bool
    sync_every: int
    fallback_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def _mode(*, compiled: bool, cuda_graph: bool, cpu_fast_path: bool, cpu_matvec: bool) -> str:
    if cuda_graph:
        return "cuda-graph"
    if compiled:
        return "compiled"
    if cpu_fast_path:
        return "cpu-fast-matvec" if cpu_matvec else "cpu-fast"
    return "eager"


def plan_decode(model: HybridLM, *, batch: int, compile: bool | None = None, cuda_graph: bool = True,
                fast_cpu: bool = True, warm_prefill: bool | None = None, sync_every: int = 16,
                streaming: bool = False, state_dtype: torch.dtype = torch.float32) -> DecodePlan:
    """The decode plan of ``model`` (on its device, in its dtype) for ``batch`` rows.

    compile: None = on CUDA (compiled layer graphs), off on the CPU, where the fast path is faster and only its
    batch-1 matrix-vector product is compiled; False compiles nothing; True compiles the layer step anywhere (no CPU
    fast path then). cuda_graph: capture the step (CUDA only). fast_cpu: the CPU fast path where it applies (CPU
    fp32, oneDNN, small enough; else ``fallback_reason`` says why not). warm_prefill: None = on CUDA. sync_every:
    steps between host synchronisations on CUDA without streaming (1 otherwise)."""
    p = next(model.parameters())
    dev = p.device
    cuda = dev.type == "cuda"
    compiled = cuda if compile is None else bool(compile)
    graph = bool(cuda_graph) and cuda
    fast = matvec = False
    reason = None
    if fast_cpu and not compiled and dev.type == "cpu":
        reason = cpu_fast_refusal(model)
        fast = reason is None
        matvec = fast and batch == 1 and compile is None
    return DecodePlan(
        device=str(dev), dtype=_dtype_name(p.dtype), state_dtype=_dtype_name(state_dtype),
        backend=kernels.backend() if cuda else "ref", batch=batch, compiled=compiled, cuda_graph=graph,
        mode=_mode(compiled=compiled, cuda_graph=graph, cpu_fast_path=fast, cpu_matvec=matvec),
        cpu_fast_path=fast, cpu_matvec=matvec, warm_prefill=cuda if warm_prefill is None else bool(warm_prefill),
        sync_every=1 if (streaming or not cuda) else max(1, sync_every), fallback_reason=reason)


# ---- process set-up -------------------------------------------------------------------------------------------------


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


def prepare(backend: str | None = None) -> dict[str, str]:
    """Process set-up before the model is loaded: the compilers' persistent caches where CUDA is present (before the
    kernels import: mamba_ssm's autotuners read the flag), then the kernel backend resolved (``backend`` sets it),
    never first inside a compiled region (DecodeStep._compile says why). Returns the cache variables set ({} on a
    machine without CUDA)."""
    caches = persistent_caches() if torch.cuda.is_available() else {}
    kernels.set_backend(backend) if backend is not None else kernels.backend()
    return caches


_warned_ref = False


def warn_if_ref_on_cuda() -> None:
    """A CUDA model on the pure-PyTorch path (``auto`` found no mamba_ssm) prefills many times slower: say so once
    per process, with the import error, instead of only at INFO."""
    global _warned_ref
    if kernels.backend() == "ref" and kernels._requested != "ref" and not _warned_ref:
        _warned_ref = True
        log.warning("generate: the Mamba-2 kernels are unavailable (%s): CUDA prefill and decode take the "
                    "pure-PyTorch path, much slower; install with: pip install 'hybridctl[kernels]'",
                    "; ".join(kernels._load().errors) or "?")


# ---- the decode step: eager, compiled or CUDA graph -----------------------------------------------------------------


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
    it must happen before the prefill fills the cache (``run`` resets the cache afterwards). ``compile``: the
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
        self.compile_s = 0.0  # the first compiled call (compiling), inside the warm-up

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
        which ``-v`` shows. The cache is garbage afterwards: ``run`` resets it after warm-up.

        The kernel backend is resolved first, outside the traced region: resolving it imports mamba_ssm and logs,
        which Dynamo refuses to trace under ``fullgraph`` ("Attempted to call function marked as skipped" — the
        CLI's default ``--backend`` left it unresolved until the first compiled step, issue 19)."""
        kernels.backend()
        t0 = time.perf_counter()
        try:
            self._eager()
        except Exception as e:  # noqa: BLE001 - any compiler failure: decode without it, and say so
            self.compiled = False
            self.compile_error = _one_line(e)
            log.warning("generate: torch.compile of the decode step failed, running it uncompiled (%s)%s",
                        self.compile_error, "" if log.isEnabledFor(logging.INFO) else "; -v shows why in full")
            log.info("generate: the compile error in full:", exc_info=e)
        self.compile_s = time.perf_counter() - t0

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


# ---- the run: warm-up, prefill, decode loop -------------------------------------------------------------------------


@dataclass
class DecodeTrace:
    """One ``run``: the plan that ran, every id sampled and the timings (seconds, ``time.perf_counter``).

    new_ids: per row, the ids sampled (the first from the prefill); the loop goes on until ``max_new_tokens`` or
    ``on_token`` says stop, so a row may hold ids past its own end (EOS is the caller's business). warmup_s:
    before the prefill (packing the CPU twin, compiling — ``compile_s`` of it —, capturing the CUDA graph, the warm
    prefill). prefill_s: the prompt forward + the first sample, on the host. decode_s: the remaining steps (with
    the ``on_token`` calls). step_s: one entry per decode step; steps between two host synchronisations (see
    ``plan.sync_every``) share their block's time evenly — pass a plan with sync_every 1 for true per-step times."""

    plan: DecodePlan
    new_ids: list[list[int]]
    prompt_tokens: list[int]
    prefill_s: float
    decode_s: float
    warmup_s: float
    compile_s: float
    step_s: list[float] = field(default_factory=list)
    t_first: float = 0.0  # perf_counter when the first token reached the host

    @property
    def decode_steps(self) -> int:
        return len(self.step_s)

    def step_percentiles(self, qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
        """Per-step decode time percentiles in seconds, e.g. {"p50": ..., "p90": ..., "p99": ...} ({} with no step)."""
        if not self.step_s:
            return {}
        t = torch.tensor(self.step_s, dtype=torch.float64)
        return {f"p{q:g}": float(torch.quantile(t, q / 100)) for q in qs}

    def as_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.as_dict(), "prompt_tokens": self.prompt_tokens, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "warmup_s": self.warmup_s, "compile_s": self.compile_s,
                "decode_steps": self.decode_steps, **self.step_percentiles()}


def pad_batch(ids: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
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


def _warm_up(model, plan: DecodePlan, cache, batch: tuple) -> tuple[DecodeStep, DecodePlan, float]:
    """Pack the CPU twin, compile, capture, (warm prefill), reset the cache: (step, the plan that will run,
    compile seconds)."""
    dev = plan.torch_device
    t0 = time.perf_counter()
    step_model = cpu_fast_twin(model, matvec=plan.cpu_matvec) if plan.cpu_fast_path else model
    compile_s = time.perf_counter() - t0 if plan.cpu_matvec else 0.0  # the matvec compile dominates packing
    step = DecodeStep(step_model, cache, plan.batch, dev, plan.cuda_graph, compile=plan.compiled)
    step.capture()  # runs the step: before the prefill, then the cache is cleared
    if plan.warm_prefill:  # the prompt's shapes once: first-use costs out of the timed prefill (generate says why)
        input_ids, seq_idx, positions = batch
        model.logits(model(input_ids, seq_idx=seq_idx, cache=cache, positions=positions, return_hidden=True)[:, -1])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    cache.reset()
    ran, reason = plan, plan.fallback_reason
    # a twin compiled for batch 1 keeps its matvec (used by every later batch-1 call); several rows never use it
    matvec = bool(getattr(step_model, "compiled_matvec", False)) and plan.batch == 1
    if plan.cpu_matvec and not matvec:
        reason = matvec_error() or "no weight is large enough for the compiled matrix-vector product"
    if step.compile_error:
        reason = COMPILE_FAILED + step.compile_error
    if reason != plan.fallback_reason or matvec != plan.cpu_matvec or step.compiled != plan.compiled:
        ran = dataclasses.replace(plan, compiled=step.compiled, cpu_matvec=matvec, fallback_reason=reason,
                                  mode=_mode(compiled=step.compiled, cuda_graph=step.graph is not None,
                                             cpu_fast_path=plan.cpu_fast_path, cpu_matvec=matvec))
    return step, ran, compile_s + step.compile_s


def _seen_mask(input_ids: Tensor, pad: Tensor, vocab: int) -> Tensor:
    """[B,V] bool: the tokens in each prompt (not its padding), for the repetition penalty."""
    L = input_ids.shape[1]
    seen = torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool, device=input_ids.device)
    valid = torch.arange(L, device=input_ids.device)[None] >= pad[:, None]
    real = torch.where(valid, input_ids, input_ids[:, -1:])  # padding → the row's last (real) token
    seen.scatter_(1, real.clamp(max=vocab - 1), True)
    return seen


def run(model: HybridLM, ids: list[list[int]], plan: DecodePlan, params: SamplingParams = SamplingParams(),
        *, max_new_tokens: int, seed: int = 0, vocab: int | None = None,
        on_token: TokenCallback | None = None) -> DecodeTrace:
    """Prefill the prompts ``ids`` (one id list per row, ``len(ids) == plan.batch``; left-padded) and decode up to
    ``max_new_tokens`` ids per row (the first from the prefill) the way ``plan`` says, sampling with ``params``
    from a generator seeded with ``seed`` over the first ``vocab`` logits (default all: Megatron pads the model's
    vocabulary beyond the tokenizer's; those ids are never emitted). ``on_token(new)`` gets the new ids of every
    row after the prefill and after each host synchronisation; a truthy return stops decoding. Returns a
    DecodeTrace. Runs under ``torch.inference_mode``."""
    if len(ids) != plan.batch:
        raise ValueError(f"decode.run: the plan is for {plan.batch} rows, got {len(ids)} prompts")
    with torch.inference_mode():
        return _run(model, ids, plan, params, max_new_tokens=max_new_tokens, seed=seed,
                    vocab=model.cfg.vocab_size if vocab is None else vocab, on_token=on_token)


def _run(model, ids: list[list[int]], plan: DecodePlan, params: SamplingParams, *, max_new_tokens: int,
         seed: int, vocab: int, on_token: TokenCallback | None) -> DecodeTrace:
    dev, bsz = plan.torch_device, plan.batch
    input_ids, seq_idx, positions, pad = pad_batch(ids, dev)
    L = input_ids.shape[1]
    cache = model.allocate_cache(bsz, L + max_new_tokens, device=dev, state_dtype=getattr(torch, plan.state_dtype))
    t0 = time.perf_counter()  # warm-up: packing weights (CPU), compiling, capturing the graph (GPU)
    step, ran, compile_s = _warm_up(model, plan, cache, (input_ids, seq_idx, positions))
    warmup_s = time.perf_counter() - t0
    gen = torch.Generator(device=dev).manual_seed(seed)
    seen = _seen_mask(input_ids, pad, vocab) if params.repetition_penalty != 1.0 else None

    def pick(logits: Tensor) -> Tensor:
        nxt = sample(logits[:, :vocab], params, seen=seen, generator=gen)
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        return nxt

    t1 = time.perf_counter()
    h = model(input_ids, seq_idx=seq_idx, cache=cache, positions=positions, return_hidden=True)
    nxt = pick(model.logits(h[:, -1]))
    generated = torch.empty(bsz, max_new_tokens, dtype=torch.long, device=dev)
    generated[:, 0] = nxt
    first = nxt.tolist()
    t2 = time.perf_counter()
    stop = bool(on_token([[t] for t in first])) if on_token is not None else False
    step.set_position(L, positions[:, -1] + 1)
    step_s: list[float] = []
    done = 1
    while done < max_new_tokens and not stop:
        n = min(plan.sync_every, max_new_tokens - done)
        tb = time.perf_counter()
        for j in range(done, done + n):
            step.tokens.copy_(nxt)
            nxt = pick(step.run())
            generated[:, j] = nxt
        cache.offset += n
        block = generated[:, done:done + n].tolist()
        step_s += [(time.perf_counter() - tb) / n] * n
        stop = bool(on_token(block)) if on_token is not None else False
        done += n
    t3 = time.perf_counter()
    return DecodeTrace(plan=ran, new_ids=generated[:, :done].tolist(), prompt_tokens=[len(x) for x in ids],
                       prefill_s=t2 - t1, decode_s=t3 - t2, warmup_s=warmup_s, compile_s=compile_s, step_s=step_s,
                       t_first=t2)
