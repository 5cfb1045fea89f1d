"""convert QUANTIZED --to hf: the compressed-tensors pack-quantized layout, loaded by transformers (NemotronH and
Mamba2, AutoModelForCausalLM) + compressed-tensors on CPU, gives hybridctl's logits; the packed tensors decompress
through compressed-tensors' own compressor to hybridctl's dequantized weights; Megatron targets refuse."""

import json

import pytest
import torch
from safetensors import safe_open

from hybridctl import qlinear as Q
from hybridctl.checkpoint import load_model
from hybridctl.checkpoint.native import save_model
from hybridctl.config import HybridctlError
from hybridctl.convert import convert
from hybridctl.model import build_model, materialize
from hybridctl.quantize import quantize
from hybridctl.tokenizer import ByteTokenizer
from tests.conftest import tiny_config

pytest.importorskip("compressed_tensors")


def _src(path, **cfg):
    torch.manual_seed(0)
    model = materialize(build_model(tiny_config(**cfg)), "cpu")
    with torch.no_grad():  # weights of a trained scale, so quantization is not a no-op on tiny random values
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    save_model(model, path, tokenizer=ByteTokenizer())
    return path


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as r:
            out |= {k: r.get_tensor(k) for k in r.keys()}
    return out


@pytest.mark.parametrize("method,cfg,policy", [
    ("int4", {}, "default"),
    ("int8", {}, "aggressive"),
    ("int4", {"pattern": "MMM", "tie_embeddings": False}, "default"),  # Mamba2ForCausalLM
])
def test_compressed_tensors_export_loads_in_transformers_with_our_logits(tmp_path, method, cfg, policy):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from transformers import AutoModelForCausalLM

    src = _src(tmp_path / "src", **cfg)
    q, hf = tmp_path / "q", tmp_path / "hf"
    res = quantize(source=src, out=q, method=method, group_size=32, policy=policy, include_head=True, eval_data=None)
    r = convert(src=q, to="hf", out=hf)
    assert r.arch == ("mamba2" if cfg else "nemotron_h")
    qc = json.loads((hf / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"]) == ((8, True, "channel") if method == "int8"
                                                               else (4, True, "group"))
    kept_linears = {n for n, m in build_model(tiny_config(**cfg)).named_modules()
                    if type(m) is torch.nn.Linear} - set(res.modules)
    assert len(qc["ignore"]) == len(kept_linears) and ("lm_head" in qc["ignore"]) == ("lm_head" in kept_linears)

    qmodel, qsrc = load_model(q, dtype=torch.float32)
    tensors = _tensors(hf)
    scheme = __import__("compressed_tensors").quantization.QuantizationScheme.model_validate(
        qc["config_groups"]["group_0"])
    for mod in res.modules:  # the library's own decompression gives our dequantized weight, bit for bit
        name = ("backbone." + mod if mod != "lm_head" else mod)
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32 and f"{name}.weight" not in tensors
        sd = {k: tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        dense = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        assert torch.equal(dense.float(), qmodel.get_submodule(mod).dequantized_weight(torch.float32)), mod

    kw = {}
    if cfg:  # transformers' Mamba2 _init_weights reads every mixer's out_proj.weight, which a compressed
        # (run_compressed) module no longer has: Mamba2 loads through compressed-tensors' dequantize-on-load route
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    back = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32, **kw).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = qmodel(ids), back(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    dense_src = load_model(src, dtype=torch.float32)[0]
    with torch.no_grad():  # and it is the quantized model, not the source
        assert (dense_src(ids) - theirs).abs().max().item() > 1e-3


def test_quantized_source_refuses_megatron_in_one_line(tmp_path, capsys):
    from hybridctl.cli import app
    from typer.testing import CliRunner

    q = tmp_path / "q"
    quantize(source=_src(tmp_path / "src"), out=q, method="int8", eval_data=None)
    for to in ("megatron", "megatron-legacy"):
        with pytest.raises(HybridctlError, match=f"cannot be converted to {to}"):
            convert(src=q, to=to, out=tmp_path / to)
        assert not (tmp_path / to).exists()
    res = CliRunner().invoke(app, ["convert", str(q), "--to", "megatron", "--out", str(tmp_path / "m")])
    assert res.exit_code != 0 and "Traceback" not in res.output and not (tmp_path / "m").exists()


def test_compressed_dry_run_writes_nothing_and_counts_packed_bytes(tmp_path):
    src = _src(tmp_path / "src")
    q = tmp_path / "q"
    quantize(source=src, out=q, method="int4", group_size=32, eval_data=None)
    dense = convert(src=src, to="hf", out=None, dry_run=True)
    packed = convert(src=q, to="hf", out=tmp_path / "hf", dry_run=True)
    assert not (tmp_path / "hf").exists()
    assert packed.nbytes < dense.nbytes and any("compressed-tensors" in n for n in packed.notes)
    assert Q.METHODS  # the module under test is importable alongside
