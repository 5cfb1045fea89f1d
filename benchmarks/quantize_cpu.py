"""CPU batch-1 decode tokens/s: hybrid-130m fp32 (generate's CPU fast path) vs the same weights quantized int8 / int4 g128
(round-to-nearest, policy default and aggressive, head included). Random init: speed does not depend on the values.

    PYTHONPATH=. python benchmarks/quantize_cpu.py [--preset hybrid-130m] [--tokens 64] [--repeats 3]
"""

import argparse
import json
import time

import torch

from hybridctl.config import preset
from hybridctl.generate import generate
from hybridctl.model import build_model, materialize
from hybridctl.quantize import make_plan, quantized_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="hybrid-130m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cfg = preset(a.preset)
    model = materialize(build_model(cfg), "cpu").eval()
    specs = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    prompt = [list(range(1, 33))]
    rows = []
    variants = [("fp32", None, None)] + [(m, p, True) for m in ("int8", "int4") for p in ("default", "aggressive")]
    for method, policy, head in variants:
        if method == "fp32":
            m, nbytes = model, sum(v.numel() * v.element_size() for v in model.state_dict().values())
        else:
            plan, modules = make_plan(cfg, specs, method=method, group_size=128, policy=policy, include_head=head)
            m, nbytes = quantized_model(model, modules, method, 128), sum(r.bytes_after for r in plan)
        best = 0.0
        for _ in range(a.repeats):
            r = generate(m, prompt, max_new_tokens=a.tokens, use_eos=False)
            best = max(best, r.decode_tokens_per_s)
        rows.append({"model": method, "policy": policy, "weight_bytes": nbytes, "decode_tok_s": round(best, 2)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["decode_tok_s"]
    for r in rows:
        r["vs_fp32"] = round(r["decode_tok_s"] / base, 3)
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"wall {time.time() - t0:.0f}s")
