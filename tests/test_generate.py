"""generate: greedy vs full-forward argmax, batch vs single, the static decode step, sampling, stops, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from typer.testing import CliRunner

from hybridctl import sampling
from hybridctl.cli import app
from hybridctl.config import HybridctlError
from hybridctl.generate import generate
from hybridctl.model import build_model, materialize
from hybridctl.sampling import SamplingParams
from hybridctl.tokenizer import ByteTokenizer

runner = CliRunner()


def make_model(seed: int = 0, **changes):
    return materialize(build_model(tiny_config(**changes)), "cpu", seed=seed).eval()


def argmax_reference(model, prompt: list[int], n: int) -> list[int]:
    """Repeated argmax of the full forward (no cache): the oracle for greedy decoding."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def assert_caches_close(got, want) -> None:
    """Every SSM/conv state and KV cache of two InferenceCaches agrees to 1e-5."""
    for i, st in want.layers.items():
        for name in ("ssm", "conv") if hasattr(st, "ssm") else ("k", "v"):
            torch.testing.assert_close(getattr(got.layers[i], name), getattr(st, name), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hybridctl.checkpoint.native import save_model

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(make_model(seed=1), out, tokenizer=ByteTokenizer())
    return out


# ---- correctness against references ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,position,fast_cpu", [("M-M*-M-M", "none", True), ("M-M*-M-M", "none", False),
                                                       ("*-MM*M", "rope", True), ("MM-M", "none", True)])
def test_greedy_equals_full_forward_argmax(pattern, position, fast_cpu):
    model = make_model(pattern=pattern, attention={"position": position})
    prompt = torch.randint(0, 384, (37,)).tolist()  # crosses a chunk boundary (chunk 32)
    res = generate(model, [prompt], max_new_tokens=12, fast_cpu=fast_cpu)
    assert res.tokens[0] == argmax_reference(model, prompt, 12)
    assert res.finish_reasons == ["length"] and res.decode_steps == 11
    assert res.extra["cpu_fast_path"] is fast_cpu


def assert_twin_steps_match(model, twin, rows: int) -> None:
    """After the same 9-token prefill, four decode steps of ``twin`` give the logits (within 1e-4) and caches of
    ``model.decode_step``."""
    ids = torch.randint(0, 384, (rows, 9))
    with torch.inference_mode():
        caches = [model.allocate_cache(rows, 16), model.allocate_cache(rows, 16)]
        for c in caches:
            model(ids, cache=c)
        slot = torch.tensor([9])
        for t in range(4):
            tok = torch.full((rows,), 7 + t)
            a = model.decode_step(tok, caches[0], slot, slot.expand(rows))
            b = twin.decode_step(tok, caches[1], slot, slot.expand(rows))
            slot += 1
            assert (a - b).abs().max() < 1e-4
    assert_caches_close(caches[1], caches[0])


@pytest.mark.parametrize("tie", [False, True])
def test_cpu_fast_twin_matches_decode_step(tie):
    """The CPU fast path (oneDNN-prepacked linears, in-place SSM update) computes the same step, leaves the model
    untouched, is cached, and is rebuilt once a weight changes."""
    from hybridctl.blocks import Mamba2Mixer
    from hybridctl.cpu_decode import cpu_fast_twin

    model = make_model(pattern="*M-M*M", tie_embeddings=tie)
    twin = cpu_fast_twin(model)
    assert twin is not model and cpu_fast_twin(model) is twin
    assert all(type(m.mixer.in_proj) is torch.nn.Linear and type(m.mixer) is Mamba2Mixer
               for m in model.layers if m.kind == "M")
    assert_twin_steps_match(model, twin, rows=3)
    with torch.no_grad():
        model.norm_f.weight.mul_(2.0)
    assert cpu_fast_twin(model) is not twin


@pytest.mark.parametrize("matvec", [False, True])
def test_packed_linear_paths_match_f_linear(monkeypatch, matvec):
    """_PackedLinear's three CPU paths give F.linear: one row on the dense weight (oneDNN) or on the compiled
    matrix-vector product (weights from MATVEC_MIN_BYTES), several rows on the blocked copy; bias included."""
    import hybridctl.cpu_decode as g

    if not (torch.backends.mkldnn.is_available() and g._onednn_linear_ops()):
        pytest.skip("no oneDNN linear ops in this torch build")
    monkeypatch.setattr(g, "MATVEC_MIN_BYTES", 0 if matvec else 1 << 62)
    w, b = torch.randn(40, 24), torch.randn(40)
    fn = g.compiled_matvec([(40, 24)]) if matvec else None
    if matvec and fn is None:
        pytest.skip(f"torch.compile unavailable here: {g._matvec_error}")
    lin = g._PackedLinear(w, b, fn)
    assert (lin.matvec is not None) is matvec
    with torch.inference_mode():
        for x in (torch.randn(1, 24), torch.randn(24), torch.randn(1, 1, 24), torch.randn(3, 24)):
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_cpu_fast_twin_batch1_compiled_matvec_matches_decode_step(monkeypatch):
    """At batch 1 with every weight on the compiled matrix-vector product, the twin computes the model's step."""
    import hybridctl.cpu_decode as g

    monkeypatch.setattr(g, "MATVEC_MIN_BYTES", 0)
    model = make_model(pattern="*M-M*M")
    twin = g.cpu_fast_twin(model, matvec=True)
    if twin is model or twin.lm_head.matvec is None:
        pytest.skip(f"no CPU fast path / torch.compile here: {g._matvec_error}")
    assert_twin_steps_match(model, twin, rows=1)


def test_generate_compiles_the_cpu_matvec_only_at_batch_1_and_not_with_no_compile(monkeypatch):
    """The compiled matrix-vector product (seconds of compile) is built for batch-1 CPU decode with compile left at
    its default, not for a batch, not with compile=False; the tokens do not depend on it."""
    import hybridctl.cpu_decode as g

    monkeypatch.setattr(g, "MATVEC_MIN_BYTES", 0)
    model = make_model(pattern="*M-M*M")
    off = generate(model, [[1, 2, 3]], max_new_tokens=4, compile=False)
    batch = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=4)
    assert not off.extra["cpu_compiled_matvec"] and not batch.extra["cpu_compiled_matvec"]
    assert off.extra["cpu_fast_path"] and batch.tokens[0] == off.tokens[0]
    on = generate(model, [[1, 2, 3]], max_new_tokens=4)
    if not on.extra["cpu_compiled_matvec"]:
        pytest.skip(f"torch.compile unavailable here: {g._matvec_error}")
    assert on.tokens == off.tokens


@pytest.mark.parametrize("rows", [1, 2])
def test_compiled_decode_step_matches_the_eager_step(rows):
    """The torch.compile'd decode step (one graph per layer kind over the pure-PyTorch ops) computes the same
    logits and leaves the same caches as model.decode_step, for left-padded rows, RoPE, GQA and a SwiGLU MLP;
    generate() with compile=True gives the eager greedy tokens."""
    from hybridctl.decode import DecodeStep

    model = make_model(pattern="*M-M*M", attention={"position": "rope"}, mlp={"activation": "swiglu"})
    prompts = [torch.randint(0, 384, (n,)).tolist() for n in (11, 4)[:rows]]
    want = generate(model, prompts, max_new_tokens=8, compile=False)
    got = generate(model, prompts, max_new_tokens=8, compile=True)
    assert got.extra["compiled"] and "compile_error" not in got.extra and not got.extra["cpu_fast_path"]
    assert got.tokens == want.tokens
    ids = torch.randint(0, 384, (rows, 9))
    with torch.inference_mode():
        caches = [model.allocate_cache(rows, 16), model.allocate_cache(rows, 16)]
        steps = [DecodeStep(model, c, rows, torch.device("cpu"), use_graph=False, compile=flag)
                 for c, flag in zip(caches, (False, True))]
        for c, st in zip(caches, steps):
            model(ids, cache=c)
            st.set_position(9, torch.full((rows,), 9))
        for t in range(3):
            for st in steps:
                st.tokens.fill_(5 + t)
            a, b = steps[0].run(), steps[1].run()
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert steps[1].compiled and steps[1].compile_error is None
    assert_caches_close(caches[1], caches[0])


def test_a_failing_compile_falls_back_to_the_eager_step(monkeypatch):
    from hybridctl import decode as gen_mod

    def broken(*_a, **_k):
        raise RuntimeError("inductor exploded\nsecond line")

    monkeypatch.setattr(gen_mod, "compiled_step_fns", lambda: (broken, broken))
    model = make_model()
    res = generate(model, [[1, 2, 3]], max_new_tokens=5, compile=True)
    assert not res.extra["compiled"] and res.extra["compile_error"] == "RuntimeError: inductor exploded"
    assert res.tokens == generate(model, [[1, 2, 3]], max_new_tokens=5, compile=False).tokens


@pytest.mark.parametrize("position", ["none", "rope"])
def test_decode_step_matches_forward_with_cache(position):
    """The static (graph-friendly) step equals the Python-offset cached forward, and the full forward."""
    model = make_model(pattern="*M-M*M", attention={"position": position})
    ids = torch.randint(0, 384, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 20)
        model(ids[:, :6], cache=cache)
        slot = torch.tensor([6])
        steps = []
        for t in range(6, 14):
            steps.append(model.decode_step(ids[:, t], cache, slot, slot.expand(2)))
            slot += 1
    err = (torch.stack(steps, 1) - full[:, 6:]).abs().max().item()
    assert err < 1e-4, f"decode_step vs full forward: max abs error {err:.3g}"


@pytest.mark.parametrize("position", ["none", "rope"])
def test_batch_equals_single_prompts(position):
    """Left padding must never enter an SSM/conv state or attention: pads shorter and longer than the conv
    width, and longer than a scan chunk. Pattern starts with attention and ends with Mamba."""
    model = make_model(pattern="*-M*-M", attention={"position": position})
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in (45, 43, 9, 1)]
    batch = generate(model, prompts, max_new_tokens=10)
    for p, toks in zip(prompts, batch.tokens):
        assert toks == generate(model, [p], max_new_tokens=10).tokens[0]
        assert toks == argmax_reference(model, p, 10)


def test_padded_prefill_states_equal_unpadded():
    """Direct check of model.py's padding handling: the cache after a left-padded prefill equals the cache of
    the prompt alone (conv state, SSM state, KV of the real positions)."""
    model = make_model(pattern="*M-M")
    prompt = torch.randint(0, 384, (1, 7))
    padded = torch.cat([torch.randint(0, 384, (1, 2)), prompt], dim=1)
    seq_idx = torch.tensor([[0, 0] + [1] * 7], dtype=torch.int32)
    with torch.no_grad():
        a, b = model.allocate_cache(1, 16), model.allocate_cache(1, 16)
        model(prompt, cache=a)
        model(padded, cache=b, seq_idx=seq_idx)
    for i, st in a.layers.items():
        if hasattr(st, "ssm"):
            torch.testing.assert_close(b.layers[i].conv, st.conv)
            torch.testing.assert_close(b.layers[i].ssm, st.ssm, atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(b.layers[i].k[:, 2:9], st.k[:, :7], atol=1e-5, rtol=1e-4)
    assert b.key_valid[0, :2].tolist() == [False, False] and bool(b.key_valid[0, 2:].all())


def test_padded_vocab_ids_are_never_emitted():
    """Megatron-style padded vocab: the model has 384 rows, the byte tokenizer 259; make the padded rows win."""
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight[259:] *= 100.0
    res = generate(model, ["abc"], tokenizer="byte", max_new_tokens=8, use_eos=False)
    assert len(res.tokens[0]) == 8 and max(res.tokens[0]) < 259
    res = generate(model, ["abc"], tokenizer="byte", max_new_tokens=8, temperature=1.0, use_eos=False)
    assert max(res.tokens[0]) < 259


def test_state_dtype_bf16_runs_and_stays_close():
    model = make_model()
    prompt = torch.randint(0, 384, (20,)).tolist()
    res = generate(model, [prompt], max_new_tokens=8, state_dtype="bf16")
    ref = generate(model, [prompt], max_new_tokens=8)
    assert res.state_dtype == "bfloat16" and len(res.tokens[0]) == 8
    assert res.tokens[0][:2] == ref.tokens[0][:2]  # the first tokens see hardly any bf16 rounding


# ---- sampling -------------------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seed():
    model = make_model()
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1)
    a = generate(model, [[1, 2, 3]], seed=7, **kw).tokens
    assert a == generate(model, [[1, 2, 3]], seed=7, **kw).tokens
    assert a != generate(model, [[1, 2, 3]], seed=8, **kw).tokens


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(sampling.apply_top_k(logits, 2)).tolist() == [[False, False, True, True, True]]
    p = torch.softmax(logits, -1)[0]
    keep = ~torch.isinf(sampling.apply_top_p(logits, float(p[0] + p[1] / 2)))
    assert keep.tolist() == [[True, True, False, False, False]]  # the smallest set reaching the mass
    keep = ~torch.isinf(sampling.apply_min_p(logits, float(p[2] / p[0]) * 0.999))
    assert keep.tolist() == [[True, True, True, False, False]]
    seen = torch.tensor([[True, False, False, False, True]])
    pen = sampling.apply_repetition_penalty(logits, seen, 2.0)
    assert pen.tolist() == [[1.5, 2.0, 1.0, 0.0, -2.0]]
    assert sampling.sample(logits, SamplingParams()).tolist() == [0]
    # sampling follows the distribution (Exp-noise argmax == multinomial)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sampling.sample(logits, SamplingParams(temperature=1.0), generator=g)
                         for _ in range(4000)])
    freq = torch.bincount(draws[:, 0], minlength=5).float() / 4000
    assert (freq - p).abs().max() < 0.03
    with pytest.raises(HybridctlError, match="top_p"):
        SamplingParams(top_p=0.0)


# ---- stops, EOS, streaming ------------------------------------------------------------------------------------------


def test_eos_and_stop_strings_are_respected():
    model = make_model(seed=2)
    base = generate(model, ["Hi"], tokenizer="byte", max_new_tokens=24, temperature=1.0, seed=5, use_eos=False)
    toks = base.tokens[0]
    tok = ByteTokenizer()
    tok.eos_id = toks[5]  # pretend the 6th generated token is EOS
    res = generate(model, ["Hi"], tokenizer=tok, max_new_tokens=24, temperature=1.0, seed=5)
    cut = toks.index(toks[5])
    assert res.tokens[0] == toks[:cut] and res.finish_reasons == ["eos"]
    # a stop string taken from the middle of the continuation's bytes
    raw = bytes(t for t in toks if t < 256)
    stop = raw[8:10].decode("latin-1")
    text = base.texts[0]
    if stop not in text:  # multi-byte characters: pick a stop from the decoded text instead
        stop = text[len(text) // 2: len(text) // 2 + 2]
    streamed: list[str] = []
    res = generate(model, ["Hi"], tokenizer="byte", max_new_tokens=24, temperature=1.0, seed=5, use_eos=False,
                   stop=[stop, "never-seen"], on_text=lambda i, piece: streamed.append(piece))
    assert res.finish_reasons == ["stop"]
    assert res.texts[0] == text[:text.index(stop)]
    assert "".join(streamed) == res.texts[0]  # the stop string is never streamed


def test_streaming_is_utf8_safe():
    model = make_model(seed=4)
    pieces: list[str] = []
    res = generate(model, ["é"], tokenizer="byte", max_new_tokens=30, temperature=1.0, seed=1,
                   on_text=lambda i, piece: pieces.append(piece))
    assert "".join(pieces) == res.texts[0]
    assert res.texts[0] == bytes(t for t in res.tokens[0] if t < 256).decode("utf-8", errors="replace")


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(tmp_path, ckpt):
    from hybridctl.checkpoint.native import save_model

    with pytest.raises(HybridctlError, match="no such file"):
        generate(tmp_path / "missing", ["x"])
    (tmp_path / "junk").mkdir()
    with pytest.raises(HybridctlError, match="unknown checkpoint format"):
        generate(tmp_path / "junk", ["x"])
    save_model(make_model(), tmp_path / "notok")
    with pytest.raises(HybridctlError, match="--tokenizer"):
        generate(tmp_path / "notok", ["x"])
    with pytest.raises(HybridctlError, match="tokenizer not found"):
        generate(ckpt, ["x"], tokenizer=str(tmp_path / "nope"))
    with pytest.raises(HybridctlError, match="max_new_tokens"):
        generate(ckpt, ["x"], max_new_tokens=0)
    with pytest.raises(HybridctlError, match="need a tokenizer"):
        generate(make_model(), ["x"])
    with pytest.raises(HybridctlError, match="empty"):
        generate(make_model(), [[]])


# ---- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_json_fields(ckpt):
    r = runner.invoke(app, ["generate", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "6", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    for key in ("text", "tokens", "prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
                "time_to_first_token_s", "device", "backend", "finish_reason", "warmup_s", "state_dtype"):
        assert key in obj, key
    assert len(obj["tokens"]) == 6 and obj["prompt_tokens"] == 6 and obj["device"] == "cpu"  # BOS + 5 bytes
    r = runner.invoke(app, ["generate", str(ckpt), "-p", "Hello", "-p", "a", "--max-new-tokens", "4", "--json"])
    obj2 = json.loads(r.stdout)
    assert [x["prompt_tokens"] for x in obj2["results"]] == [6, 2]
    assert obj2["results"][0]["tokens"] == obj["tokens"][:4]  # batched == alone


def test_cli_streams_text_and_reads_stdin(ckpt):
    j = json.loads(runner.invoke(app, ["generate", str(ckpt), "-p", "Hey", "--max-new-tokens", "8", "--json",
                                       "--ignore-eos"]).stdout)
    r = runner.invoke(app, ["generate", str(ckpt), "-p", "-", "--max-new-tokens", "8", "--ignore-eos"], input="Hey")
    assert r.exit_code == 0, r.output
    assert r.stdout == j["text"] + "\n"
    assert "decode" in r.stderr and "tok/s" in r.stderr and "first token after" in r.stderr


def test_cli_errors_are_one_line(ckpt, tmp_path):
    r = runner.invoke(app, ["generate", str(ckpt)])
    assert r.exit_code == 1 and "no prompt" in r.stderr
    r = runner.invoke(app, ["generate", str(tmp_path / "none"), "-p", "x"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
    r = runner.invoke(app, ["generate", str(ckpt), "-p", "x", "--state-dtype", "int3"])
    assert r.exit_code == 1 and "dtype" in r.stderr
    pf = tmp_path / "p.txt"
    pf.write_text("From a file")
    r = runner.invoke(app, ["generate", str(ckpt), "--prompt-file", str(pf), "--max-new-tokens", "3",
                            "--state-dtype", "bf16", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["prompt_tokens"] == 12


# ---- GPU: the CUDA graph replays exactly the eager step (skipped without CUDA) --------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile,rows", [(False, 2), (True, 2), (True, 1)])
def test_cuda_graph_equals_eager(compile, rows):
    """The graph replay (of the compiled step or of the kernel-backend step) gives the eager step's greedy tokens,
    and is what `generate` uses on CUDA by default."""
    model = make_model(pattern="*-M*-M").cuda()
    prompts = [torch.randint(0, 384, (n,)).tolist() for n in (30, 7)[:rows]]
    a = generate(model, prompts, max_new_tokens=16, cuda_graph=True, compile=compile)
    b = generate(model, prompts, max_new_tokens=16, cuda_graph=False, compile=False)
    assert a.cuda_graph and not b.cuda_graph and a.extra["compiled"] is compile and not b.extra["compiled"]
    assert a.tokens == b.tokens
    assert generate(model, prompts, max_new_tokens=2).extra["compiled"]  # the default on CUDA


# ---- parity with transformers' NemotronH ----------------------------------------------------------------------------


def test_nemotron_h_checkpoint_matches_transformers_generate(tmp_path):
    """A NemotronH saved by transformers, read by hybridctl's HF reader, gives transformers' own greedy tokens."""
    pytest.importorskip("hybridctl.checkpoint.hf", reason="the Hugging Face reader (checkpoint/hf.py) is missing")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.NemotronHConfig(
        vocab_size=320, hidden_size=64, layers_block_type=["full_attention", "mlp", "linear_attention", "mlp",
                                                           "full_attention", "linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, mlp_hidden_act="relu2",
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4, expand=2,
        chunk_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.NemotronHForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "nh")
    prompts = [torch.randint(2, 320, (n,)).tolist() for n in (21, 6)]
    for p in prompts:
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[0, len(p):].tolist()
        got = generate(tmp_path / "nh", [p], max_new_tokens=10, device="cpu")
        assert got.tokens[0] == want
    # and batched (left-padded) gives the same tokens as alone
    both = generate(tmp_path / "nh", prompts, max_new_tokens=10, device="cpu")
    assert both.tokens == [generate(tmp_path / "nh", [p], max_new_tokens=10, device="cpu").tokens[0]
                           for p in prompts]


def test_time_to_first_token_is_the_prefill_time_and_stays_in_the_summary():
    res = generate(make_model(), [[1, 2, 3]], max_new_tokens=3)
    assert res.time_to_first_token_s == res.prefill_s > 0
    assert res.summary()["time_to_first_token_s"] == res.prefill_s


def test_dtype_casts_a_given_model_in_place_as_documented():
    model = make_model()
    generate(model, [[1, 2, 3]], max_new_tokens=2, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


# ---- issue 19: what the CLI's process does differently ----------------------------------------------------------


def test_the_backend_is_resolved_before_the_first_compiled_step(monkeypatch):
    """Resolving the backend imports mamba_ssm and logs, which Dynamo refuses to trace under fullgraph ("Attempted to
    call function marked as skipped"): the CLI's default --backend left it unresolved until the compiled step."""
    from hybridctl import decode as gen_mod
    from hybridctl import kernels

    real = gen_mod.compiled_step_fns
    seen = []

    def spy():
        seen.append(kernels._requested)
        return real()

    monkeypatch.setattr(gen_mod, "compiled_step_fns", spy)
    monkeypatch.setattr(kernels, "_requested", None)
    model = make_model()
    with torch.inference_mode():
        step = gen_mod.DecodeStep(model, model.allocate_cache(1, 8), 1, torch.device("cpu"), use_graph=False,
                                  compile=True)
        step.capture()
    assert seen and seen[0] is not None and step.compiled and step.compile_error is None


def test_a_compile_failure_is_one_warning_line_and_in_full_at_info(monkeypatch, caplog):
    from hybridctl import decode as gen_mod

    def broken(*_a, **_k):
        raise RuntimeError("Attempted to call function marked as skipped\nExplanation: the whole story")

    monkeypatch.setattr(gen_mod, "compiled_step_fns", lambda: (broken, broken))
    with caplog.at_level("WARNING", logger="hybridctl.generate"):
        res = generate(make_model(), [[1, 2, 3]], max_new_tokens=3, compile=True)
    assert res.extra["compile_error"] == "RuntimeError: Attempted to call function marked as skipped"
    assert [r.getMessage().endswith("-v shows why in full") for r in caplog.records] == [True]
    caplog.clear()
    with caplog.at_level("INFO", logger="hybridctl.generate"):
        generate(make_model(), [[1, 2, 3]], max_new_tokens=3, compile=True)
    full = [r for r in caplog.records if r.exc_info]
    assert len(full) == 1 and "Explanation: the whole story" in caplog.text and "Traceback" in caplog.text


def test_persistent_caches_default_under_the_hybridctl_cache_dir_and_keep_the_users(monkeypatch, tmp_path):
    from hybridctl.decode import persistent_caches

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_CACHE_AUTOTUNING", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HYBRIDCTL_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    got = persistent_caches()
    assert got == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c" / "inductor"),
                   "TRITON_CACHE_DIR": str(tmp_path / "mine"), "TRITON_CACHE_AUTOTUNING": "1"}
    monkeypatch.delenv("HYBRIDCTL_CACHE_DIR")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    got = persistent_caches()
    assert got["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "hybridctl" / "inductor")
    assert got["TRITON_CACHE_AUTOTUNING"] == "0"


def test_warm_prefill_changes_no_token_and_the_summary_reports_the_wait():
    model = make_model(pattern="M*-M", attention={"position": "rope"})
    prompts = [torch.randint(0, 384, (n,)).tolist() for n in (40, 7)]  # left-padded: the warm pass must not leak
    cold = generate(model, prompts, max_new_tokens=6, warm_prefill=False)
    warm = generate(model, prompts, max_new_tokens=6, warm_prefill=True)
    assert warm.tokens == cold.tokens and warm.extra["warm_prefill"] and not cold.extra["warm_prefill"]
    s = warm.summary()
    assert s["first_token_wall_s"] >= s["warmup_s"] + s["time_to_first_token_s"] and s["load_s"] >= 0
    assert s["time_to_first_token_s"] == warm.prefill_s
