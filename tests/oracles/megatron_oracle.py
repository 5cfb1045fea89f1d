"""megatron-core 0.19 as a test oracle (run with the oracle venv's python, never imported by the test process).

Subcommands (each prints one JSON line on success):

* ``write OUT CASES_JSON``: for every case, build a tiny ``HybridModel`` (local, non-TE spec whose sharded keys equal
  the TE spec's), save it with megatron-core's own ``dist_checkpointing.save`` (training-like common state: args
  Namespace with megatron enums, rng state, optimizer state) under ``OUT/<case>/dist/iter_0000010``, dump its full
  state dict to ``OUT/<case>/model.safetensors``, then reshard: in tp·pp gloo processes load that TP1 checkpoint into
  TP/PP models and write legacy per-rank ``model_optim_rng.pt`` files under ``OUT/<case>/legacy_tp{T}_pp{P}``
  (with each rank's state dict also dumped as ``rank_{tp}_{pp}.safetensors``).
* ``load-dist CKPT CASE_JSON TP PP DUMP``: load a torch_dist checkpoint (default strictness, what Megatron-LM uses to
  resume) into TP/PP models and dump every rank's state dict to ``DUMP/rank_{tp}_{pp}.safetensors``.
* ``load-legacy CKPT CASE_JSON TP PP DUMP``: ``load_state_dict(strict=True)`` each rank file of a legacy checkpoint
  into its rank's model, dump likewise.
"""

from __future__ import annotations

import argparse
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


def _init(rank: int, world: int, tp: int, pp: int, pg_file: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tp, pp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


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
              pipeline_model_parallel_size=pp, params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
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
    d.mkdir(parents=True)
    dist_checkpointing.save(state, str(d))


def _write_case(out: Path, name: str, c: dict) -> None:
    m = _model(c, 1, 1)
    _randomize(m, c.get("seed", 0))
    root = out / name / "dist"
    _save_dist(m, c, root / "iter_0000010")
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    _dump(m, out / name / "model.safetensors")
    leg = out / name / "legacy_tp1_pp1"
    f = leg / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    f.parent.mkdir(parents=True)
    torch.save({"args": _args(c, 1, 1), "checkpoint_version": 3.0, "iteration": 10,
                "model": m.state_dict_for_save_checkpoint(), "rng_state": _rng_state()}, f)
    (leg / "latest_checkpointed_iteration.txt").write_text("10")
    _dump(m, leg / "rank_0_0.safetensors")


def _rank_main(rank: int, world: int, tp: int, pp: int, pg: str, job: dict) -> None:
    _patch_cpu()
    _init(rank, world, tp, pp, pg)
    from megatron.core import dist_checkpointing, parallel_state

    c, kind, ckpt, dump = job["case"], job["kind"], Path(job["ckpt"]), Path(job["dump"])
    t, p = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    if kind == "load-dist":  # build the model the checkpoint's args describe (Megatron-LM recomputes the padding)
        c = {**c, "padded_vocab": dist_checkpointing.load_common_state_dict(str(ckpt))["args"].padded_vocab_size}
    m = _model(c, tp, pp)
    rank_dir = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
    loaded = dist_checkpointing.load({"model": m.sharded_state_dict(prefix="")}, str(ckpt))  # default strictness
    m.load_state_dict(loaded["model"])  # strict=True
    if kind == "reshard":
        f = dump / "iter_0000010" / rank_dir / "model_optim_rng.pt"
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"args": _args(c, tp, pp), "checkpoint_version": 3.0, "iteration": 10,
                    "model": m.state_dict_for_save_checkpoint(), "rng_state": _rng_state()}, f)
        if rank == 0:
            (dump / "latest_checkpointed_iteration.txt").write_text("10")
    dump.mkdir(parents=True, exist_ok=True)
    _dump(m, dump / f"rank_{t}_{p}.safetensors")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


# The local spec keeps its norms as separate modules; a TE-spec model (what hybridctl's legacy files are written for)
# fuses them into the next linear. Same map as the spec's sharded_state_dict_keys_map, applied to plain keys.
_TE_TO_LOCAL = {"mixer.in_proj.layer_norm_": "norm.", "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
                "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}
_TE_ONLY_EXTRA = ("core_attention._extra_state", "mixer.norm._extra_state")


def _legacy_load(m, obj: dict) -> None:
    # Megatron-LM loads legacy files with strict=True. After renaming the TE-fused norm keys to the local spec's
    # modules, nothing may be missing and nothing unexpected but the extra state of TE-only modules.
    sd = {}
    for k, v in obj["model"].items():
        for te, local in _TE_TO_LOCAL.items():
            if f".{te}" in k:
                k = k.replace(f".{te}", f".{local}")
        sd[k] = v
    res = m.load_state_dict(sd, strict=False)
    unexpected = [k for k in res.unexpected_keys if not k.endswith(_TE_ONLY_EXTRA)]
    if res.missing_keys or unexpected:
        raise SystemExit(f"strict load failed: missing {res.missing_keys}, unexpected {unexpected}")


def _spawn(job: dict, tp: int, pp: int, tmp: Path) -> None:
    """One spawned process per rank (forking after megatron-core's save leaves workers that deadlock)."""
    import torch.multiprocessing as mp

    world = tp * pp
    pg = tmp / f"pg_{os.getpid()}_{job['kind']}_{tp}_{pp}"
    if pg.exists():
        pg.unlink()
    mp.spawn(_rank_entry, args=(world, tp, pp, str(pg), job), nprocs=world, join=True)





def _rank_entry(rank: int, world: int, tp: int, pp: int, pg: str, job: dict) -> None:
    if job["kind"] == "load-legacy":
        _patch_cpu()
        _init(rank, world, tp, pp, pg)
        from megatron.core import parallel_state

        t, p = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
        ckpt, dump = Path(job["ckpt"]), Path(job["dump"])
        it = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
        it_dir = ckpt / ("release" if it == "release" else f"iter_{int(it):07d}")
        f = it_dir / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")) / "model_optim_rng.pt"
        obj = torch.load(f, map_location="cpu", weights_only=False)  # written by hybridctl (the file under test)
        m = _model({**job["case"], "padded_vocab": obj["args"].padded_vocab_size}, tp, pp)
        _legacy_load(m, obj)
        dump.mkdir(parents=True, exist_ok=True)
        _dump(m, dump / f"rank_{t}_{p}.safetensors")
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        return
    _rank_main(rank, world, tp, pp, pg, job)


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "write":
        out, cases = Path(argv[1]), json.loads(Path(argv[2]).read_text())
        out.mkdir(parents=True, exist_ok=True)
        _spawn_write(out, cases)
        for name, c in cases.items():
            for tp, pp in c.get("legacy", []):
                job = {"kind": "reshard", "case": c, "ckpt": str(out / name / "dist" / "iter_0000010"),
                       "dump": str(out / name / f"legacy_tp{tp}_pp{pp}")}
                _spawn(job, tp, pp, out)
        print(json.dumps({"ok": True, "cases": list(cases)}))
    elif cmd in ("load-dist", "load-legacy"):
        ckpt, c, tp, pp, dump = Path(argv[1]), json.loads(Path(argv[2]).read_text()), int(argv[3]), \
            int(argv[4]), Path(argv[5])
        if cmd == "load-dist":
            it = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() \
                if (ckpt / "latest_checkpointed_iteration.txt").is_file() else None
            if it is not None:
                ckpt = ckpt / ("release" if it == "release" else f"iter_{int(it):07d}")
        _spawn({"kind": cmd, "case": c, "ckpt": str(ckpt), "dump": str(dump)}, tp, pp, dump.parent)
        print(json.dumps({"ok": True}))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


def _spawn_write(out: Path, cases: dict) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_write_entry, args=(str(out), cases, str(out / "pg_write")), nprocs=1, join=True)


def _write_entry(rank: int, out: str, cases: dict, pg: str) -> None:
    import torch.distributed as dist

    _patch_cpu()
    _init(0, 1, 1, 1, pg)
    for name, c in cases.items():
        _write_case(Path(out), name, c)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
