"""GPU generate speed as a user gets it: the ``hybridctl`` command in fresh processes, beside the in-process figure.

    python benchmarks/generate_cli_gpu.py                    # hybrid-1.3b bf16, batch 1, prompts 1K/6.5K/16K
    python benchmarks/generate_cli_gpu.py --lengths 6520 --runs 2

1. ``hybridctl build --preset hybrid-1.3b --dtype bfloat16 --out DIR`` (timed, its own process);
2. per prompt length, ``hybridctl generate DIR --prompt-file F --max-new-tokens 256 --ignore-eos --json -v`` in a
   fresh process each time, ``--runs`` times. The compilers' caches (HYBRIDCTL_CACHE_DIR, Inductor, Triton and its
   autotuning results) start empty in a folder of this run, so the very first call is a first-ever call (cold
   caches: Triton JIT, autotuning, Inductor) and the later ones show what every later user call costs;
3. ``in-process``: the same checkpoint, one process, generate() twice at each length (the second call's figures:
   what benchmarks/generate_gpu.py reports), run in a child process so it shares nothing with the CLI calls.

Per row: process wall time, load, warm-up (compile + graph capture), TTFT (= prefill + first sample), the wall
time to the first token (load + warm-up + prefill), prefill and decode tokens/s, whether the compiled step was
taken, and any WARNING line the command printed. JSON to $OUT/generate_cli_gpu.json (or --json-out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIELDS = ["compiled", "cuda_graph", "backend", "prompt_tokens", "warmup_s", "load_s", "time_to_first_token_s",
          "first_token_wall_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_steps", "compile_error"]
COLS = ["mode", "prompt", "call", "wall_s", "load_s", "warmup_s", "time_to_first_token_s", "first_token_wall_s",
        "prefill_tokens_per_s", "decode_tokens_per_s", "compiled", "warnings"]
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we can has model state token layer").split()


def prompt_text(n: int, seed: int) -> str:
    """n bytes of word salad: n tokens for the byte tokenizer (plus its BOS, if any)."""
    rng, s = random.Random(seed), []
    while sum(map(len, s)) < n:
        s.append(rng.choice(WORDS) + " ")
    return "".join(s)[:n]


def child_env(cache_dir: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYBRIDCTL_CACHE_DIR=cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_CACHE_AUTOTUNING"):
        env.pop(var, None)  # hybridctl's own defaults under HYBRIDCTL_CACHE_DIR, as for a user who set nothing
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float) -> tuple[dict, str, float, int]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "hybridctl", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    try:
        out = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {}
    return out, p.stderr, wall, p.returncode


def cli_row(ckpt: str, prompt_file: str, length: int, call: str, env: dict, new_tokens: int, log_dir: str) -> dict:
    out, err, wall, rc = run_cli(["generate", ckpt, "--prompt-file", prompt_file, "--max-new-tokens",
                                  str(new_tokens), "--ignore-eos", "--json", "-v"], env, timeout=900)
    with open(os.path.join(log_dir, f"cli_L{length}_{call}.err"), "w") as f:
        f.write(err)
    warnings = [ln[:300] for ln in err.splitlines() if ln.startswith("WARNING")]
    row = {"mode": "cli", "prompt": length, "call": call, "wall_s": wall, "rc": rc, "warnings": warnings,
           **{k: out.get(k) for k in FIELDS}}
    if rc:
        row["stderr_tail"] = err[-600:]
    return row


def in_process(ckpt: str, lengths: list[int], new_tokens: int) -> list[dict]:
    """generate() twice per length in this process (the second call reported), on the checkpoint from disk."""
    from hybridctl.generate import generate

    rows = []
    for n in lengths:
        text = prompt_text(n, seed=n)
        first = generate(ckpt, [text], max_new_tokens=new_tokens, use_eos=False)
        r = generate(ckpt, [text], max_new_tokens=new_tokens, use_eos=False)
        s = r.summary()
        rows.append({"mode": "in-process", "prompt": n, "call": "2nd in process", "wall_s": None,
                     "first_call_prefill_tokens_per_s": first.prefill_tokens_per_s, "warnings": [],
                     **{k: s.get(k) for k in FIELDS}, "prompt_tokens": r.prompt_tokens[0]})
    return rows


def table(rows: list[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if v < 10 else f"{v:.0f}"
        if isinstance(v, list):
            return str(len(v))
        return str(v)

    lines = [" | ".join(COLS)]
    lines += [" | ".join(fmt(r.get(c)) for c in COLS) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="hybrid-1.3b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 6520, 16384])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=2, help="fresh-process calls per length (the first length's first "
                    "call is the first-ever one, on empty caches)")
    ap.add_argument("--work", default=None, help="folder for the checkpoint, prompts, caches (default: a temp dir)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--in-process-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_process_child:
        print(json.dumps(in_process(args.ckpt, args.lengths, args.new_tokens)))
        return
    work = args.work or tempfile.mkdtemp(prefix="hybridctl_cli_bench_")
    cache, ckpt, logs = (os.path.join(work, d) for d in ("cache", "ckpt", "logs"))
    os.makedirs(logs, exist_ok=True)
    env = child_env(cache)
    path = args.json_out or os.path.join(os.environ.get("OUT", work), "generate_cli_gpu.json")

    def save() -> None:  # after every row: a run cut short still leaves the rows that finished
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    res = {"env": {"command": " ".join(sys.argv), "preset": args.preset, "new_tokens": args.new_tokens}, "rows": []}
    t0 = time.perf_counter()
    out, err, wall, rc = run_cli(["build", "--preset", args.preset, "--dtype", "bfloat16", "--out", ckpt], env, 900)
    res["env"].update(build_s=wall, build_rc=rc)
    if rc:
        sys.exit(f"build failed: {err[-2000:]}")
    for i, n in enumerate(args.lengths):
        pf = os.path.join(work, f"prompt_{n}.txt")
        with open(pf, "w") as f:
            f.write(prompt_text(n, seed=n))
        for j in range(args.runs):
            call = "first-ever (cold caches)" if i == 0 and j == 0 else f"fresh process #{j + 1}"
            res["rows"].append(cli_row(ckpt, pf, n, call, env, args.new_tokens, logs))
            print({k: res["rows"][-1].get(k) for k in COLS}, flush=True)
            save()
    p = subprocess.run([sys.executable, __file__, "--in-process-child", "--ckpt", ckpt, "--new-tokens",
                        str(args.new_tokens), "--lengths", *map(str, args.lengths)], env=env, capture_output=True,
                       text=True, timeout=1800)
    try:
        res["rows"] += json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        res["env"]["in_process_error"] = p.stderr[-2000:]
    res["env"]["total_s"] = time.perf_counter() - t0
    try:
        import torch

        res["env"].update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    except Exception as e:  # noqa: BLE001 - the table matters more than the device name
        res["env"]["device"] = f"unknown ({type(e).__name__})"
    save()
    print(table(res["rows"]))
    print(f"build {res['env']['build_s']:.1f} s; JSON: {path}")


if __name__ == "__main__":
    main()
