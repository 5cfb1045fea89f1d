"""The layering rule of ARCHITECTURE.md, enforced on the source (every import, including those inside functions)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hybridctl"
WORKFLOWS = {"build", "train", "extend_context", "convert", "quantize", "generate"}
RANK = {
    "__init__": 0, "config": 0, "recipe": 0,
    "ref": 1, "kernels": 1, "triton_kernels": 1, "cpu_qkernels": 1,
    "blocks": 2, "model": 2, "sampling": 2,
    "checkpoint": 3, "qlinear": 3, "cpu_decode": 3, "decode": 3, "parallel": 3, "data": 3, "corpora": 3, "tokenizer": 3, "tasks": 3,
    "evaluation": 3,
    **{w: 4 for w in WORKFLOWS},
    "bench": 5, "lm_eval_model": 5, "cli": 6, "__main__": 7,
}
RANK.update(task_eval=3, plots=3, probes=3, bench_report=5)  # bench's library parts (issue 16)
KERNEL_LIBS = {"mamba_ssm", "causal_conv1d", "flash_attn"}


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        yield rel.parts, ast.parse(path.read_text(), str(path))


def imported(tree: ast.AST, parts: tuple[str, ...]):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package path
                base = ["hybridctl", *parts[:-node.level]] if node.level <= len(parts) else ["hybridctl"]
                yield ".".join(base + ([node.module] if node.module else [])), node.lineno
            else:
                yield node.module or "", node.lineno


def owner(parts: tuple[str, ...]) -> str:
    return parts[0] if parts[0] != "__init__" or len(parts) == 1 else parts[0]


def test_every_module_has_a_layer():
    unknown = [".".join(p) for p, _ in modules() if owner(p) not in RANK]
    assert not unknown, f"add these modules to the layer map in tests/test_layering.py: {unknown}"


def test_imports_respect_the_layers():
    problems = []
    for parts, tree in modules():
        me = owner(parts)
        where = "/".join(parts) + ".py"
        for name, line in imported(tree, parts):
            top = name.split(".")[0]
            if top in KERNEL_LIBS and me != "kernels":
                problems.append(f"{where}:{line} imports {name} (only kernels.py may)")
            if (top == "triton" and me != "triton_kernels") or (name.endswith("triton_kernels") and me != "kernels"):
                problems.append(f"{where}:{line} imports {name} (triton only in triton_kernels.py, which only "
                                "kernels.py imports)")
            if top == "typer" and me != "cli":
                problems.append(f"{where}:{line} imports typer (only cli.py may)")
            if top == "safetensors" and me != "checkpoint":
                problems.append(f"{where}:{line} imports safetensors (only checkpoint/ may)")
            if name.startswith("torch.distributed") and me not in ("parallel", "train", "checkpoint"):
                problems.append(f"{where}:{line} imports {name} (process groups live in parallel/train/checkpoint)")
            if top != "hybridctl" or name == "hybridctl":
                continue
            target = name.split(".")[1]
            if target not in RANK:
                continue
            if target in WORKFLOWS and me in WORKFLOWS and target != me:
                problems.append(f"{where}:{line} imports workflow {target} (workflows never import each other)")
            elif RANK[target] > RANK[me]:
                problems.append(f"{where}:{line} imports {target} from a higher layer")
    assert not problems, "\n".join(problems)


def test_config_and_package_root_are_torch_free():
    for parts, tree in modules():
        if owner(parts) in ("config", "recipe") or parts == ("__init__",):
            names = [n for n, _ in imported(tree, parts)]
            assert not any(n.split(".")[0] == "torch" for n in names), f"{'/'.join(parts)} imports torch"
