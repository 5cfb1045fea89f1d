"""megatron-core 0.19 as a test oracle (run with the oracle venv's python, never imported by the test process).

``batch JOBS_JSON RESULT_JSON``: one launch for a whole list of jobs. ``max(tp·pp)`` gloo processes are spawned once
(importing megatron-core costs seconds per process, so they are reused); for each job every process re-initialises
megatron-core's model parallelism at the job's TP/PP (the processes beyond tp·pp are data-parallel replicas, which
compute the same and write nothing). Jobs (each a JSON object with ``kind``, ``case`` and paths):

* ``write`` (``out``): build a tiny ``HybridModel`` (local, non-TE spec whose sharded keys equal the TE spec's), save
  it with megatron-core's own ``dist_checkpointing.save`` (training-like common state: args Namespace with megatron
  enums, rng state, optimizer state) under ``out/dist/iter_0000010``, dump its full state dict to
  ``out/model.safetensors``, and write the legacy TP1 file ``out/legacy_tp1_pp1``.
* ``reshard`` (``ckpt``, ``dump``, ``tp``, ``pp``): load that TP1 checkpoint into TP/PP models and write legacy
  per-rank ``model_optim_rng.pt`` files under ``dump`` (each rank's state dict also as ``rank_{tp}_{pp}.safetensors``).
* ``load-dist`` (``ckpt``, ``dump``, ``tp``, ``pp``): load a torch_dist checkpoint (default strictness, what
  Megatron-LM uses to resume) into TP/PP models and dump every rank's state dict to ``dump/rank_{tp}_{pp}.safetensors``.
* ``load-legacy`` (same): load each rank file of a legacy checkpoint into its rank's model (see ``_legacy_load``),
  dump likewise.

RESULT_JSON gets ``{job index: "ok" | error}``; a failed job does not stop the others.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import torch


def _patch_cpu() -> None:
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *a, **k: self  # tied embeddings under PP move the weight "to the GPU"
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    hybrid_block.TENorm = WrappedTorchNorm


def _spec():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm,
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add, sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                                          linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"})),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})),
    ))


def _tconfig(c: dict, tp: int, pp: int):
    from megatron.core.transformer import TransformerConfig

    kw = dict(num_layers=len(c["pattern"]), hidden_size=c["hidden"], num_attention_heads=c["heads"],
              num_query_groups=c["kv"], kv_channels=c["head_dim"], ffn_hidden_size=c["ffn"],
              mamba_state_dim=c["d_state"], mamba_head_dim=c["headdim"], mamba_num_groups=c["ngroups"],
              mamba_num_heads=c.get("mamba_heads"), normalization="RMSNorm", layernorm_epsilon=1e-5,
              add_bias_linear=False, gated_linear_unit=c["act"] == "swiglu", tensor_model_parallel_size=tp,
              pipeline_model_parallel_size=pp, params_dtype=torch.float32, pipeline_dtype=torch.float32,
              use_cpu_initialization=True,
              perform_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    if c["act"] == "swiglu":
        kw["activation_func"] = torch.nn.functional.silu
    elif c["act"] == "relu2":
        from megatron.core.activations import squared_relu

        kw["activation_func"] = squared_relu
    return TransformerConfig(**kw)


def _model(c: dict, tp: int, pp: int):
    from megatron.core import parallel_state
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return HybridModel(config=_tconfig(c, tp, pp), hybrid_stack_spec=_spec(), vocab_size=c["padded_vocab"],
                       max_sequence_length=64, hybrid_layer_pattern=c["pattern"],
                       pre_process=parallel_state.is_pipeline_first_stage(),
                       post_process=parallel_state.is_pipeline_last_stage(),
                       share_embeddings_and_output_weights=c["tied"], position_embedding_type="none")


def _args(c: dict, tp: int, pp: int) -> argparse.Namespace:
    """What Megatron-LM's arguments.py saves (the fields that describe the model, plus enums it pickles)."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=len(c["pattern"]), hidden_size=c["hidden"], ffn_hidden_size=c["ffn"],
        num_attention_heads=c["heads"], group_query_attention=c["kv"] != c["heads"], num_query_groups=c["kv"],
        kv_channels=c["head_dim"], is_hybrid_model=True, hybrid_layer_pattern=c["pattern"],
        hybrid_override_pattern=None, mamba_state_dim=c["d_state"], mamba_head_dim=c["headdim"],
        mamba_num_groups=c["ngroups"], mamba_num_heads=c.get("mamba_heads"), normalization="RMSNorm",
        norm_epsilon=1e-5, untie_embeddings_and_output_weights=not c["tied"], vocab_size=c["vocab"],
        padded_vocab_size=c["padded_vocab"], make_vocab_size_divisible_by=128, swiglu=c["act"] == "swiglu",
        squared_relu=c["act"] == "relu2", position_embedding_type="none", add_bias_linear=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, ckpt_format="torch_dist",
        params_dtype=torch.float32, bf16=False, fp16=False, model_type=ModelType.encoder_or_decoder,
        attention_backend=AttnBackend.auto, iteration=10, consumed_train_samples=80, lr=3e-4, seed=1234)


def _rng_state() -> list:
    import random

    import numpy as np

    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(8, dtype=torch.uint8),
             "rng_tracker_states": {}}]


def _dump(model, f: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
          if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    save_file(sd, str(f))


def _randomize(model, seed: int) -> None:
    """Every parameter random (norms included), so any mix-up of tensors shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in name else 0.0))


def _save_dist(model, c: dict, d: Path) -> None:
    import dataclasses

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sd = model.sharded_state_dict(prefix="")
    opt = {}
    for k, v in list(sd.items()):
        if isinstance(v, ShardedTensor) and "_extra_state" not in k:
            for m in ("exp_avg", "exp_avg_sq"):
                key = f"optimizer.state.{m}.{v.key}"
                opt[key] = dataclasses.replace(v, key=key, data=torch.full_like(v.data, 0.25))
    state = {"model": sd, "optimizer": {"state": opt, "param_groups": [{"lr": 3e-4, "step": 10}]},
             "args": _args(c, 1, 1), "checkpoint_version": 3.0, "iteration": 10, "rng_state": _rng_state(),
             "num_floating_point_operations_so_far": 0}
    # megatron-LM flattens the model's sharded_state_dict under "model"; keys are the ShardedTensor keys
    dist_checkpointing.save(state, str(d))


def _rank_dirs(t: int, p: int, pp: int) -> str:
    return f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")


def _job_write(job: dict, rank: int) -> None:
    import torch.distributed as dist

    c, out = job["case"], Path(job["out"])
    m = _model(c, 1, 1)
    _randomize(m, c.get("seed", 0))
    root = out / "dist"
    if rank == 0:
        (root / "iter_0000010").mkdir(parents=True)
    dist.barrier()
    _save_dist(m, c, root / "iter_0000010")  # collective: the data-parallel replicas share the writing
    if rank != 0:
        return
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    _dump(m, out / "model.safetensors")
    leg = out / "legacy_tp1_pp1"
    f = leg / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    f.parent.mkdir(parents=True)
    torch.save({"args": _args(c, 1, 1), "checkpoint_version": 3.0, "iteration": 10,
                "model": m.state_dict_for_save_checkpoint(), "rng_state": _rng_state()}, f)
    (leg / "latest_checkpointed_iteration.txt").write_text("10")
    _dump(m, leg / "rank_0_0.safetensors")


def _job_load(job: dict, rank: int) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    kind, c, tp, pp = job["kind"], job["case"], job["tp"], job["pp"]
    ckpt, dump = Path(job["ckpt"]), Path(job["dump"])
    t, p = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    writer = parallel_state.get_data_parallel_rank() == 0
    if kind == "load-legacy":
        it = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
        it_dir = ckpt / ("release" if it == "release" else f"iter_{int(it):07d}")
        obj = torch.load(it_dir / _rank_dirs(t, p, pp) / "model_optim_rng.pt", map_location="cpu",
                         weights_only=False)  # written by hybridctl (the file under test)
        m = _model({**c, "padded_vocab": obj["args"].padded_vocab_size}, tp, pp)
        _legacy_load(m, obj)
    else:
        if kind == "load-dist":
            tracker = ckpt / "latest_checkpointed_iteration.txt"
            if tracker.is_file():
                it = tracker.read_text().strip()
                ckpt = ckpt / ("release" if it == "release" else f"iter_{int(it):07d}")
            # build the model the checkpoint's args describe (Megatron-LM recomputes the padding)
            c = {**c, "padded_vocab": dist_checkpointing.load_common_state_dict(str(ckpt))["args"].padded_vocab_size}
        m = _model(c, tp, pp)
        loaded = dist_checkpointing.load({"model": m.sharded_state_dict(prefix="")}, str(ckpt))  # default strictness
        m.load_state_dict(loaded["model"])  # strict=True
        if kind == "reshard" and writer:
            f = dump / "iter_0000010" / _rank_dirs(t, p, pp) / "model_optim_rng.pt"
            f.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"args": _args(c, tp, pp), "checkpoint_version": 3.0, "iteration": 10,
                        "model": m.state_dict_for_save_checkpoint(), "rng_state": _rng_state()}, f)
            if rank == 0:
                (dump / "latest_checkpointed_iteration.txt").write_text("10")
    if writer:
        dump.mkdir(parents=True, exist_ok=True)
        _dump(m, dump / f"rank_{t}_{p}.safetensors")


# The local spec keeps its norms as separate modules; a TE-spec model (what hybridctl's legacy files are written for)
# fuses them into the next linear. Same map as the spec's sharded_state_dict_keys_map, applied to plain keys.
_TE_TO_LOCAL = {"mixer.in_proj.layer_norm_": "norm.", "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
                "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}
# Extra state of the one module only a TE-spec model has: TE's core attention (TEDotProductAttention keeps FP8
# metadata there; the local DotProductAttention has none). A legacy file written for the TE spec carries it.
_TE_ONLY_EXTRA = ("self_attention.core_attention._extra_state",)


def _legacy_load(m, obj: dict) -> None:
    """Megatron-LM loads legacy files with ``load_state_dict(strict=True)``. The oracle's model uses the local spec
    (TE needs CUDA), so the file's TE-fused norm keys are renamed to the local modules first; then nothing may be
    missing, and nothing may be unexpected but the ``_extra_state`` of TE's core attention (a ``None``
    placeholder; the local spec has no such module). The loaded values are then compared tensor for tensor."""
    sd = {}
    for k, v in obj["model"].items():
        for te, local in _TE_TO_LOCAL.items():
            if f".{te}" in k:
                k = k.replace(f".{te}", f".{local}")
        sd[k] = v
    extra = [k for k in sd if k.endswith(_TE_ONLY_EXTRA)]
    if any(sd[k] is not None and not isinstance(sd[k], io.BytesIO) for k in extra):
        raise SystemExit(f"TE-only extra state holds a tensor: {extra}")
    res = m.load_state_dict(sd, strict=False)
    unexpected = [k for k in res.unexpected_keys if not k.endswith(_TE_ONLY_EXTRA)]
    if res.missing_keys or unexpected:
        raise SystemExit(f"strict load failed: missing {res.missing_keys}, unexpected {unexpected}")


def _reinit(tp: int, pp: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, pp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def _batch_entry(rank: int, world: int, pg: str, jobs: list, result: str) -> None:
    import traceback

    import torch.distributed as dist

    _patch_cpu()
    dist.init_process_group("gloo", init_method=f"file://{pg}", rank=rank, world_size=world)
    status = {}
    for i, job in enumerate(jobs):
        tp, pp = (1, 1) if job["kind"] == "write" else (job["tp"], job["pp"])
        try:
            _reinit(tp, pp)
            (_job_write if job["kind"] == "write" else _job_load)(job, rank)
            status[i] = "ok"
        except BaseException as e:  # one failed job must not stop the batch; report it
            status[i] = f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
        dist.barrier()
    Path(f"{result}.rank{rank}").write_text(json.dumps(status))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    if argv[:1] != ["batch"] or len(argv) != 3:
        raise SystemExit("usage: megatron_oracle.py batch JOBS_JSON RESULT_JSON")
    import torch.multiprocessing as mp

    jobs, result = json.loads(Path(argv[1]).read_text()), Path(argv[2])
    world = max([1] + [j["tp"] * j["pp"] for j in jobs if j["kind"] != "write"])
    pg = result.parent / f"pg_{os.getpid()}"
    if pg.exists():
        pg.unlink()
    # spawned, not forked (forking after megatron-core's save leaves workers that deadlock)
    mp.spawn(_batch_entry, args=(world, str(pg), jobs, str(result)), nprocs=world, join=True)
    merged: dict[str, str] = {str(i): "ok" for i in range(len(jobs))}
    for r in range(world):
        for i, v in json.loads(Path(f"{result}.rank{r}").read_text()).items():
            if v != "ok" and merged[i] == "ok":
                merged[i] = v
    result.write_text(json.dumps(merged))
    print(json.dumps({"ok": all(v == "ok" for v in merged.values()), "jobs": len(jobs)}))


if __name__ == "__main__":
    main(sys.argv[1:])
