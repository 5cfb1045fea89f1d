"""CPU batch-1 decode tokens/s: hybrid-130m fp32 (generate's CPU fast path); variants interleaved, medians of --repeats vs the same weights quantized int8 / int4 g128
(round-to-nearest, policy default and aggressive, head included). Random init: speed does not depend on the values.

    PYTHONPATH=. python benchmarks/quantize_cpu.py [--preset hybrid-130m] [--tokens 64] [--repeats 3]
"""

import argparse
import json
import statistics
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
    variants = [("fp32", None, None)] + [(m, p, True) for m in ("int8", "int4") for p in ("default", "aggressive")]
    models = {}
    for method, policy, head in variants:
        if method == "fp32":
            models[(method, policy)] = (model, sum(v.numel() * v.element_size() for v in model.state_dict().values()))
        else:
            plan, modules = make_plan(cfg, specs, method=method, group_size=128, policy=policy, include_head=head)
            models[(method, policy)] = (quantized_model(model, modules, method, 128), sum(r.bytes_after for r in plan))
    runs: dict = {k: [] for k in models}
    for rep in range(a.repeats):  # interleaved: the shared machine's load hits every variant alike
        for key, (m, _) in models.items():
            r = generate(m, prompt, max_new_tokens=a.tokens, use_eos=False)
            runs[key].append(r.decode_tokens_per_s)
            print(json.dumps({"repeat": rep, "model": key[0], "policy": key[1], "tok_s": round(r.decode_tokens_per_s, 2)}),
                  flush=True)
    rows = [{"model": k[0], "policy": k[1], "weight_bytes": models[k][1], "decode_tok_s": round(statistics.median(v), 2),
             "runs": [round(x, 2) for x in v]} for k, v in runs.items()]
    base = rows[0]["decode_tok_s"]
    for r in rows:
        r["vs_fp32"] = round(r["decode_tok_s"] / base, 3)
    from hybridctl import cpu_qkernels
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "c_kernels": cpu_qkernels.available(),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"wall {time.time() - t0:.0f}s")
