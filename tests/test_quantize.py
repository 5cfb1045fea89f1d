"""quantize: policy table, dry run, native round trip, quality on a briefly trained tiny model, GPTQ vs RTN, generate on
a quantized checkpoint, bad input."""

import json

import pytest
import torch

from hybridctl import qlinear as Q
from hybridctl.checkpoint import load_model
from hybridctl.checkpoint.native import save_model
from hybridctl.config import HybridctlError
from hybridctl.model import build_model, materialize
from hybridctl.quantize import _batches, collect_hessians, gptq_quantize, make_plan, quantize
from hybridctl.tokenizer import ByteTokenizer
from tests.conftest import tiny_config

FAST = dict(eval_samples=4, eval_seq_len=64, greedy_tokens=32)


def _train(model, tok, steps: int = 12):
    """A few AdamW steps on the embedded corpus: weights with structure, so quantization error shows in the ppl."""
    batches = _batches("builtin", tok, split="train", seq_len=64, batch_size=8, n_rows=8 * steps, what="train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for b in batches[:steps]:
        logits = model(b["input_ids"], seq_idx=b.get("seq_idx"))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = _train(materialize(build_model(tiny_config()), "cpu"), tok)
    out = tmp_path_factory.mktemp("q") / "src"
    save_model(model, out, tokenizer=tok)
    return out


def _rows(res):
    return {r.name: r for r in res.plan}


# ---- the plan ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy,quantized", [
    ("default", {"in_proj", "out_proj", "up_proj", "down_proj"}),
    ("aggressive", {"in_proj", "out_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"}),
    ("conservative", {"up_proj", "down_proj"})])
@pytest.mark.parametrize("include_head", [False, True])
def test_policy_table(policy, quantized, include_head):
    cfg = tiny_config()
    specs = {k: (tuple(v.shape), v.dtype) for k, v in build_model(cfg).state_dict().items()}
    rows, modules = make_plan(cfg, specs, method="int4", group_size=64, policy=policy, include_head=include_head)
    assert [r.name for r in rows] == list(specs)  # every tensor, in order
    for r in rows:
        leaf = r.name.split(".")[-2] if r.name.endswith(".weight") else None
        q = (leaf in quantized and r.name.startswith("layers.")) or (include_head and r.name == "lm_head.weight")
        assert (r.action == "int4 g64") == q, r
        if q:
            n, k = r.shape
            assert r.bytes_after == n * k // 2 + n * (k // 64) * 4 and r.bytes_before == n * k * 4
        else:
            assert r.bytes_after == r.bytes_before
    reasons = {r.name: r.reason for r in rows}
    assert "never quantized" in reasons["layers.0.mixer.A_log"] and "never" in reasons["layers.0.mixer.D"]
    assert "never" in reasons["layers.0.mixer.dt_bias"] and "conv1d" in reasons["layers.0.mixer.conv1d.weight"]
    assert "norm" in reasons["layers.0.mixer.norm.weight"] and "norm" in reasons["norm_f.weight"]
    assert "embedding" in reasons["embed.weight"]
    if not include_head:
        assert "include_head" in reasons["lm_head.weight"]
    assert len(modules) == sum(r.action != "kept" for r in rows)


def test_tied_head_is_never_quantized():
    cfg = tiny_config(tie_embeddings=True)
    specs = {k: (tuple(v.shape), v.dtype) for k, v in build_model(cfg).state_dict().items()}
    rows, modules = make_plan(cfg, specs, method="int8", group_size=128, policy="aggressive", include_head=True)
    assert "lm_head" not in modules and next(r for r in rows if r.name == "embed.weight").action == "kept"


def test_dry_run_writes_nothing_and_lists_every_tensor(trained, tmp_path):
    out = tmp_path / "q"
    res = quantize(source=trained, out=out, method="int4", group_size=32, dry_run=True)
    assert not out.exists() and res.eval is None
    specs = load_model(trained)[1].specs
    assert [r.name for r in res.plan] == list(build_model(tiny_config()).state_dict())
    assert set(_rows(res)) == set(specs)
    assert res.bytes_before == sum(r.bytes_before for r in res.plan) > res.bytes_after
    json.dumps(res.summary())  # --json


# ---- write, load, run ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,policy", [("int8", "aggressive"), ("int4", "default")])
def test_round_trip_same_logits_as_in_memory_model(trained, tmp_path, method, policy):
    from hybridctl.quantize import quantized_model

    out = tmp_path / method
    res = quantize(source=trained, out=out, method=method, group_size=32, policy=policy, include_head=True,
                   eval_data=None)
    meta = json.loads((out / "config.json").read_text())
    sec = meta["quantization"]
    assert sec["method"] == method and sec["modules"] == res.modules and "lm_head" in sec["modules"]
    assert sec["kept"]["layers.0.mixer.A_log"].startswith("SSM") and meta["dtype"] == "float32"
    assert (out / "hybridctl_tokenizer.json").exists() or meta["tokenizer"]
    model, src = load_model(out)
    cls = Q.Int8WeightOnlyLinear if method == "int8" else Q.Int4WeightOnlyLinear
    assert isinstance(model.layers[0].mixer.in_proj, cls) and isinstance(model.lm_head, cls)
    assert model.layers[0].mixer.in_proj.qweight.dtype == (torch.int8 if method == "int8" else torch.uint8)
    assert type(model.layers[3].mixer.q_proj) is (cls if policy == "aggressive" else torch.nn.Linear)
    mem = quantized_model(load_model(trained)[0], res.modules, method, 32)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), mem(ids), atol=0, rtol=0)
    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    dense = sum(p.stat().st_size for p in trained.glob("*.safetensors"))
    assert on_disk < dense * (0.5 if method == "int8" else 0.4)


def test_int8_quality_and_generate_on_the_quantized_checkpoint(trained, tmp_path):
    from hybridctl.generate import generate

    out = tmp_path / "q8"
    res = quantize(source=trained, out=out, method="int8", **FAST)
    ev = res.eval
    assert ev["ppl_source"] < 100  # trained: well below the 384-way uniform
    assert abs(ev["ppl_change"]) < 0.005 and ev["greedy_agreement"] >= 0.9
    prompt = "The "
    want = generate(trained, prompt, max_new_tokens=16)
    for fast_cpu in (True, False):  # the CPU fast path leaves the quantized linears alone
        got = generate(out, prompt, max_new_tokens=16, fast_cpu=fast_cpu)
        agree = sum(a == b for a, b in zip(got.tokens[0], want.tokens[0])) / 16
        assert agree >= 0.75 and got.texts[0]


def test_decode_step_of_quantized_model_matches_its_forward(trained, tmp_path):
    out = tmp_path / "q4"
    quantize(source=trained, out=out, method="int4", group_size=32, policy="aggressive", include_head=True,
             eval_data=None)
    model, _ = load_model(out)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = model(ids)[0, -1]
        cache = model.allocate_cache(1, 16)
        model(ids[:, :-1], cache=cache)
        step = model.decode_step(ids[:, -1], cache, torch.tensor([11]))[0]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def test_gptq_beats_round_to_nearest_at_int4(trained):
    """On held-out activations: GPTQ's layer outputs are closer to the dense ones than RTN's, summed over layers, and
    its perplexity increase is no larger."""
    model, src = load_model(trained)
    tok = ByteTokenizer()
    rows, modules = make_plan(src.config, src.specs, method="int4", group_size=32, policy="default",
                              include_head=False)
    calib = _batches("builtin", tok, split="train", seq_len=64, batch_size=8, n_rows=32, what="calib")
    held = _batches("builtin", tok, split="eval", seq_len=64, batch_size=4, n_rows=8, what="eval")
    h_cal, h_eval = collect_hessians(model, modules, calib), collect_hessians(model, modules, held)
    err_rtn = err_gptq = 0.0
    for name in modules:
        w = model.get_submodule(name).weight.detach()
        for kind in ("rtn", "gptq"):
            qw, s = Q.quantize_int4(w, 32) if kind == "rtn" else gptq_quantize(w, h_cal[name], "int4", 32)
            d = (Q.dequantize_int4(qw, s, 32) - w).double()
            e = float(torch.trace(d @ h_eval[name] @ d.T))  # E ||x (W - Ŵ)ᵀ||² on held-out inputs
            if kind == "rtn":
                err_rtn += e
            else:
                err_gptq += e
    assert err_gptq < 0.8 * err_rtn


def test_calibrated_quantize_reports_gptq(trained, tmp_path):
    rtn = quantize(source=trained, out=tmp_path / "rtn", method="int4", group_size=32, **FAST)
    cal = quantize(source=trained, out=tmp_path / "gptq", method="int4", group_size=32, calib="builtin",
                   calib_samples=16, calib_seq_len=64, **FAST)
    assert cal.calibration == "gptq" and rtn.calibration == "rtn"
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization"]["calibration"] == "gptq"
    a, b = load_model(tmp_path / "rtn")[0], load_model(tmp_path / "gptq")[0]
    assert not torch.equal(a.layers[0].mixer.in_proj.qweight, b.layers[0].mixer.in_proj.qweight)
    # (the tiny model's ppl moves by noise-level amounts either way; GPTQ's gain is shown on reconstruction error)
    assert abs(cal.eval["ppl_change"]) < 0.05 and abs(rtn.eval["ppl_change"]) < 0.05


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_bad_inputs_one_clear_error_nothing_written(trained, tmp_path):
    out = tmp_path / "bad"
    cases = [(dict(method="int3"), "unknown method"), (dict(method="int4", group_size=48), "group-size"),
             (dict(policy="wild"), "unknown policy"), (dict(calib=str(tmp_path / "nope.txt")), "--calib")]
    for kw, msg in cases:
        with pytest.raises(HybridctlError, match=msg):
            quantize(source=trained, out=out, eval_data=None, **kw)
        assert not out.exists() and not list(tmp_path.glob(".bad*"))
    with pytest.raises(HybridctlError, match="source checkpoint"):
        quantize(source=trained, out=trained, eval_data=None)
    wide = tmp_path / "wide"  # in_proj input width 128 is divisible by 128, MLP down_proj 512: use a 96-wide model
    save_model(materialize(build_model(tiny_config(d_model=96, mamba={"headdim": 24})), "cpu"), wide,
               tokenizer=ByteTokenizer())
    with pytest.raises(HybridctlError, match="does not divide its input width 96"):
        quantize(source=wide, out=out, method="int4", group_size=64, eval_data=None)
    assert not out.exists()
    q = tmp_path / "q"
    quantize(source=trained, out=q, eval_data=None)
    with pytest.raises(HybridctlError, match="already quantized"):
        quantize(source=q, out=out, eval_data=None)
    with pytest.raises(HybridctlError, match="--out"):
        quantize(source=trained, out=None)


def test_convert_refuses_a_quantized_source(trained, tmp_path):
    """Only --to hf (compressed-tensors, tests/test_quantize_export.py) holds integer weights."""
    from hybridctl.convert import convert

    q = tmp_path / "q"
    quantize(source=trained, out=q, eval_data=None)
    for to in ("megatron", "megatron-legacy", "native"):
        with pytest.raises(HybridctlError, match="quantized checkpoint"):
            convert(src=q, to=to, out=tmp_path / to)
        assert not (tmp_path / to).exists()


@pytest.mark.parametrize("method,group", [("int8", 0), ("int4", 32)])
def test_decode_bytes_per_step_counts_the_packed_weights_and_scales(trained, tmp_path, method, group):
    """A quantized checkpoint's decode step reads its packed qweight and scales, not the dense matrices: the bytes
    per step of the loaded result are the source's minus, per swapped linear, its dense weight plus the actual
    buffers (int8: N·K bytes + N scales; int4: N·K/2 + N·K/g scales); bench's rows report that figure."""
    from hybridctl.bench import bench
    from hybridctl.model import decode_bytes_per_step

    out = tmp_path / method
    res = quantize(source=trained, out=out, method=method, group_size=group or 128, policy="aggressive",
                   include_head=True, eval_data=None)
    dense, _ = load_model(trained)
    qm, _ = load_model(out)
    saved = 0
    for name in res.modules:
        lin, q = dense.get_submodule(name), qm.get_submodule(name)
        n, k = lin.weight.shape
        packed = q.qweight.numel() * q.qweight.element_size()
        assert packed == (n * k if method == "int8" else n * k // 2)
        assert q.scales.numel() == (n if method == "int8" else n * k // group) and q.scales.dtype == torch.float32
        saved += lin.weight.numel() * lin.weight.element_size() - packed - q.scales.numel() * 4
    assert "lm_head" in res.modules and saved > 0
    for batch in (1, 3):
        assert decode_bytes_per_step(dense, batch, 20) - decode_bytes_per_step(qm, batch, 20) == saved
    rows = bench(checkpoints=[out], presets=[], batch=[2], prompt_len=[8], new_tokens=2, reps=1, warmup=0,
                 bandwidth_gbps=10.0)["speed"]
    assert rows[0]["status"] == "ok" and rows[0]["decode_bytes_per_step"] == decode_bytes_per_step(qm, 2, 9)
    assert rows[0]["roofline_fraction"] == pytest.approx(
        rows[0]["decode_bytes_per_step"] * rows[0]["decode_tokens_per_s"]["mean"] / 2 / 10e9)
