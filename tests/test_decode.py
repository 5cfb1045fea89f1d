"""decode.py: the plan is resolved once and is what --json reports; generate is decode.run plus the per-row text;
inference transforms are module swaps (no method shadowing on the CPU twin)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from typer.testing import CliRunner

from hybridctl import decode
from hybridctl.cli import app
from hybridctl.cpu_decode import _PackedLinear, cpu_fast_twin
from hybridctl.generate import generate
from hybridctl.model import build_model, materialize
from hybridctl.sampling import SamplingParams
from hybridctl.tokenizer import ByteTokenizer


def make_model(seed: int = 0, **changes):
    return materialize(build_model(tiny_config(**changes)), "cpu", seed=seed).eval()


def test_the_plan_names_one_mode_per_request():
    model = make_model(pattern="M*-M")
    cases = {  # (batch, compile, fast_cpu) → mode
        (1, None, True): "cpu-fast-matvec", (2, None, True): "cpu-fast", (1, False, True): "cpu-fast",
        (1, True, True): "compiled", (1, None, False): "eager"}
    for (batch, compile, fast), mode in cases.items():
        plan = decode.plan_decode(model, batch=batch, compile=compile, fast_cpu=fast)
        assert plan.mode == mode and plan.mode in decode.MODES, (batch, compile, fast, plan)
        assert plan.compiled is (compile is True) and not plan.cuda_graph and plan.sync_every == 1
        assert plan.fallback_reason is None and plan.device == "cpu" and plan.backend == "ref"
    bf16 = make_model(pattern="M*-M").to(torch.bfloat16)
    plan = decode.plan_decode(bf16, batch=1)
    assert plan.mode == "eager" and not plan.cpu_fast_path and "float32" in plan.fallback_reason
    assert plan.dtype == "bfloat16" and json.loads(json.dumps(plan.as_dict())) == plan.as_dict()
    with pytest.raises(Exception):
        plan.mode = "eager"  # frozen


@pytest.mark.parametrize("batch,kw", [(1, {}), (2, {"temperature": 0.9, "top_p": 0.9, "repetition_penalty": 1.3}),
                                      (2, {"fast_cpu": False})])
def test_generate_and_decode_run_agree_token_for_token(batch, kw):
    model = make_model(pattern="*M-M*M", attention={"position": "rope"})
    ids = [[5, 6, 7, 8, 9, 10], [11, 12]][:batch]
    fast = kw.pop("fast_cpu", True)
    res = generate(model, ids, max_new_tokens=9, seed=3, fast_cpu=fast, **kw)
    plan = decode.plan_decode(model, batch=batch, fast_cpu=fast)
    trace = decode.run(model, ids, plan, SamplingParams(**kw), max_new_tokens=9, seed=3)
    assert trace.new_ids == res.tokens  # id prompts: no tokenizer, no EOS, every row runs to the length
    assert trace.plan.as_dict() == res.extra["decode_plan"] and trace.decode_steps == res.decode_steps == 8
    assert len(trace.step_s) == 8 and all(t > 0 for t in trace.step_s)
    p = trace.step_percentiles()
    assert set(p) == {"p50", "p90", "p99"} and min(trace.step_s) <= p["p50"] <= p["p99"] <= max(trace.step_s)
    assert 0 <= trace.compile_s <= trace.warmup_s and trace.prefill_s > 0


def test_on_token_stops_the_run():
    model = make_model()
    seen = []
    trace = decode.run(model, [[1, 2, 3]], decode.plan_decode(model, batch=1, compile=False), max_new_tokens=20,
                       on_token=lambda new: seen.append(new) or len(seen) == 3)
    assert len(seen) == 3 and trace.decode_steps == 2 and len(trace.new_ids[0]) == 3
    assert [b[0][0] for b in seen] == trace.new_ids[0]


def test_cli_json_reports_the_plan(tmp_path):
    from hybridctl.checkpoint import load_model
    from hybridctl.checkpoint.native import save_model

    out = tmp_path / "tiny"
    save_model(make_model(seed=1), out, tokenizer=ByteTokenizer())
    r = CliRunner().invoke(app, ["generate", str(out), "--prompt", "Hi", "--max-new-tokens", "3", "--json",
                                 "--no-compile"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    model, _ = load_model(out, device=torch.device("cpu"))
    want = decode.plan_decode(model, batch=1, compile=False).as_dict()
    assert obj["decode_plan"] == want and want["mode"] == "cpu-fast"
    assert obj["compiled"] is False and obj["cuda_graph"] is False and obj["cpu_fast_path"] is True


@pytest.mark.parametrize("tie", [False, True])
def test_the_cpu_twin_swaps_modules_and_shadows_nothing(tie):
    model = make_model(pattern="M*-M", tie_embeddings=tie)
    twin = cpu_fast_twin(model)
    assert twin is not model and "logits" not in vars(twin) and type(twin).logits is type(model).logits
    assert isinstance(twin.lm_head, _PackedLinear) and (model.lm_head is None) is tie
    head_w = model.embed.weight if tie else model.lm_head.weight
    assert twin.lm_head.weight is head_w  # shared, not copied
    assert not any(type(m) is torch.nn.Linear for m in twin.modules())
    h = torch.randn(2, model.cfg.d_model)
    with torch.inference_mode():
        torch.testing.assert_close(twin.logits(h), model.logits(h), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(twin.head(h), model.head(h), atol=1e-5, rtol=1e-5)
