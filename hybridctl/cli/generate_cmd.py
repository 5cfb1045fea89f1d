"""`hybridctl generate`: text from any checkpoint, streamed for a single prompt; prompt gathering."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hybridctl.cli.common import (MAX_NEW_TOKENS, SEED_MAX, BackendOpt, CkptArg, DeviceOpt, JsonOpt, SeedOpt,
                                  VerboseOpt, app, check_numbers, errors, print_json, setup_logging)
from hybridctl.config import HybridctlError


@app.command(epilog="Prompts: --prompt TEXT (repeatable: one batch), --prompt - (stdin), --prompt-file PATH (each file"
             " is one prompt). --json prints one object for a single prompt; for several, one object whose \"results\""
             " lists the per-prompt objects next to the batch timings.\n\nExamples:\n\n"
             "  hybridctl generate runs/tiny --prompt 'Once upon a time' --max-new-tokens 64\n\n"
             "  echo 'Hello' | hybridctl generate runs/tiny --prompt - --temperature 0.8 --top-p 0.9 --seed 1\n\n"
             "  hybridctl generate ckpt/ -p 'Q: 2+2?' -p 'Q: capital of France?' --stop 'Q:' --json")
@errors
def generate(
    ckpt: CkptArg,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", help="Prompt text; '-' reads stdin; repeat for a batch.")] = None,
    prompt_file: Annotated[Optional[list[Path]], typer.Option(help="File holding one prompt (repeatable).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p × the top probability (0 = off).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeating tokens (1 = off).")] = 1.0,
    seed: SeedOpt = 0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this text appears (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past the tokenizer's EOS.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer override: 'byte' or a path.")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help="Compute dtype (default: the checkpoint's).")] = None,
    backend: BackendOpt = None,
    state_dtype: Annotated[str, typer.Option(help="SSM state dtype: float32 | bfloat16.")] = "float32",
    cuda_graph: Annotated[bool, typer.Option(help="Replay the decode step from a CUDA graph (GPU).")] = True,
    compile: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="torch.compile the decode step (each layer's elementwise work fused into a few "
        "kernels): faster GPU decode after a one-off compile, reported as warm-up. Default: on for CUDA; on the CPU "
        "only the batch-1 matrix-vector product of the large weights is compiled (--no-compile: nothing is).",
        show_default=False)] = None,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Generate text from any checkpoint: chunked-scan prefill, then one constant-state recurrent step per token.
    A single prompt streams to stdout as it is produced; timings go to stderr."""
    setup_logging(verbose)
    check_numbers(max_new_tokens=(max_new_tokens, 1, MAX_NEW_TOKENS), temperature=(temperature, 0, None),
                   top_k=(top_k, 0, None), top_p=(top_p, 0, 1), min_p=(min_p, 0, 1),
                   repetition_penalty=(repetition_penalty, 1e-6, 1e6), seed=(seed, 0, SEED_MAX))
    from hybridctl.generate import generate as run

    prompts = _gather_prompts(prompt, prompt_file)
    stream = None if (json_ or len(prompts) > 1) else (lambda _i, piece: typer.echo(piece, nl=False))
    res = run(ckpt, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
              top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
              stop=stop or (), use_eos=not ignore_eos, device=device, dtype=dtype, backend=backend,
              state_dtype=state_dtype, cuda_graph=cuda_graph, compile=compile, on_text=stream)
    if json_:
        return print_json(res.per_prompt(0) if len(prompts) == 1 else dict(
            results=[{k: res.per_prompt(i)[k] for k in ("text", "tokens", "prompt_tokens", "finish_reason")}
                     for i in range(len(prompts))], **res.summary()), device=res.device, dtype=res.dtype)
    if stream is None:
        for i, text in enumerate(res.texts):
            typer.echo(f"--- prompt {i} ---\n{text}")
    else:
        typer.echo("")
    typer.echo(f"[{res.batch_size}×{res.decode_steps + 1} tokens | TTFT {res.time_to_first_token_s:.3f} s | "
               f"prefill {res.prefill_tokens_per_s:.1f} tok/s | decode {res.decode_tokens_per_s:.1f} tok/s | "
               f"{res.device} {res.backend}{' compiled' if res.extra.get('compiled') else ''}"
               f"{' cuda-graph' if res.cuda_graph else ''}{' fast-cpu' if res.extra.get('cpu_fast_path') else ''}"
               f"{f' | warm-up {res.warmup_s:.1f} s' if res.warmup_s >= 0.1 else ''}"
               f" | first token after {res.extra.get('first_token_wall_s', 0.0):.1f} s]", err=True)


def _read_stdin() -> str:
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise HybridctlError(f"--prompt -: stdin is not valid UTF-8 (byte {e.start})") from None


def _gather_prompts(prompt: Optional[list[str]], prompt_file: Optional[list[Path]]) -> list[str]:
    """--prompt values ('-' = stdin) then --prompt-file contents, in order; at least one."""
    out = [_read_stdin() if p == "-" else p for p in prompt or []]
    for f in prompt_file or []:
        if not f.is_file():
            raise HybridctlError(f"--prompt-file {f}: no such file")
        try:
            out.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise HybridctlError(f"--prompt-file {f}: not valid UTF-8 (byte {e.start})") from None
        except OSError as e:
            raise HybridctlError(f"--prompt-file {f}: {e.strerror or e}") from None
    for i, p in enumerate(out):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise HybridctlError(f"prompt {i}: not valid UTF-8 (character {e.start})") from None
    if not out:
        raise HybridctlError("no prompt: pass --prompt TEXT, --prompt - (stdin) or --prompt-file PATH")
    return out
