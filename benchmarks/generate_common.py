"""Shared pieces of benchmarks/generate_cpu.py and generate_gpu.py (imported from the script's own directory): thin
wrappers over the package, so the "× transformers" figures rest on the tested exporter and the model's own accounting.

- ``to_nemotron_h(model)``: transformers' NemotronHForCausalLM loaded from hybridctl's HF export of the model
  (``hybridctl.checkpoint.hf.write_hf``, the exporter tests/test_hf.py checks against transformers), so both peers
  decode the same weights.
- ``hf_decode_rate``: transformers' decode tokens/s as (B·(N−1)) / (t(N new tokens) − t(1 new token)), which
  cancels the prefill.
- ``bytes_per_step``: ``hybridctl.model.decode_bytes_per_step`` — the roofline's numerator.
- ``matvec_bandwidth(s)`` / ``copy_bandwidth``: the achievable memory bandwidth (benchmarks/probes.py).
Raw results of new runs go to benchmarks/results/ (``RESULTS``); older JSON files stay where they were written.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import torch
from probes import copy_bandwidth, matvec_bandwidth, matvec_bandwidths, sync  # noqa: F401 - the scripts' probes

from hybridctl.model import decode_bytes_per_step

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def to_nemotron_h(model, *, device=None, dtype=None, workdir: str | None = None):
    """transformers' NemotronHForCausalLM with the weights of ``model`` (a HybridLM), through hybridctl's HF export:
    an in-memory Source of the model's state dict → ``write_hf(arch="nemotron_h")`` into a temporary directory (in
    ``workdir``, default the system's) → ``from_pretrained``. NoPE: positions are not limited (max_position 2^20)."""
    import tempfile
    from pathlib import Path

    from transformers import NemotronHForCausalLM

    from hybridctl.checkpoint import Source
    from hybridctl.checkpoint.hf import write_hf

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    src = Source(format="native", path=Path("<in-memory model>"), config=model.cfg,
                 specs={k: (tuple(v.shape), v.dtype) for k, v in sd.items()},
                 get=lambda n: sd[n].to("cpu", copy=True))  # a fresh tensor per read, as from a file
    first = next(model.parameters())
    with tempfile.TemporaryDirectory(dir=workdir, prefix="hybridctl-hf-") as tmp:
        write_hf(Path(tmp) / "hf", src, arch="nemotron_h")
        hf = NemotronHForCausalLM.from_pretrained(str(Path(tmp) / "hf"), dtype=dtype or first.dtype,
                                                  max_position_embeddings=1 << 20)
    return hf.to(device=device or first.device).eval()


def hf_generate_time(hf, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    sync(input_ids.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    sync(input_ids.device)
    return time.perf_counter() - t, out[:, input_ids.shape[1]:]


def hf_decode_rate(hf, input_ids: torch.Tensor, new_tokens: int, repeats: int = 1) -> dict[str, Any]:
    """transformers' decode tokens/s with the prefill cancelled out; the best of ``repeats``."""
    hf_generate_time(hf, input_ids, 2)  # warm-up
    t1 = min(hf_generate_time(hf, input_ids, 1)[0] for _ in range(repeats))
    runs = [hf_generate_time(hf, input_ids, new_tokens) for _ in range(repeats)]
    tn, tokens = min(r[0] for r in runs), runs[0][1]
    bsz = input_ids.shape[0]
    # a prefill that varies more than the decode takes makes the difference meaningless: report nothing then
    rate = bsz * (new_tokens - 1) / (tn - t1) if tn - t1 > 0.05 * tn else None
    return {"decode_tokens_per_s": rate, "ttft_s": t1, "tokens": tokens.tolist()}


def bytes_per_step(model, batch: int, mean_kv_len: int, state_bytes: int = 4) -> int:
    """``hybridctl.model.decode_bytes_per_step`` at the mean KV length of a run."""
    return decode_bytes_per_step(model, batch, mean_kv_len, state_bytes=state_bytes)


def guarded(label: str, fn: Callable[[], Any], errors: dict[str, str]) -> Any:
    """Run a peer; on failure print and record the error and go on (a benchmark gets one or two tries)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a failing peer must not sink the others
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"[{label}] FAILED: {msg}", flush=True)
        errors[label] = msg
        if device_is_cuda():
            torch.cuda.empty_cache()
        return None


def device_is_cuda() -> bool:
    return torch.cuda.is_available()


def write_json(name: str, obj: Any) -> str:
    """Write raw results as JSON to $OUT/name when OUT is set (a device run brings $OUT back), else to
    benchmarks/results/name. Returns the path."""
    out = os.environ.get("OUT") or RESULTS
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    print(f"wrote {path}")
    return path


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(cols))]
    lines += ["  ".join(x[i].ljust(w[i]) for i in range(len(cols))) for x in cells]
    return "\n".join(lines)
