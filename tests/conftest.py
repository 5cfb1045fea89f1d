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
    "test_hardening.py::test_bad_dcp_metadata_is_one_line_on_train_resume",
    # the megatron-core / mamba_ssm oracle launches (session fixtures, ~2-4 min in all) run with whichever comes first
    "test_interop_megatron.py::test_readers_give_the_tensors_megatron_core_built",
    "test_interop_megatron.py::test_megatron_core_metadata_holds_save_plan_and_is_read",
    "test_interop_megatron.py::test_hostile_payload_inside_real_metadata_is_refused",
    "test_interop_megatron.py::test_export_torch_dist_loads_in_megatron_core",
    "test_interop_megatron.py::test_export_torch_dist_reshards_in_megatron_core",
    "test_interop_megatron.py::test_export_legacy_tp_pp_loads_in_megatron_core",
    "test_interop_megatron.py::test_legacy_export_carries_no_extra_state_megatron_core_lacks",
    "test_interop_megatron.py::test_dry_run_on_megatron_fixtures_writes_nothing",
    "test_interop_megatron.py::test_mamba_ssm_save_pretrained_imports_and_converts",
    "test_interop_megatron.py::test_megatron_core_wide_mamba_dinner_not_multiple_of_hidden",
    "test_qgemv.py::test_quantized_triton_kernels_in_the_interpreter",
    "test_quantize.py::test_calibrated_quantize_reports_gptq",
    "test_quantize.py::test_gptq_beats_round_to_nearest_at_int4",
    "test_quantize.py::test_int8_quality_and_generate_on_the_quantized_checkpoint",
    "test_lm_eval.py::test_cli_wrapper_runs_lm_eval",
    "test_extend_context.py::test_extend_run_mechanics",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if f"{item.path.name}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
