"""The layering rule of ARCHITECTURE.md, enforced on the source (every import, including those inside functions)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hybridctl"
WORKFLOWS = {"build", "train", "extend_context", "convert", "quantize", "generate", "bench"}  # one per verb
RANK = {
    "__init__": 0, "config": 0, "recipe": 0,
    "ref": 1, "kernels": 1, "triton_kernels": 1, "cpu_qkernels": 1,
    "blocks": 2, "model": 2, "sampling": 2,
    # the library below the workflows: checkpoints, the decode runtime and the inference module swaps, data, tasks,
    # evaluation and what bench / extend-context measure with
    "checkpoint": 3, "qlinear": 3, "cpu_decode": 3, "decode": 3, "parallel": 3, "data": 3, "corpora": 3,
    "tokenizer": 3, "tasks": 3, "evaluation": 3, "task_eval": 3, "plots": 3, "probes": 3,
    **{w: 4 for w in WORKFLOWS},
    "bench_report": 4,  # bench's JSON schema and tables (imports nothing of hybridctl; not a verb)
    "lm_eval_model": 5, "cli": 6, "__main__": 7,
}
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
                problems.append(f"{where}:{line} imports typer (only the cli package may)")
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


MODULE_LINES, FUNCTION_LINES = 600, 60  # ARCHITECTURE.md's house style
# A @triton.jit kernel is one fused unit (the quantized GEMV folds norm, dequant, activation and residual into one
# pass); splitting it into helper kernels changes codegen and needs a GPU re-validation, so it gets a looser cap.
KERNEL_LINES = 100


def _is_triton_kernel(node: ast.AST) -> bool:
    return any((isinstance(d, ast.Attribute) and d.attr in ("jit", "autotune")) or
               (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("jit", "autotune"))
               for d in getattr(node, "decorator_list", []))


def size_problems(where: str, text: str) -> list[str]:
    """A module over MODULE_LINES lines, each function (its `def` line to its last, nested ones too) over
    FUNCTION_LINES."""
    problems = []
    if len(text.splitlines()) > MODULE_LINES:
        problems.append(f"{where}: {len(text.splitlines())} lines (budget {MODULE_LINES})")
    for node in ast.walk(ast.parse(text, where)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            cap = KERNEL_LINES if _is_triton_kernel(node) else FUNCTION_LINES
            if n > cap:
                problems.append(f"{where}:{node.lineno} {node.name}: {n} lines (budget {cap})")
    return problems


def test_module_and_function_size_budgets():
    problems = [p for path in sorted(PKG.rglob("*.py"))
                for p in size_problems(path.relative_to(PKG.parent).as_posix(), path.read_text())]
    assert not problems, "split these:\n" + "\n".join(problems)


def test_size_budgets_catch_oversized_code():
    fits = "def f():\n" + "    x = 1\n" * (FUNCTION_LINES - 2) + "    return x\n"
    over = "class K:\n    async def g(self):\n" + "        y = 2\n" * FUNCTION_LINES
    assert size_problems("a.py", fits) == []
    assert size_problems("b.py", over) == [f"b.py:2 g: {FUNCTION_LINES + 1} lines (budget {FUNCTION_LINES})"]
    kernel = "@triton.jit\ndef k():\n" + "    z = 3\n" * (KERNEL_LINES - 1)
    assert size_problems("d.py", kernel) == []
    assert size_problems("e.py", kernel + "    z = 4\n") == [f"e.py:2 k: {KERNEL_LINES + 1} lines (budget {KERNEL_LINES})"]
    assert size_problems("c.py", "x = 1\n" * (MODULE_LINES + 1)) == [f"c.py: {MODULE_LINES + 1} lines (budget 600)"]
