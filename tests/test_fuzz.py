"""A fuzzer of our own (issue 18): hypothesis mutates valid fixtures of every format the readers accept and checks
the contract on each example.

Contract: either exit != 0 with exactly one non-empty stderr line ("hybridctl: error: ...", no traceback, no
"internal error"), or exit 0 with an output that the reader itself opens and validates; no payload ever executed (a
marker file proves it); nothing left at --out after a failure (not even a temporary sibling); the source untouched.

Seeded (``derandomize``: the same examples on every run), bounded (small ``max_examples``, in-process CliRunner),
and hypothesis prints the falsifying example on failure.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hybridctl.checkpoint import open_checkpoint
from hybridctl.checkpoint.megatron import write_megatron_dist, write_megatron_legacy
from hybridctl.checkpoint.native import save_model
from hybridctl.cli import app
from hybridctl.config import HybridctlError
from hybridctl.model import build_model, materialize
from hybridctl.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=20, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
_ids = itertools.count()


class Payload:
    """Unpickling this runs ``touch marker``: the marker's absence proves no payload executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tree(p: Path) -> dict[str, bytes]:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    cfg = tiny_config(pattern="*-M", vocab_size=300, d_model=32, mamba=dict(d_state=8, headdim=16, ngroups=2),
                      attention=dict(n_heads=2, n_kv_heads=1, head_dim=16), mlp=dict(hidden_size=32))
    native = save_model(materialize(build_model(cfg), "cpu", seed=0), base / "native", tokenizer=ByteTokenizer())
    sharded = save_model(materialize(build_model(cfg), "cpu", seed=0), base / "sharded", tokenizer=ByteTokenizer(),
                         max_shard_size=20_000)
    src = open_checkpoint(native)
    legacy = write_megatron_legacy(base / "legacy", src)
    dist = write_megatron_dist(base / "dist", src)
    r = runner.invoke(app, ["convert", str(native), "--to", "hf", "--out", str(base / "hf")])
    assert r.exit_code == 0, r.output
    return {"native": native, "sharded": sharded, "legacy": legacy, "dist": dist, "hf": base / "hf", "base": base}


def fresh(fixtures, name: str) -> tuple[Path, Path]:
    """A private copy of fixture ``name`` and an --out path next to it (both under a new directory)."""
    d = fixtures["base"] / f"case{next(_ids)}"
    d.mkdir()
    shutil.copytree(fixtures[name], d / "src", symlinks=True)
    return d / "src", d / "out"


def check_contract(args: list[str], src: Path, out: Path | None, marker: Path | None = None):
    before = tree(src) if src.is_dir() else None
    r = runner.invoke(app, [str(a) for a in args])
    if marker is not None:
        assert not marker.exists(), "a pickle payload was executed"
    if before is not None:
        assert tree(src) == before, "the source was modified"
    if r.exit_code != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, f"exit {r.exit_code}, stderr:\n{r.stderr}"
        assert lines[0].startswith("hybridctl: error: "), r.stderr
        assert "Traceback" not in r.output and "internal error" not in lines[0], r.stderr
        if out is not None:
            assert not out.exists(), f"{out} left behind after a failure"
            assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()), "temporary left behind"
    elif out is not None and out.exists():
        open_checkpoint(out)  # the reader validates what the writer wrote (names, shapes, dtypes against the config)
    return r


def convert_contract(src: Path, out: Path, marker: Path | None = None, to: str = "native"):
    return check_contract(["convert", src, "--to", to, "--out", out], src, out, marker)


# ---- value strategies ----------------------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2, 64]),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                         st.sampled_from(["64", "1e400", "-0", "nan"]))
json_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=3),
                        st.dictionaries(st.text(max_size=4), json_scalars, max_size=2))


def _dump(obj) -> str:
    return json.dumps(obj, allow_nan=True)


# ---- safetensors ---------------------------------------------------------------------------------------------------
def _header(path: Path) -> tuple[dict, bytes]:
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


field_mutation = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["I32", "I64", "BOOL", "U8", "I8", "F64", "F16", "BF16", "F8_E4M3",
                                                 "XX", ""])),
    st.tuples(st.just("shape"), st.lists(st.integers(-3, 2**40), max_size=4)),
    st.tuples(st.just("data_offsets"), st.lists(st.integers(-5, 2**34), min_size=0, max_size=3)),
    st.tuples(st.just("shape"), json_values), st.tuples(st.just("data_offsets"), json_values),
    st.tuples(st.just("dtype"), json_values),
)


@FUZZ
@given(which=st.integers(0, 1000), mutation=field_mutation)
def test_fuzz_safetensors_header(fixtures, which, mutation):
    src, out = fresh(fixtures, "native")
    f = src / "model.safetensors"
    header, data = _header(f)
    names = sorted(k for k in header if k != "__metadata__")
    header[names[which % len(names)]][mutation[0]] = mutation[1]
    _write_header(f, header, data)
    convert_contract(src, out)


@FUZZ
@given(pos=st.integers(0, 10**6), value=st.integers(0, 255), truncate=st.booleans())
def test_fuzz_safetensors_bytes(fixtures, pos, value, truncate):
    src, out = fresh(fixtures, "native")
    f = src / "model.safetensors"
    b = bytearray(f.read_bytes())
    pos %= len(b)
    if truncate:
        del b[pos:]
    else:
        b[pos] = value
    f.write_bytes(bytes(b))
    convert_contract(src, out)


# ---- index json, config.json (native and HF) -----------------------------------------------------------------------
@FUZZ
@given(which=st.integers(0, 1000), value=json_values, drop=st.booleans(), part=st.sampled_from(["weight_map", "top"]))
def test_fuzz_index_json(fixtures, which, value, drop, part):
    src, out = fresh(fixtures, "sharded")
    idx = src / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    if part == "weight_map":
        k = sorted(d["weight_map"])[which % len(d["weight_map"])]
        if drop:
            del d["weight_map"][k]
        else:
            d["weight_map"][k] = value
    else:
        d["weight_map" if drop else "metadata"] = value
    idx.write_text(_dump(d))
    convert_contract(src, out)


def _paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _paths(v, prefix + (k,))
    return out


@FUZZ
@given(which=st.integers(0, 10**4), value=json_values, fmt=st.sampled_from(["native", "hf"]))
def test_fuzz_config_json(fixtures, which, value, fmt):
    src, out = fresh(fixtures, fmt)
    f = src / "config.json"
    d = json.loads(f.read_text())
    paths = _paths(d["model"] if fmt == "native" else d)
    path = (("model",) if fmt == "native" else ()) + paths[which % len(paths)]
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    f.write_text(_dump(d))
    convert_contract(src, out)


@FUZZ
@given(text=st.one_of(st.text(max_size=30), st.sampled_from(["{", "[]", "null", "\"x\"", "{\"format\": 1}"])))
def test_fuzz_config_json_text(fixtures, text):
    src, out = fresh(fixtures, "native")
    (src / "config.json").write_text(text)
    convert_contract(src, out)


# ---- Megatron: args, pickles with payloads, tracker, torch_dist .metadata -----------------------------------------
arg_names = st.sampled_from(["hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "kv_channels",
                             "ffn_hidden_size", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim",
                             "mamba_num_heads", "norm_epsilon", "rotary_base", "rotary_percent", "vocab_size",
                             "padded_vocab_size", "position_embedding_type", "untie_embeddings_and_output_weights",
                             "group_query_attention", "normalization", "hybrid_override_pattern", "swiglu",
                             "hybridctl_vocab_size", "tensor_model_parallel_size"])
pickled_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=3), st.just("PAYLOAD"))


@FUZZ
@given(name=arg_names, value=pickled_values)
def test_fuzz_megatron_args(fixtures, name, value):
    src, out = fresh(fixtures, "legacy")
    marker = src.parent / "pwned"
    f = src / "release" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    setattr(obj["args"], name, Payload(marker) if value == "PAYLOAD" else value)
    torch.save(obj, f)
    convert_contract(src, out, marker)


@FUZZ
@given(where=st.sampled_from(["model", "top", "iteration", "args"]), value=pickled_values)
def test_fuzz_legacy_pickle(fixtures, where, value):
    src, out = fresh(fixtures, "legacy")
    marker = src.parent / "pwned"
    f = src / "release" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    v = Payload(marker) if value == "PAYLOAD" else value
    if where == "model":
        obj["model"]["decoder.final_norm.weight"] = v
    elif where == "top":
        obj["extra"] = v
    elif where == "args":
        obj["args"] = v
    else:
        obj["iteration"] = v
    torch.save(obj, f)
    convert_contract(src, out, marker)


@FUZZ
@given(text=st.one_of(st.text(max_size=12), st.sampled_from(["release", "0", "-1", "100", "1e3", "  7\n"])),
       fmt=st.sampled_from(["legacy", "dist"]))
def test_fuzz_tracker_file(fixtures, text, fmt):
    src, out = fresh(fixtures, fmt)
    (src / "latest_checkpointed_iteration.txt").write_text(text)
    convert_contract(src, out)


@FUZZ  # ~0.2 s an example: .metadata is read once per convert, every tensor through one DCP load
@given(pos=st.integers(0, 10**6), value=st.integers(0, 255), mode=st.sampled_from(["flip", "truncate", "payload"]))
def test_fuzz_dist_metadata(fixtures, pos, value, mode):
    src, out = fresh(fixtures, "dist")
    marker = src.parent / "pwned"
    f = src / "release" / ".metadata"
    b = bytearray(f.read_bytes())
    pos %= len(b)
    if mode == "flip":
        b[pos] = value
    elif mode == "truncate":
        del b[pos:]
    else:
        b = bytearray(pickle.dumps(Payload(marker)))
    f.write_bytes(bytes(b))
    convert_contract(src, out, marker)


dist_dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool, torch.uint8,
                                torch.float8_e4m3fn])
dist_field = st.one_of(
    st.tuples(st.just("dtype"), dist_dtypes),
    st.tuples(st.just("size"), st.lists(st.integers(0, 2**31), min_size=0, max_size=3)),
    st.tuples(st.just("chunk_offsets"), st.lists(st.integers(-2, 2**20), min_size=0, max_size=3)),
    st.tuples(st.just("item_offset"), st.integers(-10, 10**6)),
    st.tuples(st.just("item_length"), st.integers(-10, 10**6)),
    st.tuples(st.just("item_path"), st.sampled_from(["../../x", "missing.distcp", "", ".metadata", "common.pt"])),
)


@FUZZ
@given(which=st.integers(0, 1000), field=dist_field)
def test_fuzz_dist_metadata_fields(fixtures, which, field):
    """Structured lies in .metadata: a tensor's dtype, sizes, chunk offsets, its storage item's place in the data
    file. Each one is refused in one line (the declared dtype is checked against the stored item's own header), or
    the conversion is exact."""
    import dataclasses

    src, out = fresh(fixtures, "dist")
    f = src / "release" / ".metadata"
    md = pickle.loads(f.read_bytes())  # our own fixture
    keys = sorted(k for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks"))
    key = keys[which % len(keys)]
    tm = md.state_dict_metadata[key]
    kind, v = field
    idx = next(i for i in md.storage_data if i.fqn == key)
    if kind == "dtype":
        tm.properties = dataclasses.replace(tm.properties, dtype=v)
    elif kind == "size":
        tm.size = torch.Size(v)
        tm.chunks = [dataclasses.replace(c, sizes=torch.Size(v)) for c in tm.chunks]
    elif kind == "chunk_offsets":
        tm.chunks = [dataclasses.replace(c, offsets=torch.Size(v)) for c in tm.chunks]
    else:
        attr = {"item_offset": "offset", "item_length": "length", "item_path": "relative_path"}[kind]
        md.storage_data[idx] = dataclasses.replace(md.storage_data[idx], **{attr: v})
    f.write_bytes(pickle.dumps(md))
    r = convert_contract(src, out)
    if r.exit_code == 0:  # accepted: then it must be exact (nothing reinterpreted)
        a, b = open_checkpoint(fixtures["native"]), open_checkpoint(out)
        for n in a.specs:
            assert torch.equal(a.get(n), b.get(n)), n


# ---- recipe TOML ---------------------------------------------------------------------------------------------------
toml_values = st.one_of(st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=2))
recipe_keys = st.sampled_from(["optim.lr", "optim.steps", "optim.micro_batch", "optim.global_batch", "optim.eps",
                               "optim.warmup_steps", "optim.beta1", "optim.grad_clip", "data.seq_len", "seed",
                               "checkpoint.interval", "checkpoint.keep_last", "eval.batches", "model.config.d_model",
                               "model.config.norm_eps", "model.config.vocab_size", "model.config.mamba.ngroups",
                               "model.pattern", "logging.interval", "precision.dtype", "optim.bogus"])


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v > 0 else "-inf") if v in (float("inf"), float("-inf")) else repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml, v)) + "]"
    return json.dumps(v) if isinstance(v, str) else str(v)


@FUZZ
@given(key=recipe_keys, value=toml_values)
def test_fuzz_recipe(fixtures, key, value):
    """The recipe reader: one HybridctlError line, or a Recipe whose own dump reads back to the same recipe."""
    from hybridctl.recipe import dump_toml, load_recipe

    d = fixtures["base"] / f"recipe{next(_ids)}"
    d.mkdir()
    text = (ROOT / "recipes" / "tiny.toml").read_text()
    p = d / "r.toml"
    p.write_text(text)
    try:
        rec = load_recipe(p, [f"{key}={_toml(value)}"])
    except HybridctlError as e:
        assert "\n" not in str(e) and str(e)
        return
    (d / "back.toml").write_text(dump_toml(rec.to_dict()))
    assert load_recipe(d / "back.toml").to_dict() == rec.to_dict()


# ---- CLI values ----------------------------------------------------------------------------------------------------
cli_text = st.one_of(st.text(max_size=8), st.sampled_from(["inf", "-inf", "nan", "1e400", "-1", "0", "2.5", "5GB",
                                                            "-5GB", "0.5B", "1e-300KB", " ", "9" * 30]))


@FUZZ
@given(opt=st.sampled_from(["--shard-size", "--tp", "--pp", "--vocab-size", "--dtype", "--to", "--iteration",
                            "--hf-arch", "--megatron-keys"]), value=cli_text)
def test_fuzz_convert_options(fixtures, opt, value):
    src = fixtures["native"]
    out = fixtures["base"] / f"o{next(_ids)}"
    args = ["convert", src, "--out", out] + ([] if opt == "--to" else ["--to", "native"]) + [opt, value]
    check_contract(args, src, out)


@settings(FUZZ, max_examples=12)
@given(opt=st.sampled_from(["--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--seed",
                            "--max-new-tokens", "--dtype", "--state-dtype", "--prompt"]), value=cli_text)
def test_fuzz_generate_options(fixtures, opt, value):
    src = fixtures["native"]
    args = ["generate", src, "--max-new-tokens", "2", "--device", "cpu", "--no-compile"] + (
        [] if opt == "--prompt" else ["--prompt", "hi"]) + [opt, value]
    check_contract(args, src, None)


@FUZZ
@given(opt=st.sampled_from(["--preset", "--pattern", "--layers", "--attention-ratio", "--mlp-ratio", "--seed",
                            "--seq-len", "--dtype", "--set"]), value=cli_text)
def test_fuzz_build_options(fixtures, opt, value):
    check_contract(["build", "--json", opt, value], fixtures["native"], None)


# ---- the fuzzer's own contract: bounded, seeded, the failing example printed -----------------------------------------
def _fuzz_tests():
    return {n: f for n, f in globals().items() if n.startswith("test_fuzz_") and callable(f)}


def test_fuzzers_are_bounded_and_seeded():
    """Every fuzz test runs a fixed, small set of examples (derandomize: the same on every run, no example database)
    with no per-example deadline, so CI time is bounded and a failure reproduces."""
    tests = _fuzz_tests()
    assert len(tests) >= 14
    for name, f in tests.items():
        s = f._hypothesis_internal_use_settings
        assert s.derandomize and s.database is None and s.max_examples <= 20 and s.deadline is None, name


def test_a_failing_example_is_printed():
    """hypothesis reports the falsifying example (and, with print_blob, how to reproduce it) on failure."""
    @FUZZ
    @given(n=st.integers(0, 100))
    def prop(n):
        assert n < 7

    with pytest.raises(AssertionError) as e:
        prop()
    notes = "\n".join(getattr(e.value, "__notes__", []))
    assert "n=7" in notes and "reproduce_failure" in notes, notes  # the minimal example and its replay blob
