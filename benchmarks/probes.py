"""The machine probes, for the benchmark scripts: ``hybridctl.probes`` (their one home, which ``bench`` uses at run
time) re-exported, plus ``peak_flops`` (the datasheet compute peak, from hybridctl.train's table: a workflow the
library probes may not import)."""

from __future__ import annotations

import torch

from hybridctl.probes import best_time, copy_bandwidth, matvec_bandwidth, matvec_bandwidths, sync  # noqa: F401


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 datasheet FLOP/s of a CUDA device by name (hybridctl.train.PEAK_TFLOPS); None when unknown."""
    if device.type != "cuda":
        return None
    from hybridctl.train import PEAK_TFLOPS

    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)
