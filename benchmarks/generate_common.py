"""Shared pieces of benchmarks/generate_cpu.py and generate_gpu.py (imported from the script's own directory).

- ``to_nemotron_h(model)``: transformers' NemotronHForCausalLM holding exactly the weights of a HybridLM (the name
  table is a prefix change: ``backbone.`` + ``embed`` → ``embeddings``; ``lm_head`` stays), so both peers decode the
  same model.
- ``hf_decode_rate``: transformers' decode tokens/s as (B·(N−1)) / (t(N new tokens) − t(1 new token)), which
  cancels the prefill.
- ``bytes_per_step``: the memory a decode step must read (all weights except the embedding table, of which only B rows
  are gathered; SSM/conv state read + written; the KV cache up to the mean position) — the roofline's numerator.
- ``matvec_bandwidth`` / ``copy_bandwidth``: the achievable memory bandwidth, measured on this machine
  (``matvec_bandwidths``: each matrix-vector implementation and a plain streaming read, separately).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import torch


def nemotron_h_config(cfg) -> dict[str, Any]:
    """transformers NemotronHConfig kwargs for a hybridctl ModelConfig (NoPE attention, non-gated MLP)."""
    m, a = cfg.mamba, cfg.attention
    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    act = {"gelu": "gelu", "relu2": "relu2"}[cfg.mlp.activation]
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, layers_block_type=[kinds[s] for s in cfg.pattern],
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.mlp.hidden_size, mlp_hidden_act=act, mamba_num_heads=cfg.mamba_nheads,
        mamba_head_dim=m.headdim, n_groups=m.ngroups, ssm_state_size=m.d_state, conv_kernel=m.d_conv,
        expand=m.expand, chunk_size=m.chunk_size, use_conv_bias=m.conv_bias, use_bias=m.bias,
        # NemotronH clamps dt >= time_step_min in its prefill (not in its decode step): keep the clamp at 0 in
        # both peers so the two compute the same function.
        time_step_min=m.dt_clamp_min, time_step_limit=(m.dt_clamp_min, float("inf")),
        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, residual_in_fp32=False,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, use_cache=True, max_position_embeddings=1 << 20,
    )


def to_nemotron_h(model, *, device=None, dtype=None):
    """transformers' NemotronHForCausalLM with the weights of ``model`` (a HybridLM)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    kw = nemotron_h_config(model.cfg)
    try:
        hf_cfg = NemotronHConfig(**kw)
    except Exception:  # noqa: BLE001 - older transformers: the pattern string is the only layer-type field
        kw["hybrid_override_pattern"] = model.cfg.pattern
        del kw["layers_block_type"]
        hf_cfg = NemotronHConfig(**kw)
    with torch.device("meta"):
        hf = NemotronHForCausalLM(hf_cfg)
    # On disk the prefix is "backbone."; transformers 5 renames the module to "model." on load. Use whichever
    # prefix this transformers' module tree has.
    prefix = next(k for k in hf.state_dict() if k.endswith("embeddings.weight")).removesuffix("embeddings.weight")
    sd = {}
    for name, t in model.state_dict().items():
        hf_name = name if name == "lm_head.weight" else prefix + name.replace("embed.", "embeddings.", 1)
        sd[hf_name] = t.detach().clone()
    if model.cfg.tie_embeddings:
        sd["lm_head.weight"] = sd[prefix + "embeddings.weight"]
    hf.load_state_dict(sd, strict=True, assign=True)
    hf = hf.to(device=device or next(model.parameters()).device, dtype=dtype or next(model.parameters()).dtype)
    return hf.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_generate_time(hf, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    _sync(input_ids.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    _sync(input_ids.device)
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
    """Bytes a decode step must move at least: weights (embedding: only the B gathered rows), SSM + conv state
    (read and written), the KV cache up to ``mean_kv_len`` (read)."""
    cfg = model.cfg
    total = 0
    for name, p in model.named_parameters():
        if name == "embed.weight":
            total += batch * p.shape[1] * p.element_size()
            if model.lm_head is None:  # tied: the head reads the whole table
                total += p.numel() * p.element_size()
        else:
            total += p.numel() * p.element_size()
    esize = next(model.parameters()).element_size()
    n_mamba, n_attn = cfg.pattern.count("M"), cfg.pattern.count("*")
    ssm = n_mamba * cfg.mamba_nheads * cfg.mamba.headdim * cfg.mamba.d_state * state_bytes
    conv = n_mamba * cfg.conv_dim * cfg.mamba.d_conv * esize
    kv = n_attn * 2 * cfg.attention.n_kv_heads * cfg.head_dim * esize * mean_kv_len
    return total + batch * (2 * (ssm + conv) + kv)


def _best_time(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def matvec_bandwidths(device: torch.device, dtype: torch.dtype, mbytes: int = 512, repeats: int = 10
                      ) -> dict[str, float]:
    """Bytes/s of y = W x (W [rows, 4096], x [1, 4096]) over a matrix far larger than the caches, per way of computing
    it, plus ``read`` = W.sum() (a plain streaming read of the same bytes, for reference).

    ``F.linear`` is MKL's sgemv on the CPU, which streams at only about half of what the memory delivers on the
    2-core EPYC VMs; ``onednn`` (CPU fp32 only) is oneDNN's inner product on a weight reordered once
    (``mkldnn._reorder_linear_weight`` + ``mkldnn._linear_pointwise``, what Inductor's freezing pass and
    hybridctl's CPU fast path run), ``onednn_to_mkldnn`` the older mkldnn_linear with per-call to_mkldnn/to_dense."""
    esize = torch.empty((), dtype=dtype).element_size()
    rows = mbytes * 2**20 // (esize * 4096)
    w = torch.randn(rows, 4096, device=device, dtype=dtype)
    x = torch.randn(1, 4096, device=device, dtype=dtype)
    nbytes = w.numel() * esize
    out = {"F.linear": nbytes / _best_time(device, lambda: torch.nn.functional.linear(x, w), repeats)}
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        out["onednn"] = nbytes / _best_time(
            device, lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats)
        del packed
        wm = w.to_mkldnn()
        out["onednn_to_mkldnn"] = nbytes / _best_time(
            device, lambda: torch._C._nn.mkldnn_linear(x.to_mkldnn(), wm, None).to_dense(), repeats)
        del wm
    out["read"] = nbytes / _best_time(device, w.sum, repeats)
    return out


def matvec_bandwidth(device: torch.device, dtype: torch.dtype, mbytes: int = 512, repeats: int = 10) -> float:
    """Bytes/s of the fastest y = W x available here (``matvec_bandwidths`` without ``read``): the rate a decode
    step can stream weights, the roofline's denominator. On the GPU that is F.linear (cuBLAS gemv)."""
    bws = matvec_bandwidths(device, dtype, mbytes, repeats)
    return max(v for k, v in bws.items() if k != "read")


def copy_bandwidth(device: torch.device, mbytes: int = 1024, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the usual GPU bandwidth roofline."""
    a = torch.empty(mbytes * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() / best


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


def write_json(name: str, obj: Any) -> None:
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, name)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, default=str)
        print(f"wrote {path}")


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
