"""mamba_ssm as a test oracle (run with the oracle venv's python): ``write OUT CASES_JSON``.

For every case, ``MambaLMHeadModel(MambaConfig(...), device="cpu")`` with every parameter random, written with its own
``save_pretrained`` to ``OUT/<case>/`` (config.json + pytorch_model.bin), and its state dict dumped to
``OUT/<case>.safetensors`` for comparison. mamba_ssm's forward needs CUDA; only its format is used here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> None:
    if argv[:1] != ["write"] or len(argv) != 3:
        raise SystemExit("usage: mamba_ssm_oracle.py write OUT CASES_JSON")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from safetensors.torch import save_file

    out, cases = Path(argv[1]), json.loads(Path(argv[2]).read_text())
    for name, c in cases.items():
        cfg = MambaConfig(d_model=c["d_model"], n_layer=c["n_layer"], d_intermediate=0, vocab_size=c["vocab"],
                          ssm_cfg={"layer": "Mamba2", **c["ssm"]}, rms_norm=True, residual_in_fp32=True,
                          fused_add_norm=False, pad_vocab_size_multiple=c["pad"], tie_embeddings=c["tied"])
        model = MambaLMHeadModel(cfg, device="cpu", dtype=torch.float32)
        g = torch.Generator().manual_seed(c.get("seed", 0))
        with torch.no_grad():
            for pname, p in sorted(model.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in pname else 0.0))
        model.save_pretrained(str(out / name))
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(out / f"{name}.safetensors"))
    print(json.dumps({"ok": True, "cases": list(cases)}))


if __name__ == "__main__":
    main(sys.argv[1:])
