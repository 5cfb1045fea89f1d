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


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and robust on a busy 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


# The suite's slow tests (seconds each on 2 cores; measured with --durations), marked here in one place so the test
# files stay as they are. CI runs them (nothing deselects `slow` by default); `pytest -m "not slow"` is the quick
# local loop. tests/test_suite.py checks that every name here still exists.
SLOW_TESTS = {
    "test_triton_kernels.py::test_triton_kernels_in_the_interpreter",
    "test_train.py::test_torchrun_two_process_fsdp2_gloo_matches_one_process",
    "test_model.py::test_full_forward_equals_token_by_token_decode",
    "test_generate.py::test_batch_equals_single_prompts",
    "test_generate.py::test_eos_and_stop_strings_are_respected",
    "test_generate.py::test_compiled_decode_step_matches_the_eager_step",
    "test_generate.py::test_nemotron_h_checkpoint_matches_transformers_generate",
    "test_generate.py::test_streaming_is_utf8_safe",
    "test_generate.py::test_greedy_equals_full_forward_argmax",
    "test_generate.py::test_cpu_fast_twin_batch1_compiled_matvec_matches_decode_step",
    "test_generate.py::test_cpu_fast_twin_matches_decode_step",
    "test_generate.py::test_sampling_is_reproducible_with_a_seed",
    "test_hf.py::test_export_matches_transformers",
    "test_evaluation.py::test_greedy_forward_matches_generate",
    "test_extend_context.py::test_extend_run_mechanics",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if f"{item.path.name}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
