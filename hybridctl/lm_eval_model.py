"""lm-evaluation-harness adapter: any checkpoint hybridctl reads, scored and generated on hybridctl's own runtime.

    hybridctl-lm-eval --model hybridctl --model_args pretrained=CKPT --device cpu --batch_size 4 --tasks hellaswag
    python -m hybridctl.lm_eval_model --model hybridctl --model_args pretrained=CKPT --tasks …   # the same

Why a wrapper and not plain ``lm_eval --model hybridctl``: lm-eval 0.4.13 finds models only in its own registry,
which it fills from the hard-coded ``lm_eval.models.MODEL_MAPPING`` (``api/registry.py: get_model``); it reads no
entry-point group for models and has no ``--plugins`` flag, and ``--include_path`` adds task YAMLs only. So the plain
``lm_eval`` CLI cannot see an out-of-tree model. ``hybridctl-lm-eval`` registers ``hybridctl`` and then runs
lm-eval's own ``cli_evaluate`` on the same argv (every lm-eval flag works). From Python: ``import
hybridctl.lm_eval_model`` registers it for ``lm_eval.simple_evaluate(model="hybridctl", …)``.

Semantics (as lm-eval's ``hf`` model for a causal LM):
- ``loglikelihood``: context + continuation scored in one forward (right-padded batches, longest first), log-softmax
  in fp32 over the model's whole output vocabulary; ``is_greedy`` = every continuation token is the argmax.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens, the first one conditioned
  on the prefix token (BOS if the tokenizer has one, else EOS); the sum over windows.
- ``generate_until``: ``hybridctl.generate.generate`` (the decode runtime: chunked prefill, recurrent decode step),
  greedy unless the task asks for sampling, stopping at EOS and the task's ``until`` strings; batched per identical
  generation settings; contexts are cut from the left to ``max_length - max_gen_toks``.
- Contexts are encoded without BOS unless ``add_bos_token=True`` (lm-eval's default for GPT-style models).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F

from hybridctl.config import HybridctlError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra
    raise HybridctlError("the lm-eval adapter needs lm-eval: pip install 'hybridctl[lm-eval]'") from e

log = logging.getLogger(__name__)
MODEL_NAME = "hybridctl"


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _batch_size(value: Any) -> int:
    text = str(value if value is not None else 1).strip()
    if text.startswith("auto"):
        raise HybridctlError("lm-eval: batch_size 'auto' is not supported by the hybridctl model; give a number")
    try:
        n = int(text)
    except ValueError:
        raise HybridctlError(f"lm-eval: batch_size must be a positive integer, got {value!r}") from None
    if n < 1:
        raise HybridctlError(f"lm-eval: batch_size must be >= 1, got {n}")
    return n


def _ensure_builtin_models() -> None:
    # get_model fills the registry with lm-eval's own models only while it is empty: fill it first, then add ours.
    import lm_eval.models  # noqa: F401


_ensure_builtin_models()


class HybridctlLM(TemplateLM):
    """lm-eval model ``hybridctl``. model_args: ``pretrained`` (any checkpoint hybridctl loads, required),
    ``device`` (cpu), ``dtype`` (the checkpoint's), ``batch_size`` (1), ``max_length`` (2048), ``tokenizer``
    (override path or 'byte'), ``add_bos_token`` (false), ``state_dtype`` (float32), ``backend`` (auto),
    ``compile`` (the runtime's default: on CUDA)."""

    def __init__(self, pretrained: str | None = None, device: str | None = "cpu", dtype: str | None = None,
                 batch_size: Any = 1, max_batch_size: Any = None, max_length: Any = 2048,
                 tokenizer: str | None = None, add_bos_token: Any = False, state_dtype: str = "float32",
                 backend: str | None = None, compile: Any = None, **kwargs: Any) -> None:
        super().__init__()
        from hybridctl.checkpoint import load_model, load_tokenizer_for
        from hybridctl.checkpoint.native import torch_dtype
        from hybridctl.parallel import resolve_device

        if not pretrained:
            raise HybridctlError("lm-eval: --model_args needs pretrained=CHECKPOINT")
        if kwargs:
            log.warning("hybridctl lm-eval model: ignoring unknown model_args %s", sorted(kwargs))
        self._device = resolve_device(device or "cpu")
        self.model, src = load_model(pretrained, device=self._device, dtype=torch_dtype(dtype) if dtype else None)
        self.tok = load_tokenizer_for(src, tokenizer)
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length)
        if self.max_length < 2:
            raise HybridctlError(f"lm-eval: max_length must be >= 2, got {max_length}")
        self.add_bos_token = _flag(add_bos_token)
        self.state_dtype, self.backend = state_dtype, backend
        self.compile = None if compile is None else _flag(compile)
        self.pretrained = str(pretrained)

    # ---- TemplateLM plumbing ----------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eot = self.tok.eos_id if self.tok.eos_id is not None else self.tok.bos_id
        if eot is None:
            raise HybridctlError("lm-eval: the tokenizer has neither an EOS nor a BOS token")
        return eot

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tok.describe()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, add_bos=bool(bos) and self.tok.bos_id is not None)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def get_model_info(self) -> dict[str, Any]:
        p = next(self.model.parameters())
        return {"model_name": self.pretrained, "model_dtype": str(p.dtype).removeprefix("torch."),
                "model_num_parameters": sum(t.numel() for t in self.model.parameters())}

    # ---- scoring ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), all greedy) per (context ids, continuation ids), batched."""
        inputs = []
        for ctx, cont in pairs:
            if not cont:
                raise HybridctlError("lm-eval: a request has an empty continuation")
            whole = (ctx + cont)[-(self.max_length + 1):]  # too long: cut from the left, as lm-eval's hf model
            inputs.append((whole[:-1], cont[-(len(whole) - 1):]))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = len(inputs[idx[0]][0])
            batch = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                batch[r, :len(inputs[i][0])] = torch.tensor(inputs[i][0])  # right padding: causal, never seen
            logits = self.model(batch.to(self._device))
            for r, i in enumerate(idx):
                inp, cont = inputs[i]
                rows = logits[r, len(inp) - len(cont):len(inp)].float()
                logp = F.log_softmax(rows, dim=-1)
                target = torch.tensor(cont, device=logp.device)
                ll = float(logp.gather(1, target[:, None]).sum())
                out[i] = (ll, bool((rows.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self._score([(list(ctx), list(cont)) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(self.tok_encode(text, add_special_tokens=False), self.prefix_token_id,
                                               self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        sums = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._score(windows)):
            sums[i] += ll
        for req, s in zip(requests, sums):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), s)
        return sums

    # ---- generation -------------------------------------------------------------------------------------------

    def _gen_settings(self, kwargs: dict[str, Any]) -> tuple[list[str], int, float, float, int]:
        """(until, max_gen_toks, temperature, top_p, top_k) from a task's generation_kwargs (as lm-eval's hf model:
        greedy unless do_sample; sampling at temperature 1.0 unless given)."""
        kw = dict(kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eot_text = self.tok.decode([self.eot_token_id]) if self.eot_token_id < self.tok.vocab_size else ""
        if eot_text and eot_text not in until:
            until.append(eot_text)
        max_gen = int(kw.pop("max_gen_toks", 256))
        sample = _flag(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0)) if sample else 0.0
        top_p, top_k = float(kw.pop("top_p", 1.0) or 1.0), int(kw.pop("top_k", 0) or 0)
        if kw:
            log.warning("hybridctl lm-eval model: ignoring generation_kwargs %s", sorted(kw))
        return until, max_gen, temperature, top_p, top_k

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from hybridctl.generate import generate

        groups: dict[tuple, list[int]] = {}
        contexts = []
        for i, req in enumerate(requests):
            ctx, gen_kwargs = req.args
            until, max_gen, temperature, top_p, top_k = self._gen_settings(gen_kwargs)
            contexts.append(ctx)
            groups.setdefault((tuple(until), max_gen, temperature, top_p, top_k), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for (until, max_gen, temperature, top_p, top_k), idx in groups.items():
            keep = max(1, self.max_length - max_gen)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                prompts = [self._prompt_ids(contexts[i])[-keep:] for i in chunk]
                res = generate(self.model, prompts, tokenizer=self.tok, max_new_tokens=max_gen,
                               temperature=temperature, top_p=top_p, top_k=top_k, stop=list(until),
                               device=str(self._device),
                               backend=self.backend, state_dtype=self.state_dtype, compile=self.compile)
                for i, text in zip(chunk, res.texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    def _prompt_ids(self, context: str) -> list[int]:
        ids = self.tok_encode(context)
        return ids if ids else [self.prefix_token_id]


if __name__ != "__main__":  # under `python -m` this file runs as __main__: the importable module's class registers
    register_model(MODEL_NAME)(HybridctlLM)


def main(argv: list[str] | None = None) -> None:
    """``hybridctl-lm-eval``: lm-eval's own CLI with the ``hybridctl`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else list(argv)
    # lm-eval's CLI passes device (default cuda:0) and batch_size to every model: give them as --device and
    # --batch_size, not in --model_args. The wrapper's default device: cuda when there is one, else cpu.
    if not any(a == "--device" or a.startswith("--device=") for a in argv):
        argv += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except HybridctlError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    from hybridctl.lm_eval_model import main as _main  # registers hybridctl.lm_eval_model.HybridctlLM

    _main()
