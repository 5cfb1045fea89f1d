"""GPU figures of ``hybridctl quantize`` (one H200 call, benchmarks/quantize.md):

1. ``kernels``: the Triton dequantizing GEMV / skinny GEMM (hybridctl/triton_kernels.py (last section)), compiled, bf16, at
   hybrid-1.3b's shapes, against dequantize-then-matmul in fp64 (and the bf16 twin's own error).
2. ``speed``: hybrid-1.3b bf16 (random init: speed does not depend on the values), decode tokens/s through
   ``generate`` (CUDA graph, compile off for every variant) at batch 1 / 8 / 64 with a 1K prompt: bf16, our int8 and
   int4 g128 (RTN, policy default), and torchao's weight-only int8 / int4 (``quantize_`` on the same nn.Linear
   modules; hybridctl's own Triton decode products off for it, which read ``.weight`` as a dense matrix); weight
   bytes and peak memory of each (the model alone on the GPU).
3. ``quality``: a hybrid-130m trained for ``--train-steps`` on the embedded corpus (``hybridctl train``), then in
   one process int8 / int4 g128 RTN / int4 g128 calibrated (GPTQ + clipped scales) perplexity vs the source,
   relative change and greedy agreement (fp32; the source loaded and evaluated once, every phase timed); with
   ``--peer`` torchao's weight-only int8 / int4 on a bf16 copy against the bf16 source.

    PYTHONPATH=. python benchmarks/quantize_gpu.py --out DIR [--sections quality,kernels,sweep,speed] [--peer]
        [--train-steps 120] [--smoke]

Sections run in the order given; DIR/quantize_gpu.json is rewritten after every phase (a cut call keeps its rows).

``--smoke``: tiny sizes on whatever device is there (the CPU rehearsal of the exact script).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from hybridctl import kernels
from hybridctl import qlinear as Q
from hybridctl.config import preset
from hybridctl.generate import generate
from hybridctl.model import build_model, materialize
from hybridctl.quantize import make_plan, quantize, quantized_model

T0 = time.time()
RES: dict = {"errors": {}}


def log(*a) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save(out: str) -> None:
    path = os.path.join(out, "quantize_gpu.json")
    with open(path + ".tmp", "w") as f:  # rename: a cut mid-write leaves the previous complete file
        json.dump(RES, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def guarded(label: str, fn, out: str):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark records what failed and goes on
        RES["errors"][label] = f"{type(e).__name__}: {str(e)[:400]}"
        log("ERROR", label, RES["errors"][label])
        traceback.print_exc()
        return None
    finally:
        save(out)


# ---- 1. kernels ------------------------------------------------------------------------------------------------------


def kernels_check(cfg, dev: str) -> list[dict]:
    from hybridctl import triton_kernels as tq

    rows = []
    d = cfg.d_model
    shapes = [(2 * cfg.mamba.expand * d + 2 * cfg.mamba.ngroups * cfg.mamba.d_state + cfg.mamba.expand * d
               // cfg.mamba.headdim, d), (d, cfg.mamba.expand * d), (cfg.mlp.hidden_size, d),
              (d, cfg.mlp.hidden_size)]
    g = torch.Generator(device="cpu").manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, generator=g) / k**0.5
        for method in ("int8", "int4"):
            qw, s = Q.quantize_int8(w) if method == "int8" else Q.quantize_int4(w, 128)
            qw, s = qw.to(dev), s.to(dev, torch.bfloat16)
            dense = (Q.dequantize_int8(qw, s.double(), torch.float64) if method == "int8"
                     else Q.dequantize_int4(qw, s.double(), 128, torch.float64))
            for m in (1, 8, 64):
                x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
                want = x.double() @ dense.T
                if m <= Q.GPU_GEMV_MAX_ROWS:
                    y = tq.int8_gemv(x, qw, s) if method == "int8" else tq.int4_gemv(x, qw, s, 128)
                else:
                    y = tq.quant_mm(x, qw, s, 8 if method == "int8" else 4, 128)
                twin = Q.int8_mm_ref(x, qw, s) if method == "int8" else Q.int4_mm_ref(x, qw, s, 128)
                scale = want.abs().max().item()
                rows.append({"n": n, "k": k, "method": method, "rows": m,
                             "kernel_rel_err": (y.double() - want).abs().max().item() / scale,
                             "twin_rel_err": (twin.double() - want).abs().max().item() / scale,
                             "us": _time_us(lambda: tq.int8_gemv(x, qw, s) if method == "int8" and m == 1 else
                                            tq.int4_gemv(x, qw, s, 128) if m == 1 else
                                            tq.quant_mm(x, qw, s, 8 if method == "int8" else 4, 128), dev),
                             "bf16_us": _time_us(lambda: torch.nn.functional.linear(x, dense.to(torch.bfloat16)),
                                                 dev),
                             "weight_bytes": qw.numel() + s.numel() * 2})
                log(json.dumps(rows[-1]))
    return rows


def _time_us(fn, dev: str, n: int = 50) -> float:
    if dev != "cuda":
        return float("nan")
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / n


# ---- 1b. GEMV sweep ---------------------------------------------------------------------------------------------

INT8_CONFIGS = [(4, 1024, 4), (2, 2048, 4), (8, 512, 4), (4, 512, 2), (8, 1024, 8), (16, 256, 4)]
NORM_CONFIGS = [(8, 256, 2), (4, 512, 4), (8, 512, 4), (16, 256, 4), (4, 256, 2), (2, 1024, 4)]
INT4_CONFIGS = [(8, 512, 4), (4, 1024, 4), (16, 256, 4), (32, 256, 8), (8, 1024, 8), (16, 512, 4)]
QMM_CONFIGS = [(16, 32, 128, 4), (16, 64, 128, 4), (16, 128, 64, 4), (64, 64, 128, 4), (64, 128, 64, 8),
               (32, 64, 128, 4)]


def _graph_us(fn, reps: int = 20, replays: int = 10) -> float:
    """µs a call of ``fn`` replayed ``reps`` times inside one CUDA graph (no Python dispatch in the figure); on the
    CPU (the interpreter rehearsal) one timed call."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1000 / (replays * reps))
    return best


def gemv_sweep(cfg, dev: str, deadline: float, n_configs: int = 99) -> dict:
    """Each 1.3b decode product with the work the step fuses into it (in_proj / up: the norm; out_proj: the
    residual; down: gelu + residual): the bf16 GEMV (hybridctl's tuned one) and the int8 / int4 GEMV under each
    candidate config, GB/s of weight bytes; the best config per (bits, shape, fused) goes into QGEMV_CONFIGS for
    the speed rows. Then the skinny GEMM (8 and 64 rows) against cuBLAS bf16."""
    from hybridctl import triton_kernels as tq

    d = cfg.d_model
    e = cfg.mamba.expand * d
    inp = 2 * e + 2 * cfg.mamba.ngroups * cfg.mamba.d_state + e // cfg.mamba.headdim
    h = cfg.mlp.hidden_size
    shapes = [(inp, d, "norm"), (d, e, "res"), (h, d, "norm"), (d, h, "act")]
    g = torch.Generator(device="cpu").manual_seed(0)
    rows, picks = [], {}
    bf = torch.bfloat16
    for n, k, fused in shapes:
        w = (torch.randn(n, k, generator=g) / k**0.5).to(dev, bf)
        x = torch.randn(1, k, generator=g).to(dev, bf)
        res = torch.randn(1, n, generator=g).to(dev, bf)
        nw = torch.rand(k, generator=g).to(dev, bf) + 0.5
        kw = dict(norm_weight=nw if fused == "norm" else None, activation="gelu" if fused == "act" else None,
                  residual=res if fused != "norm" else None)
        out = torch.empty(1, n, device=dev, dtype=bf)
        xd = x.double()
        if fused == "norm":
            xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
        elif fused == "act":
            xd = torch.nn.functional.gelu(xd)
        want = xd @ w.double().T + (res.double() if fused != "norm" else 0.0)
        y = tq.gemv_launch(x, w, None, kw["residual"], kw["norm_weight"], 1e-5, out, activation=kw["activation"])
        err = ((y.double() - want).abs().max() / want.abs().max()).item()
        us = _graph_us(lambda: tq.gemv_launch(x, w, None, kw["residual"], kw["norm_weight"], 1e-5, out,
                                              activation=kw["activation"]))
        rows.append({"n": n, "k": k, "fused": fused, "kernel": "bf16", "config": None, "us": us,
                     "GBps": n * k * 2 / us / 1e3, "rel_err": err})
        log(json.dumps(rows[-1]))
        for bits in (8, 4):
            qw, sc = Q.quantize_int8(w.float()) if bits == 8 else Q.quantize_int4(w.float(), 128)
            qw, sc = qw.to(dev), sc.to(dev, bf)
            nbytes = qw.numel() + sc.numel() * 2
            dense = (Q.dequantize_int8(qw, sc.double(), torch.float64) if bits == 8
                     else Q.dequantize_int4(qw, sc.double(), 128, torch.float64))
            xd = x.double()
            if fused == "norm":
                xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
            elif fused == "act":
                xd = torch.nn.functional.gelu(xd)
            want = xd @ dense.T + (res.double() if fused != "norm" else 0.0)
            cands = INT8_CONFIGS if bits == 8 and fused != "norm" else NORM_CONFIGS if bits == 8 else INT4_CONFIGS
            best = None
            for c in cands[:n_configs]:
                if time.time() > deadline:
                    RES["errors"]["sweep"] = "cut: out of time"
                    break
                try:
                    y = tq.qgemv_launch(x, qw, sc, bits, 128, out, config=c, **kw)
                    err = ((y.double() - want).abs().max() / want.abs().max()).item()
                    us = _graph_us(lambda: tq.qgemv_launch(x, qw, sc, bits, 128, out, config=c, **kw))
                except Exception as ex:  # noqa: BLE001 - a config that does not compile is recorded
                    rows.append({"n": n, "k": k, "fused": fused, "kernel": f"int{bits}", "config": c,
                                 "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
                    continue
                rows.append({"n": n, "k": k, "fused": fused, "kernel": f"int{bits}", "config": c, "us": us,
                             "GBps": nbytes / us / 1e3, "rel_err": err})
                log(json.dumps(rows[-1]))
                if err < 2e-2 and (best is None or us < best[1]):
                    best = (c, us)
            if best is not None:
                picks[f"{bits},{n},{k},{fused}"] = list(best[0])
                tq.QGEMV_CONFIGS[(bits, n, k, fused)] = best[0]
    qmm_rows = []
    for m in (8, 64):
        for n, k, _ in shapes:
            if time.time() > deadline:
                break
            w = (torch.randn(n, k, generator=g) / k**0.5).to(dev, bf)
            x = torch.randn(m, k, generator=g).to(dev, bf)
            us = _graph_us(lambda: torch.nn.functional.linear(x, w))
            qmm_rows.append({"m": m, "n": n, "k": k, "kernel": "cublas-bf16", "us": us})
            for bits in (8, 4):
                qw, sc = Q.quantize_int8(w.float()) if bits == 8 else Q.quantize_int4(w.float(), 128)
                qw, sc = qw.to(dev), sc.to(dev, bf)
                out = torch.empty(m, n, device=dev, dtype=bf)
                for c in ([None] + QMM_CONFIGS)[:n_configs]:
                    try:
                        us = _graph_us(lambda: tq.qmm_launch(x, qw, sc, bits, 128, out, config=c))
                    except Exception as ex:  # noqa: BLE001
                        qmm_rows.append({"m": m, "n": n, "k": k, "kernel": f"int{bits}", "config": c,
                                         "error": f"{type(ex).__name__}: {str(ex)[:200]}"})
                        continue
                    qmm_rows.append({"m": m, "n": n, "k": k, "kernel": f"int{bits}", "config": c, "us": us})
            log(json.dumps([r for r in qmm_rows if r["m"] == m and r["n"] == n and r["k"] == k]))
    for bits in (8, 4):
        for m in (8, 64):
            tot: dict = {}
            for r in qmm_rows:
                if r["m"] == m and r["kernel"] == f"int{bits}" and "us" in r:
                    c = tuple(r["config"]) if r["config"] else None
                    tot.setdefault(c, []).append(r["us"])
            full = {c: sum(v) for c, v in tot.items() if len(v) == len(shapes)}
            if full:
                c = min(full, key=full.get)
                if c is not None:
                    tq.QMM_CONFIGS[(bits, tq.qmm_bucket(m))] = c
                picks[f"qmm,{bits},{m}"] = list(c) if c else None
    return {"gemv": rows, "picks": picks, "qmm": qmm_rows}


# ---- 2. speed ---------------------------------------------------------------------------------------------------------


def _variant(base, cfg, name: str, dev: str):
    """(model on dev, weight bytes) for a variant of the CPU bf16 ``base``."""
    specs = {k: (tuple(v.shape), v.dtype) for k, v in base.state_dict().items()}
    if name.startswith("bf16"):
        m = copy.deepcopy(base)
    elif name in ("int8", "int4"):
        _, modules = make_plan(cfg, specs, method=name, group_size=128, policy="default", include_head=False)
        m = quantized_model(base, modules, name, 128)
    else:  # torchao-int8 / torchao-int4, same modules
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        method = name.split("-")[1]
        _, modules = make_plan(cfg, specs, method=method, group_size=128, policy="default", include_head=False)
        m = copy.deepcopy(base).to(dev)
        wanted = set(modules)
        conf = (Int8WeightOnlyConfig() if method == "int8" else  # tinygemm (aten._weight_int4pack_mm) on CUDA
                Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        quantize_(m, conf, filter_fn=lambda mod, fqn: fqn in wanted)
    m = m.to(dev).eval()
    nbytes = _weight_bytes(m)
    return m, nbytes


def _weight_bytes(m) -> int:
    total = 0
    for t in list(m.state_dict().values()):
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None:  # a torchao tensor subclass: its own tensors
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


def speed(cfg, dev: str, batches: list[int], prompt: int, new_tokens: int, variants: list[str],
          deadline: float) -> list[dict]:
    base = materialize(build_model(cfg), "cpu").to(torch.bfloat16).eval()
    rows = []
    for name in variants:
        if time.time() > deadline:
            RES["errors"][f"speed {name}"] = "skipped: out of time"
            continue
        m = nbytes = None
        try:
            m, nbytes = _variant(base, cfg, name, dev)
            own = not name.startswith("torchao") and not name.endswith("cublas")
            for bsz in batches:
                if time.time() > deadline:
                    break
                ids = torch.randint(0, cfg.vocab_size, (bsz, prompt), generator=torch.Generator().manual_seed(0))
                kw = dict(max_new_tokens=new_tokens if bsz == 1 else max(16, new_tokens // 2), use_eos=False,
                          compile=False)
                if dev == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                with kernels.decode_kernels(own):
                    w = generate(m, ids.tolist(), **kw)
                    r = generate(m, ids.tolist(), **kw)
                peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
                rows.append({"model": name, "batch": bsz, "prompt": prompt, "new_tokens": kw["max_new_tokens"],
                             "decode_tok_s": r.decode_tokens_per_s, "warmup_s": w.warmup_s,
                             "cuda_graph": r.cuda_graph, "weight_bytes": nbytes, "peak_bytes": peak,
                             "tokens_head": r.tokens[0][:8]})
                log(json.dumps(rows[-1]))
        except Exception as e:  # noqa: BLE001
            RES["errors"][f"speed {name}"] = f"{type(e).__name__}: {str(e)[:400]}"
            log("ERROR", name, RES["errors"][f"speed {name}"])
            traceback.print_exc()
        finally:
            del m
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
        RES["speed"] = rows
    bf = {r["batch"]: r["decode_tok_s"] for r in rows if r["model"] == "bf16"}
    for r in rows:
        if r["batch"] in bf:
            r["vs_bf16"] = r["decode_tok_s"] / bf[r["batch"]]
    return rows


# ---- 3. quality -------------------------------------------------------------------------------------------------------

RECIPE = '''name = "quant-quality"
seed = 0
[model]
preset = "{preset}"
[data]
source = "builtin"
seq_len = {seq_len}
[tokenizer]
name = "byte"
[optim]
steps = {steps}
micro_batch = 16
global_batch = 16
lr = 2e-3
min_lr = 2e-4
warmup_steps = {warmup}
schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
[checkpoint]
dir = "{work}/run"
interval = {never}
keep_last = 1
export = true
[eval]
interval = {never}
batches = 2
[logging]
interval = {log_every}
'''


def _train(work: str, dev: str, preset_name: str, steps: int, seq_len: int) -> dict:
    """``hybridctl train`` in a subprocess (the CLI users run): the source checkpoint at work/run/final."""
    recipe = os.path.join(work, "q.toml")
    with open(recipe, "w") as f:
        f.write(RECIPE.format(preset=preset_name, seq_len=seq_len, steps=steps, warmup=max(1, steps // 20),
                              work=work, never=steps * 2, log_every=max(1, steps // 10)))
    t = time.time()
    path = os.pathsep.join([os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    run = subprocess.run([sys.executable, "-m", "hybridctl", "train", recipe, "--resume", "never", "--json",
                          "--device", dev], capture_output=True, text=True, timeout=400,
                         env={**os.environ, "PYTHONPATH": path})  # keep /tmp/site (mamba_ssm) on the path
    log("train rc", run.returncode, f"{time.time() - t:.0f}s", run.stdout[-600:], run.stderr[-600:])
    if run.returncode != 0:
        raise RuntimeError(f"train failed (rc {run.returncode}): {run.stderr[-400:]}")
    return {"seconds": time.time() - t, "recipe": open(recipe).read(), "tail": run.stdout[-1500:]}


def _eval_row(result, batches, prompt, n: int, ref: dict) -> dict:
    """quantize.evaluate's figures against the cached source figures ``ref`` (ppl, greedy tokens)."""
    from hybridctl.quantize import greedy, perplexity

    t = time.time()
    ppl = perplexity(result, batches)
    t_ppl = time.time() - t
    mine = greedy(result, prompt, n)
    with torch.no_grad():
        seq = torch.cat([prompt, torch.tensor([ref["greedy"][:-1]], device=prompt.device)], dim=1)
        pred = result(seq)[0, prompt.shape[1] - 1:].argmax(-1).tolist()
    same = next((i for i, (x, y) in enumerate(zip(ref["greedy"], mine)) if x != y), n)
    return {"ppl_source": ref["ppl"], "ppl_quantized": ppl, "ppl_change": ppl / ref["ppl"] - 1.0,
            "greedy_tokens": n, "greedy_agreement": sum(x == y for x, y in zip(ref["greedy"], pred)) / n,
            "greedy_identical_prefix": same, "ppl_seconds": t_ppl, "greedy_seconds": time.time() - t - t_ppl}


def _reference(model, batches, prompt, n: int) -> dict:
    from hybridctl.quantize import greedy, perplexity

    t = time.time()
    return {"ppl": perplexity(model, batches), "greedy": greedy(model, prompt, n), "seconds": time.time() - t}


def _torchao_peer(model, cfg_modules: list[str], method: str):
    """torchao's weight-only int8 / int4 g128 (``quantize_``) on a bf16 copy, on the same nn.Linear modules."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    m = copy.deepcopy(model).to(torch.bfloat16)
    wanted = set(cfg_modules)
    conf = (Int8WeightOnlyConfig() if method == "int8" else
            Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    quantize_(m, conf, filter_fn=lambda mod, fqn: fqn in wanted)
    return m.eval()


def quality(work: str, dev: str, preset_name: str, steps: int, seq_len: int, eval_samples: int,
            calib_samples: int, greedy_tokens: int = 200, peer: bool = False, out: str | None = None) -> dict:
    """Train the source, then in one process (source loaded once, its ppl and greedy tokens computed once, the
    Hessians collected once): int8, int4 g128 RTN, int4 g128 calibrated (GPTQ + clipped scales, what ``quantize
    --calib`` does: quantize.quantized_model with Hessians), each row saved as soon as it exists; with ``peer``,
    torchao's int8 / int4 on a bf16 copy against the bf16 source. Policy default, head kept, fp32 evaluation."""
    from hybridctl.checkpoint import load_model, load_tokenizer_for, open_checkpoint
    from hybridctl.quantize import _batches, collect_hessians

    q: dict = {"phases": {}, "results": {}}
    RES["quality"] = q

    def phase(name: str, t: float) -> None:
        q["phases"][name] = round(time.time() - t, 2)
        log(f"quality: {name} {q['phases'][name]:.1f}s")
        if out:
            save(out)

    t = time.time()
    q["train"] = _train(work, dev, preset_name, steps, seq_len)
    phase("train", t)
    t = time.time()
    src = open_checkpoint(os.path.join(work, "run", "final"))
    tok = load_tokenizer_for(src)
    model, _ = load_model(src, device=dev, dtype=torch.float32)
    model.eval()
    batches = _batches("builtin", tok, split="eval", seq_len=seq_len, batch_size=4, n_rows=eval_samples,
                       what="--eval-data")
    prompt = batches[0]["input_ids"][:1, :32].to(dev)
    q["eval"] = {"data": "builtin (held-out split)", "sequences": eval_samples, "seq_len": seq_len,
                 "eval_tokens": sum(int(b["input_ids"].numel()) for b in batches), "greedy_tokens": greedy_tokens,
                 "calib_sequences": calib_samples, "policy": "default", "group_size": 128, "dtype": "float32"}
    ref = _reference(model, batches, prompt, greedy_tokens)
    q["ppl_source"] = ref["ppl"]
    phase("load+source-eval", t)
    for label, method, calibrated in (("int8", "int8", False), ("int4-rtn", "int4", False),
                                      ("int4-calibrated", "int4", True)):
        t = time.time()
        try:
            plan, modules = make_plan(src.config, src.specs, method=method, group_size=128, policy="default",
                                      include_head=False)
            hessians = None
            if calibrated:
                calib = _batches("builtin", tok, split="train", seq_len=seq_len, batch_size=8, n_rows=calib_samples,
                                 what="--calib")
                hessians = collect_hessians(model, modules, calib)
                phase(f"{label}: hessians", t)
            qm = quantized_model(model, modules, method, 128, hessians)
            t_q = time.time() - t
            try:
                row = _eval_row(qm, batches, prompt, greedy_tokens, ref)
            except Exception as e:  # noqa: BLE001 - a kernel failure must not cost the quality figure
                RES["errors"][f"quality {label} kernels"] = f"{type(e).__name__}: {str(e)[:400]}"
                traceback.print_exc()
                for mod in qm.modules():
                    if isinstance(mod, Q._QuantLinear):
                        mod.use_kernel = False  # the dequantize-then-matmul twin: the same integers and scales
                row = dict(_eval_row(qm, batches, prompt, greedy_tokens, ref), kernels="twin (kernel error)")
            row.update(quantize_seconds=t_q, seconds=time.time() - t, quantized_tensors=len(modules),
                       bytes_before=sum(r.bytes_before for r in plan), bytes_after=sum(r.bytes_after for r in plan),
                       method="gptq+clip" if calibrated else "rtn")
            q["results"][label] = row
            log(label, json.dumps(row))
            del qm
        except Exception as e:  # noqa: BLE001 - a row that fails is recorded, the next one runs
            RES["errors"][f"quality {label}"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        phase(label, t)
    rtn, cal = q["results"].get("int4-rtn"), q["results"].get("int4-calibrated")
    if rtn and cal and rtn["ppl_change"] > 0:
        q["calibrated_share_of_rtn_increase"] = cal["ppl_change"] / rtn["ppl_change"]
    if peer:
        t = time.time()
        bf = copy.deepcopy(model).to(torch.bfloat16).eval()
        ref16 = _reference(bf, batches, prompt, greedy_tokens)
        q["ppl_source_bf16"] = ref16["ppl"]
        del bf
        phase("peer: bf16 source", t)
        _, modules = make_plan(src.config, src.specs, method="int8", group_size=128, policy="default",
                               include_head=False)
        for method in ("int8", "int4"):
            t = time.time()
            try:
                with kernels.decode_kernels(False):  # torchao's tensors are not dense .weight matrices
                    pm = _torchao_peer(model, modules, method)
                    row = _eval_row(pm, batches, prompt, greedy_tokens, ref16)
                row.update(dtype="bfloat16", seconds=time.time() - t)
                q["results"][f"torchao-{method}"] = row
                log(f"torchao-{method}", json.dumps(row))
                del pm
            except Exception as e:  # noqa: BLE001
                RES["errors"][f"quality torchao-{method}"] = f"{type(e).__name__}: {str(e)[:400]}"
                traceback.print_exc()
            phase(f"torchao-{method}", t)
    return q


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="kernels,speed,quality")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--speed-seconds", type=float, default=130)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--sweep-seconds", type=float, default=60)
    ap.add_argument("--variants", default="bf16,int8,int4,torchao-int8,torchao-int4")
    ap.add_argument("--peer", action="store_true", help="quality: also torchao's int8 / int4 (bf16) on the 130m")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    RES["env"] = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
                  "argv": sys.argv}
    try:
        import torchao
        RES["env"]["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001
        RES["env"]["torchao"] = f"not importable: {e}"
    big = preset("tiny" if a.smoke else "hybrid-1.3b")
    for section in a.sections.split(","):  # in the order given: the first one is the one a cut must not lose
        log(f"section {section}")
        if section == "kernels" and dev == "cuda":
            RES["kernels"] = guarded("kernels", lambda: kernels_check(big, dev), a.out)
        elif section == "sweep" and (dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            RES["sweep"] = guarded("sweep", lambda: gemv_sweep(big, dev, time.time() + a.sweep_seconds,
                                                               2 if a.smoke else 99), a.out)
        elif section == "speed":
            variants = a.variants.split(",")
            guarded("speed", lambda: speed(big, dev, [1, 8, 64] if not a.smoke else [1, 8],
                                           1024 if not a.smoke else 32, 128 if not a.smoke else 8, variants,
                                           time.time() + a.speed_seconds), a.out)
        elif section == "quality":
            work = tempfile.mkdtemp(prefix="quant-quality-")
            guarded("quality", lambda: quality(work, dev, "tiny" if a.smoke else "hybrid-130m",
                                               6 if a.smoke else a.train_steps, 64 if a.smoke else 512,
                                               4 if a.smoke else 32, 8 if a.smoke else 128,
                                               greedy_tokens=16 if a.smoke else 200, peer=a.peer, out=a.out), a.out)
    RES["wall_s"] = time.time() - T0
    save(a.out)
    log("done")


if __name__ == "__main__":
    main()
