"""Parallelism as transforms applied from outside to an unmodified HybridLM, plus the process-group plumbing.

Transforms (torchtitan's order: activation checkpointing → compile → FSDP), each in place and keeping every parameter
name, so state dicts, DCP checkpoints and native exports see the model's own names:
  ``apply_activation_checkpointing(model)``  each block recomputes its activations in backward
  ``apply_compile(model)``                  ``torch.compile`` per block (one graph reused by every block of a kind)
  ``apply_fsdp(model, ...)``                FSDP2 (``fully_shard``) per block, then the root

``init_distributed()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on CUDA, gloo on CPU (how
CI tests multi-process training). A single process without torchrun needs no process group at all.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from hybridctl.config import HybridctlError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device  # under torchrun, cuda:LOCAL_RANK

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None) -> torch.device:
    """cpu | cuda | cuda:N; default cuda when present."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise HybridctlError(f"--device {name!r}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HybridctlError(f"--device {name}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise HybridctlError(f"--device {name}: only cpu and cuda are supported")
    return dev


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, name) of what one training process may fill: the GPU's total memory, or the machine's RAM on CPU."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return int(p.total_memory), p.name
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine (RAM)"


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        log.info("process group: rank %d of %d (%s)", rank, world, dist.get_backend())
    return DistInfo(rank, world, dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- collectives that degrade to no-ops in one process ---------------------------------------------------------------


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---- transforms -----------------------------------------------------------------------------------------------------


def _checkpointed_forward(forward, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations during backward (memory ∝ one block instead of all of them).

    The block's ``forward`` is wrapped on the instance, not the module replaced, so parameter names do not change
    (a wrapper module would insert ``_checkpoint_wrapped_module`` into every name).
    """
    for layer in model.layers:
        layer.forward = functools.partial(_checkpointed_forward, layer.forward)
    return model


def apply_compile(model: nn.Module, **compile_options: Any) -> nn.Module:
    """``torch.compile`` each block in place (``Module.compile`` keeps names); blocks of a kind share one graph.
    compile_options go to torch.compile (tests use backend="eager": Dynamo's tracing without code generation)."""
    for layer in model.layers:
        layer.compile(**compile_options)
    return model


def apply_fsdp(model: nn.Module, *, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: shard every block and then the root (embedding, final norm, head) over the default process group.

    param_dtype: compute dtype of the gathered parameters (bf16 for mixed precision; fp32 master weights stay
    sharded); gradients are reduced in ``reduce_dtype``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for i, layer in enumerate(model.layers):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(model.layers) - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


# ---- state dicts shared by FSDP2 and one process (torch.distributed.checkpoint helpers) ---------------------------


def load_full_model_state(model: nn.Module, full: dict[str, torch.Tensor] | None) -> None:
    """Load a full (unsharded) state dict held by rank 0 into a possibly sharded model; other ranks pass None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=True)
    set_model_state_dict(model, full if full is not None else {}, options=opts)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU (gathered from every rank under FSDP; rank 0 gets it, others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


__all__ = ["DistInfo", "init_distributed", "apply_activation_checkpointing", "apply_compile", "apply_fsdp",
           "load_full_model_state", "full_model_state"]
