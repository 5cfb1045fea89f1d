"""Shared fixtures: tiny configs; the ref backend on CPU; deterministic seeds."""

from __future__ import annotations

import pytest
import torch

from hybridctl import kernels
from hybridctl.config import ModelConfig, preset


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _ref_backend():
    kernels.set_backend("auto")  # CPU tensors always take the ref path
    yield


def tiny_config(**changes) -> ModelConfig:
    """The tiny preset with changes (pattern=..., tie_embeddings=..., mamba={...} merged)."""
    d = preset("tiny").to_dict()
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    return ModelConfig.from_dict(d)
