"""The CLI through Typer's test runner: build summary/--json/--out, errors as one line, completion scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hybridctl.cli import SHELLS, app, completion_script

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_build_summary_hybrid_8b():
    r = runner.invoke(app, ["build", "--preset", "hybrid-8b"])
    assert r.exit_code == 0, r.output
    assert "8,654,517,248" in r.stdout and "M-M-M--M-M*-M-M-M-M--M*" in r.stdout
    assert "KV cache / token" in r.stdout


def test_build_json_from_ratios():
    r = runner.invoke(app, ["build", "--layers", "48", "--attention-ratio", "0.08", "--mlp-ratio", "0.5",
                            "--set", "d_model=256", "--set", "mlp.hidden_size=1024", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["pattern"] == "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-" and s["n_layers"] == 48
    assert s["params_total"] == sum(s["params_by_type"].values())
    assert set(s["params_by_type"]) >= {"mamba", "attention", "mlp", "embedding"}


def test_build_out_writes_loadable_checkpoint(tmp_path):
    r = runner.invoke(app, ["build", "--pattern", "M*-", "--seed", "3", "--out", str(tmp_path / "ck"), "--json"])
    assert r.exit_code == 0, r.output
    from hybridctl.checkpoint import load_model

    model, src = load_model(tmp_path / "ck")
    assert src.config.pattern == "M*-" and src.tokenizer_dir is not None
    assert json.loads(r.stdout)["out"] == str(tmp_path / "ck")


@pytest.mark.parametrize("args,needle", [
    (["build", "--pattern", "M*E"], "MoE layers ('E') are not supported yet"),
    (["build", "--preset", "nope"], "preset 'nope' is unknown"),
    (["build", "--set", "mamba.dstate=3"], "did you mean mamba.d_state"),
    (["build", "--pattern", "M", "--layers", "4"], "either --pattern or --layers"),
    (["build", "--set", "mamba.headdim=48"], "mamba.headdim"),
    (["completion", "tcsh"], "not supported"),
])
def test_errors_are_one_line_on_stderr(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    assert needle in r.stderr and r.stderr.startswith("hybridctl: error: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_build_refuses_existing_output(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("x")
    r = runner.invoke(app, ["build", "--out", str(tmp_path / "ck")])
    assert r.exit_code == 1 and "already exists" in r.stderr
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_scripts_are_current(shell):
    r = runner.invoke(app, ["completion", shell])
    assert r.exit_code == 0
    committed = (ROOT / "completions" / f"hybridctl.{shell}").read_text()
    assert r.stdout == committed == completion_script(shell), \
        f"completions/hybridctl.{shell} is stale: regenerate with `hybridctl completion {shell}`"


def test_completion_answers_at_run_time():
    env = {"_HYBRIDCTL_COMPLETE": "complete_bash", "COMP_WORDS": "hybridctl build --pre", "COMP_CWORD": "2",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "hybridctl"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert "--preset" in out.stdout.split()


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys; from typer.testing import CliRunner; from hybridctl.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported by --help'; print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for cmd in ("build", "train", "convert", "quantize", "generate", "bench", "completion", "extend-context"):
        assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-c", "import hybridctl, sys; assert 'torch' not in sys.modules"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_debug_env_shows_traceback(monkeypatch):
    monkeypatch.setenv("HYBRIDCTL_DEBUG", "1")
    r = runner.invoke(app, ["build", "--preset", "nope"])
    assert r.exit_code != 0 and r.exception is not None


_SEEN_AT_TORCH_IMPORT = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Spy())
from hybridctl.cli import main
sys.argv = ["hybridctl", "build", "--preset", "tiny", "--json"]
try:
    main()
finally:
    print("SEEN", seen)
"""


@pytest.mark.parametrize("user, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                            ({"GOMP_SPINCOUNT": "1000"}, None)])
def test_openmp_threads_sleep_unless_the_user_chose(user, expected):
    """main() sets OMP_WAIT_POLICY=PASSIVE before torch (and libgomp, which reads it once) is imported; a policy
    or spin count the user set is kept (benchmarks/bench_cpu.md: spinning costs 50x on shared cores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | user
    out = subprocess.run([sys.executable, "-c", _SEEN_AT_TORCH_IMPORT], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"SEEN [{expected!r}]" in out.stdout, out.stdout[-500:]
