"""Resumable training checkpoints: torch.distributed.checkpoint (DCP) directories published atomically.

Layout under a run directory::

    checkpoints/step_00000100/  DCP shards (model + AdamW tensors, sharded per rank), trainer_state.json (step,
                                tokens, data position), rng_rank{r}.json, complete.json (written last)
    checkpoints/latest          name of the newest complete checkpoint

A checkpoint is written into ``checkpoints/.step_N.tmp`` and renamed into place only once every rank has finished and
``complete.json`` is written; readers take the newest complete one and ignore anything else. Loading unpickles
nothing: ``.metadata`` goes through an allowlist and object entries are refused (safe_pickle.py). The same code
serves one process and FSDP2 (DCP's state-dict helpers), and a checkpoint reshards to any world size.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from hybridctl import parallel
from hybridctl.config import HybridctlError

CKPT_DIR, LATEST, COMPLETE = "checkpoints", "latest", "complete.json"


def _is_complete(d: Path) -> bool:
    return d.is_dir() and (d / COMPLETE).is_file() and (d / ".metadata").is_file()


def find_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint under a run directory / checkpoints directory, or ``path`` itself if it is one.
    Incomplete ones (a crash mid-write: no complete.json) are ignored."""
    p = Path(path)
    if _is_complete(p):
        return p
    root = p / CKPT_DIR if (p / CKPT_DIR).is_dir() else p
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if _is_complete(d):
            return d
    found = sorted(d for d in root.glob("step_*") if _is_complete(d))
    return found[-1] if found else None


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group: that is intended here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _tensor_state(model, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DCP tensors-only state, the optimizer state dict it came from) via DCP's helpers (FSDP2 and one process)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd["state"]}, osd


def _rng_state() -> dict[str, str]:
    enc = lambda t: base64.b64encode(t.cpu().numpy().tobytes()).decode()  # noqa: E731
    out = {"cpu": enc(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["cuda"] = enc(torch.cuda.get_rng_state())
    return out


def _set_rng_state(state: dict[str, str]) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(dec(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(state["cuda"]))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict[str, Any], keep_last: int,
                    info: parallel.DistInfo) -> Path:
    """Write a resumable checkpoint atomically (temporary directory → rename → ``latest``); keep the newest k."""
    import torch.distributed.checkpoint as dcp

    root = run_dir / CKPT_DIR
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    parallel.barrier()
    state, _ = _tensor_state(model, optimizer)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp))
    (tmp / f"rng_rank{info.rank}.json").write_text(json.dumps(_rng_state()))
    parallel.barrier()
    if info.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": info.world_size}))
        old = root / f".step_{step:08d}.old"
        if final.exists():  # replace without a moment where neither copy exists
            shutil.rmtree(old, ignore_errors=True)
            final.replace(old)
        tmp.replace(final)
        from hybridctl.checkpoint.io import atomic_write_text

        atomic_write_text(root / LATEST, final.name + "\n")
        shutil.rmtree(old, ignore_errors=True)
        # checkpoints of later steps belong to an abandoned future (this run resumed from an earlier one): drop them,
        # then keep the newest k up to this step
        steps = sorted(d for d in root.glob("step_*") if d.is_dir())
        for d in [d for d in steps if d.name > final.name] + [d for d in steps if d.name <= final.name][:-keep_last]:
            shutil.rmtree(d, ignore_errors=True)
    parallel.barrier()
    return final


def load_checkpoint(ckpt: Path, model, optimizer, info: parallel.DistInfo) -> dict[str, Any]:
    """Restore model + optimizer tensors (resharded to this run's ranks by DCP) and this rank's RNG; return the
    trainer state (step, tokens, data position)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    from hybridctl.checkpoint.safe_pickle import SafeFileSystemReader, TensorOnlyLoadPlanner

    state, osd = _tensor_state(model, optimizer)
    try:
        with _quiet_single_process():  # .metadata through an allowlist; object entries are refused, not unpickled
            dcp.load(state, storage_reader=SafeFileSystemReader(ckpt), planner=TensorOnlyLoadPlanner())
    except HybridctlError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises many types (CheckpointException is
        # a BaseException) for a mismatching plan or an unreadable file
        raise HybridctlError(f"{ckpt}: cannot restore this checkpoint into the recipe's model/optimizer "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    osd["state"] = state["optim"]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=osd)
    rng = ckpt / f"rng_rank{info.rank}.json"
    if rng.is_file():  # absent when resuming on more ranks than wrote the checkpoint
        _set_rng_state(json.loads(rng.read_text()))
    return json.loads((ckpt / "trainer_state.json").read_text())


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """--resume auto (newest complete checkpoint of the run, none is fine) | never | PATH (must hold one)."""
    mode = (resume or "auto").strip()
    if mode == "never":
        return None
    if mode == "auto":
        return find_checkpoint(run_dir)
    found = find_checkpoint(mode)
    if found is None:
        raise HybridctlError(f"--resume {mode}: no complete checkpoint there")
    return found
