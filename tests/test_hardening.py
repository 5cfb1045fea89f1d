"""Bad input, hardened (issue 18): one regression test per class, through the CLI (typer's CliRunner).

The contract (checked by ``assert_one_line_error``): exit != 0, exactly one non-empty stderr line starting
"hybridctl: error: ", no traceback, nothing left at --out, the source untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hybridctl import __version__
from hybridctl.checkpoint import open_checkpoint
from hybridctl.checkpoint.megatron import write_megatron_dist, write_megatron_legacy
from hybridctl.checkpoint.native import save_model
from hybridctl.cli import app
from hybridctl.model import build_model, materialize
from hybridctl.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def tree(p: Path) -> dict[str, bytes]:
    """Every file under p with its bytes (the 'source untouched' check)."""
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def assert_one_line_error(r, needle: str = "", code: int | None = None) -> str:
    assert r.exit_code != 0, r.output
    if code is not None:
        assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hybridctl: error: "), r.stderr
    assert "Traceback" not in r.output and "internal error" not in r.stderr, r.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def make_native(path: Path, **changes) -> Path:
    cfg = tiny_config(**{**dict(pattern="*-M", vocab_size=300, d_model=64, mamba=dict(d_state=8, headdim=16, ngroups=2),
                                attention=dict(n_heads=2, n_kv_heads=1, head_dim=24), mlp=dict(hidden_size=64)),
                         **changes})
    save_model(materialize(build_model(cfg), "cpu", seed=0), path, tokenizer=ByteTokenizer())
    return path


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    return make_native(tmp_path_factory.mktemp("h") / "native")


# ---- 1: --out may not be, lie in, or contain the source ------------------------------------------------------------

@pytest.mark.parametrize("where", ["parent", "same", "inside", "symlink-to-parent"])
def test_convert_force_never_deletes_the_source(tmp_path, where):
    src = make_native(tmp_path / "parent" / "src")
    before = tree(src)
    out = {"parent": tmp_path / "parent", "same": src, "inside": src / "sub"}.get(where)
    if where == "symlink-to-parent":
        (tmp_path / "link").symlink_to(tmp_path / "parent")
        out = tmp_path / "link"
    r = cli("convert", src, "--to", "native", "--out", out, "--force")
    assert_one_line_error(r, "source")
    assert tree(src) == before


def test_train_run_dir_may_not_contain_init_from(tmp_path):
    src = make_native(tmp_path / "runs" / "init")
    before = tree(src)
    r = cli("train", ROOT / "recipes" / "tiny.toml", "--init-from", src, "--run-dir", tmp_path / "runs",
            "--device", "cpu")
    assert_one_line_error(r, "--run-dir")
    assert tree(src) == before


def test_quantize_out_may_not_be_in_or_around_the_source(tmp_path):
    src = make_native(tmp_path / "parent" / "src")
    before = tree(src)
    for out in (src, src / "sub", tmp_path / "parent"):
        assert_one_line_error(cli("quantize", src, "--out", out, "--eval-data", "none"))
    assert tree(src) == before and not (src / "sub").exists()


# ---- 2: integer weights -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_integer_weight_refused_native(tmp_path, native, dtype):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in native.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(bad / "model.safetensors")
    sd["norm_f.weight"] = sd["norm_f.weight"].to(dtype)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    r = cli("convert", bad, "--to", "native", "--out", tmp_path / "out")
    assert_one_line_error(r, "floating-point")
    assert not (tmp_path / "out").exists()


def test_integer_weight_refused_megatron(tmp_path, native):
    out = write_megatron_legacy(tmp_path / "meg", open_checkpoint(native))
    f = out / "release" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    obj["model"]["decoder.final_norm.weight"] = obj["model"]["decoder.final_norm.weight"].to(torch.int64)
    torch.save(obj, f)
    assert_one_line_error(cli("convert", out, "--to", "native", "--out", tmp_path / "o"), "floating-point")
    assert not (tmp_path / "o").exists()


# ---- 3: metadata contradicting the data ---------------------------------------------------------------------------

def _legacy_edit(tmp_path: Path, native: Path, edit) -> Path:
    out = write_megatron_legacy(tmp_path / "meg", open_checkpoint(native))
    f = out / "release" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    edit(obj)
    torch.save(obj, f)
    return out


def test_megatron_tied_args_with_a_different_output_layer_refused(tmp_path, native):
    def edit(obj):
        obj["args"].untie_embeddings_and_output_weights = False
        obj["model"].pop("output_layer.weight", None)
        obj["model"]["output_layer.weight"] = obj["model"]["embedding.word_embeddings.weight"] + 1

    out = _legacy_edit(tmp_path, native, edit)
    line = assert_one_line_error(cli("convert", out, "--to", "native", "--out", tmp_path / "o"), "tied")
    assert "output_layer.weight" in line and "embedding.word_embeddings.weight" in line


def test_megatron_learned_absolute_without_tensor_refused(tmp_path, native):
    def edit(obj):
        obj["args"].position_embedding_type = "learned_absolute"

    out = _legacy_edit(tmp_path, native, edit)
    assert_one_line_error(cli("convert", out, "--to", "native", "--out", tmp_path / "o"), "learned_absolute")


def _dist_metadata_edit(tmp_path: Path, native: Path, key: str, **changes) -> Path:
    import dataclasses
    import pickle

    out = write_megatron_dist(tmp_path / "meg", open_checkpoint(native))
    f = out / "release" / ".metadata"
    md = pickle.loads(f.read_bytes())  # our own file, written a moment ago
    tm = md.state_dict_metadata[key]
    if "dtype" in changes:
        tm.properties = dataclasses.replace(tm.properties, dtype=changes["dtype"])
    if "size" in changes:
        tm.size = torch.Size(changes["size"])
        tm.chunks = [dataclasses.replace(c, sizes=torch.Size(changes["size"])) for c in tm.chunks]
    f.write_bytes(pickle.dumps(md))
    return out


@pytest.mark.parametrize("key,dtype", [("decoder.final_norm.weight", torch.float16),
                                       ("embedding.word_embeddings.weight", torch.bfloat16),
                                       ("decoder.layers.2.mixer.in_proj.weight.x", torch.float64)])
def test_dist_metadata_dtype_contradicting_the_data_refused(tmp_path, native, key, dtype):
    """A torch_dist .metadata declaring a float32 tensor as float16 (DCP would copy the stored values into the
    declared dtype, silently rounded) is refused, naming both sides."""
    out = _dist_metadata_edit(tmp_path, native, key, dtype=dtype)
    before = tree(out)
    for to in ("native", "hf"):
        line = assert_one_line_error(cli("convert", out, "--to", to, "--out", tmp_path / "o"), key)
        assert f"declares {str(dtype)[6:]}" in line and "stores float32" in line, line
        assert not (tmp_path / "o").exists()
    assert tree(out) == before


def test_dist_metadata_size_larger_than_the_data_refused(tmp_path, native):
    out = _dist_metadata_edit(tmp_path, native, "decoder.final_norm.weight", size=[128])
    line = assert_one_line_error(cli("convert", out, "--to", "native", "--out", tmp_path / "o"), "final_norm")
    assert "128" in line, line
    assert not (tmp_path / "o").exists()


# ---- 4: tokenizer larger than the vocab ---------------------------------------------------------------------------

def test_vocab_size_below_the_tokenizer_refused(tmp_path, native):
    r = cli("convert", native, "--to", "native", "--vocab-size", "200", "--out", tmp_path / "o")
    assert_one_line_error(r, "tokenizer has 259 ids")
    assert not (tmp_path / "o").exists()


def test_generate_prompt_ids_outside_the_model_vocab(tmp_path, native):
    from hybridctl.config import HybridctlError
    from hybridctl.generate import generate

    model = materialize(build_model(tiny_config(vocab_size=200, d_model=64, pattern="M",
                                                mamba=dict(d_state=8, headdim=16, ngroups=2))), "cpu", seed=0)
    with pytest.raises(HybridctlError, match="outside the model's vocabulary"):
        generate(model, ["hi"], tokenizer=ByteTokenizer(), max_new_tokens=1)


def test_checkpoint_whose_tokenizer_exceeds_its_vocab_refused_by_every_writer_and_generate(tmp_path):
    """A checkpoint (vocab 200) carrying the byte tokenizer (259 ids): every writer and generate's prompt encoding
    refuse it in one line, where generate used to die with 'internal error: IndexError'."""
    import shutil

    small = tmp_path / "v200"
    save_model(materialize(build_model(tiny_config(vocab_size=200, d_model=64, pattern="M",
                                                   mamba=dict(d_state=8, headdim=16, ngroups=2))), "cpu", seed=0),
               small)
    donor = make_native(tmp_path / "v300")
    meta = json.loads((small / "config.json").read_text())
    meta["tokenizer"] = json.loads((donor / "config.json").read_text())["tokenizer"]
    (small / "config.json").write_text(json.dumps(meta))
    for f in donor.iterdir():
        if "tokenizer" in f.name:
            shutil.copy(f, small / f.name)
    before = tree(small)
    for to in ("native", "hf", "megatron", "megatron-legacy"):
        assert_one_line_error(cli("convert", small, "--to", to, "--out", tmp_path / "o"), "259")
        assert not (tmp_path / "o").exists()
    line = assert_one_line_error(cli("generate", small, "-p", "hi", "--max-new-tokens", "2", "--no-compile"))
    assert "outside the model's vocabulary" in line and "IndexError" not in line
    assert tree(small) == before


# ---- 5: numbers ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf(tmp_path_factory, native) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert cli("convert", native, "--to", "hf", "--out", out).exit_code == 0
    return out


@pytest.mark.parametrize("key,raw", [("hidden_size", '"64"'), ("hidden_size", "64.9"), ("n_groups", "2.5"),
                                     ("vocab_size", "260.7"), ("hidden_size", "null"), ("hidden_size", "[64]"),
                                     ("layer_norm_epsilon", "1e400"), ("initializer_range", "NaN"),
                                     ("hidden_size", "true"), ("vocab_size", "-3")])
def test_hf_config_numbers_validated(tmp_path, hf, key, raw):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    text = (bad / "config.json").read_text()
    c = json.loads(text)
    assert key in c
    c[key] = "@@"
    (bad / "config.json").write_text(json.dumps(c).replace('"@@"', raw))
    r = cli("convert", bad, "--to", "native", "--out", tmp_path / "o")
    assert_one_line_error(r, key)


@pytest.mark.parametrize("value", [2.5, "8", True, None, float("inf")])
def test_megatron_args_numbers_validated(tmp_path, native, value):
    def edit(obj):
        obj["args"].mamba_num_groups = value
        obj["args"].hidden_size = value if value is not None else None

    out = _legacy_edit(tmp_path, native, edit)
    assert_one_line_error(cli("convert", out, "--to", "native", "--out", tmp_path / "o"), "hidden_size")


@pytest.mark.parametrize("sets,needle", [(["optim.lr=inf"], "finite"), (["optim.lr=nan"], "finite"),
                                         (["model.config.norm_eps=inf"], "finite"),
                                         (["model.config.d_model=64.5"], "d_model"),
                                         (["optim.steps=2.5"], "optim.steps")])
def test_recipe_numbers_validated(tmp_path, sets, needle):
    args = ["train", ROOT / "recipes" / "tiny.toml", "--run-dir", tmp_path / "run", "--device", "cpu"]
    for s in sets:
        args += ["--set", s]
    assert_one_line_error(cli(*args), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["generate", "CK", "-p", "x", "--temperature", "inf"], "--temperature"),
    (["generate", "CK", "-p", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "CK", "-p", "x", "--max-new-tokens", "100000000000"], "--max-new-tokens"),
    (["generate", "CK", "-p", "x", "--seed", "-1"], "--seed"),
    (["convert", "CK", "--to", "megatron-legacy", "--tp", "0", "--out", "OUT"], "--tp"),
    (["convert", "CK", "--to", "native", "--shard-size", "-5GB", "--out", "OUT"], "shard size"),
    (["convert", "CK", "--to", "native", "--shard-size", "infGB", "--out", "OUT"], "shard size"),
    (["convert", "CK", "--to", "native", "--shard-size", "0", "--out", "OUT"], "shard size"),
    (["build", "--seed", "-3"], "--seed"),
])
def test_cli_numbers_validated(tmp_path, native, args, needle):
    args = [str(native) if a == "CK" else str(tmp_path / "o") if a == "OUT" else a for a in args]
    assert_one_line_error(cli(*args), needle)
    assert not (tmp_path / "o").exists()


def test_cli_int_options_refuse_floats_as_one_line(native):
    r = cli("generate", native, "-p", "x", "--max-new-tokens", "2.5")
    line = assert_one_line_error(r, "--max-new-tokens", code=2)
    assert "--help" in line


# ---- 6: the one-line promise --------------------------------------------------------------------------------------

def test_usage_error_is_one_line(tmp_path):
    line = assert_one_line_error(cli("convert", "x", "--bogus"), "--bogus", code=2)
    assert "hybridctl convert --help" in line
    assert_one_line_error(cli("convert"), "src", code=2)


def test_bad_dcp_metadata_is_one_line_on_convert_and_resume(tmp_path, native):
    out = write_megatron_dist(tmp_path / "meg", open_checkpoint(native))
    (out / "release" / ".metadata").write_bytes(b"\x80\x04garbage")
    assert_one_line_error(cli("convert", out, "--to", "native", "--out", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("raw", [b"\x80\x02Nr\xff\xff\xff\x7f.",  # memo index 2**31: MemoryError
                                 b"\x80\x02]q\x00(K\x01e\x8e\xff\xff\xff\xff\xff\xff\xff\x7f"])  # OverflowError
def test_dcp_metadata_with_absurd_lengths_names_the_file(tmp_path, native, raw):
    out = write_megatron_dist(tmp_path / "meg", open_checkpoint(native))
    (out / "release" / ".metadata").write_bytes(raw)
    line = assert_one_line_error(cli("convert", out, "--to", "native", "--out", tmp_path / "o"), ".metadata")
    assert "MemoryError" not in line and "Overflow" not in line


def test_bad_dcp_metadata_is_one_line_on_train_resume(tmp_path):
    """train --resume meets a damaged .metadata (garbage, empty, a pickle payload, a flipped byte): one line each (DCP
    logs its own traceback on the root logger; it must not reach the user), no payload run, the checkpoint as it
    was."""
    import pickle
    import shutil

    small = ["data.seq_len=32", "optim.micro_batch=1", "optim.global_batch=1", "optim.steps=2", "eval.batches=1",
             "eval.interval=100", "checkpoint.interval=1", "checkpoint.export=false", "logging.progress=false"]
    args = ["train", ROOT / "recipes" / "tiny.toml", "--device", "cpu", "--run-dir", tmp_path / "run"]
    for x in small:
        args += ["--set", x]
    r = cli(*args, "--max-steps", "1")
    assert r.exit_code == 0, r.output
    good = next((tmp_path / "run").glob("checkpoints/step_*"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    flipped = bytearray((good / ".metadata").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    for i, damage in enumerate([b"\x80\x04garbage", b"", pickle.dumps(Payload()), bytes(flipped)]):
        ckpt = tmp_path / f"bad{i}" / good.name
        shutil.copytree(good, ckpt)
        (ckpt / ".metadata").write_bytes(damage)
        before = tree(ckpt)
        assert_one_line_error(cli(*args, "--resume", ckpt))
        assert not marker.exists() and tree(ckpt) == before


def test_malformed_files_and_os_errors_name_the_file(tmp_path, native):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert_one_line_error(cli("convert", bad, "--to", "native", "--out", tmp_path / "o"), "config.json")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_one_line_error(cli("convert", tmp_path / "dangling", "--to", "native", "--out", tmp_path / "o"),
                          "dangling")
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(cli("convert", native, "--to", "native", "--out", tmp_path / "afile" / "sub"), "afile")
    toml = tmp_path / "r.toml"
    toml.write_text("[optim\nsteps = 1")
    assert_one_line_error(cli("train", toml), "r.toml")
    toml.write_bytes(b"\xff\xfe")
    assert_one_line_error(cli("train", toml), "r.toml")
    pf = tmp_path / "p.txt"
    pf.write_bytes(b"\xff\xfehello")
    assert_one_line_error(cli("generate", native, "--prompt-file", pf), "UTF-8")
    assert not (tmp_path / "o").exists()


def test_unreadable_file_is_one_line(tmp_path, native, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in native.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "model.safetensors"
    if os.geteuid() == 0:  # root (CI) reads a chmod-0 file: the OS error it would raise, raised where it would be
        import hybridctl.checkpoint.io as io

        real = io.safe_open

        def denied(path, *a, **k):
            if path == str(shard):
                raise PermissionError(13, "Permission denied", path)
            return real(path, *a, **k)

        monkeypatch.setattr(io, "safe_open", denied)
    shard.chmod(0)
    try:
        assert_one_line_error(cli("convert", bad, "--to", "native", "--out", tmp_path / "o"), "model.safetensors")
    finally:
        shard.chmod(0o644)
    assert not (tmp_path / "o").exists()


# ---- 7: train cleans up the run directory it created --------------------------------------------------------------

def test_failed_train_removes_only_the_run_dir_it_created(tmp_path):
    args = ["train", ROOT / "recipes" / "tiny.toml", "--device", "cpu", "--set", "tokenizer.name=/no/such/tokenizer"]
    rd = tmp_path / "new-run"
    assert_one_line_error(cli(*args, "--run-dir", rd))
    assert not rd.exists()
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    assert_one_line_error(cli(*args, "--run-dir", old))
    assert (old / "keep.txt").read_text() == "mine"


def test_build_out_checks_memory_before_allocating(tmp_path, monkeypatch):
    """build --out of a model larger than the machine's RAM is refused up front (nothing allocated, nothing at
    --out), with the figures and the override; --skip-memory-check overrides it."""
    import hybridctl.build as b

    def boom(*a, **k):
        raise AssertionError("the model was allocated before the memory check")

    monkeypatch.setattr(b, "available_memory", lambda: 2**30)  # 1 GiB free, whatever this machine has
    monkeypatch.setattr("hybridctl.model.materialize", boom)
    line = assert_one_line_error(cli("build", "--preset", "hybrid-8b", "--out", tmp_path / "big"), "RAM")
    assert "GiB" in line and "1.0 GiB available" in line and "--skip-memory-check" in line
    assert not (tmp_path / "big").exists()
    assert b.build_memory(b.resolve_config(preset="hybrid-8b"), "bfloat16", "5GB") > 8e9 * 4
    monkeypatch.undo()
    monkeypatch.setattr(b, "available_memory", lambda: 1000)  # a tiny build: refused too, then overridden
    assert_one_line_error(cli("build", "--out", tmp_path / "tiny"), "--skip-memory-check")
    r = cli("build", "--out", tmp_path / "tiny", "--skip-memory-check")
    assert r.exit_code == 0, r.output
    open_checkpoint(tmp_path / "tiny")


def test_build_out_checks_disk_before_writing(tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    line = assert_one_line_error(cli("build", "--out", tmp_path / "o"), "disk")
    assert str(tmp_path) in line
    assert not (tmp_path / "o").exists()


# ---- 8: --version, version + device + dtype in --json -------------------------------------------------------------

def test_version_and_json_facts(tmp_path, native):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"hybridctl {__version__}"
    for args in (["build", "--json"], ["convert", native, "--to", "hf", "--dry-run", "--json"],
                 ["generate", native, "-p", "hi", "--max-new-tokens", "2", "--no-compile", "--json"],
                 ["quantize", native, "--dry-run", "--eval-data", "none", "--json"]):
        r = cli(*args)
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["hybridctl_version"] == __version__ and d["device"] and d["dtype"] in ("float32", "bfloat16", "int8")
