"""One load path (meta → the config's module swaps → specs checked against that model → materialise, casting
floating tensors only), the shared checkpoint types in checkpoint/source.py, the writer table, and the tokenizer
file lists in tokenizer.py only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hybridctl import qlinear as Q
from hybridctl.checkpoint import Source, load_model, open_checkpoint
from hybridctl.checkpoint.native import save_model
from hybridctl.checkpoint.writers import WRITERS, WriteOptions
from hybridctl.config import HybridctlError
from hybridctl.convert import TARGETS, convert
from hybridctl.model import build_model, materialize
from hybridctl.tokenizer import TOKENIZER_FILES, TOKENIZER_MARKERS, ByteTokenizer

PKG = Path(__file__).resolve().parents[1] / "hybridctl"
MODULES = ["layers.0.mixer.in_proj", "layers.1.mixer.q_proj"]


def _quantized_checkpoint(tmp_path: Path, method: str = "int8") -> tuple[Path, torch.nn.Module]:
    model = materialize(build_model(tiny_config(pattern="M*-M")), "cpu", seed=0).eval()
    for name in MODULES:
        Q.set_submodule(model, name, Q.from_linear(model.get_submodule(name), method, 32))
    section = {"method": method, "group_size": 32 if method == "int4" else None, "modules": MODULES}
    return save_model(model, tmp_path / "q", tokenizer=ByteTokenizer(), extra={"quantization": section}), model


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_checkpoint_loads_through_the_one_path(tmp_path, method):
    out, model = _quantized_checkpoint(tmp_path, method)
    loaded, src = load_model(out, dtype=torch.bfloat16)
    assert isinstance(src, Source) and src.quantization["modules"] == MODULES and src.validated
    for name in MODULES:
        assert type(loaded.get_submodule(name)) is type(model.get_submodule(name))
    sd = loaded.state_dict()
    ints = {k for k, v in model.state_dict().items() if not v.dtype.is_floating_point}
    assert ints and all(sd[k].dtype == model.state_dict()[k].dtype for k in ints)  # integers keep their dtype
    assert all(v.dtype == torch.bfloat16 for k, v in sd.items() if k not in ints)  # floating tensors cast
    loaded32, _ = load_model(out)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded32(ids), model(ids))


def test_the_specs_are_checked_against_the_swapped_model(tmp_path):
    out, _ = _quantized_checkpoint(tmp_path)
    src = open_checkpoint(out)
    src.validated = False  # as a reader that did not check would leave it
    src.info = dict(src.info, quantization=dict(src.quantization, modules=MODULES[:1]))
    with pytest.raises(HybridctlError, match="missing tensor 'layers.1.mixer.q_proj.weight'"):
        load_model(src)


def test_convert_is_a_table_lookup(tmp_path):
    assert tuple(WRITERS) == TARGETS
    model = materialize(build_model(tiny_config()), "cpu", seed=0).eval()
    src = open_checkpoint(save_model(model, tmp_path / "n", tokenizer=ByteTokenizer()))
    for to, writer in WRITERS.items():
        plan = writer.plan(src, WriteOptions())
        assert plan.n_tensors >= len(src.specs) and plan.nbytes > 0 and plan.units() >= 1, to
        res = convert(src=tmp_path / "n", to=to, out=None, dry_run=True)
        assert (res.n_tensors, res.nbytes, res.arch) == (plan.n_tensors, plan.nbytes, plan.arch), to


def test_no_not_supported_yet_branches_hide_import_errors():
    for path in [PKG / "convert.py", PKG / "checkpoint" / "__init__.py"]:
        tree = ast.parse(path.read_text())
        caught = [h for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and isinstance(h.type, ast.Name)
                  and h.type.id == "ImportError"]
        assert not caught, f"{path.name}: except ImportError at line {caught[0].lineno}"


def test_tokenizer_file_names_live_in_tokenizer_py_only():
    names = set(TOKENIZER_FILES) | set(TOKENIZER_MARKERS)
    assert set(TOKENIZER_MARKERS) <= set(TOKENIZER_FILES)
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "tokenizer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                strs = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
                if len(set(strs) & names) >= 2:
                    offenders.append(f"{path.relative_to(PKG)}:{node.lineno}")
    assert not offenders, f"tokenizer file-name lists outside tokenizer.py: {offenders}"
