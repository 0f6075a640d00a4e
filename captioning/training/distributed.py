"""Training under torchrun: rank and world size, the process group, barriers, gradient
averaging, and every rank's final weights digest (ranks that disagree fail the run)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from captioning.training.base import TrainingError

RANKS_FILE = "ranks.json"  # under torchrun: every rank's final weights digest


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True when started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    import torch.distributed as dist

    if _initialized():
        return dist.get_rank()
    # After the process group is gone (train() writing history.json) torchrun's RANK still tells.
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if _initialized():
        dist.barrier()


def average_gradients(model) -> None:
    import torch.distributed as dist

    if not _initialized() or dist.get_world_size() == 1:
        return
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= dist.get_world_size()


def any_rank(flag: torch.Tensor) -> bool:
    """True when the int32 `flag` is set on this rank or any other."""
    import torch.distributed as dist

    if _initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def broadcast_flag(flag: bool, device) -> bool:
    """Rank 0's `flag` on every rank."""
    import torch.distributed as dist

    if not _initialized():
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, 0)
    return bool(tensor.item())


def backend_for(device_type: str) -> str:
    """The torch.distributed backend for one process per device: NCCL between GPUs, gloo on CPUs."""
    return "nccl" if device_type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Under torchrun, a process group for the duration (unless one exists already)."""
    import torch.distributed as dist

    from captioning.config import get_device

    started = False
    if is_distributed() and not dist.is_initialized():
        local = get_device()
        if local.type == "cuda":
            torch.cuda.set_device(local)  # NCCL's collectives run on the current device: this rank's GPU
        dist.init_process_group(backend_for(local.type))
        started = True
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def parallel(module, device):
    """`module` wrapped in DistributedDataParallel when there are several ranks."""
    if world_size() == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes and bytes: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def record_rank_digests(model, device, out_dir: Path) -> None:
    """Every rank's final weights digest, gathered to rank 0 and written to out_dir/ranks.json.

    DistributedDataParallel keeps the replicas equal only if every rank took every step alike;
    ranks that drifted apart would make rank 0's package one of several different models.
    """
    import torch.distributed as dist

    world = world_size()
    mine = torch.tensor(list(bytes.fromhex(weights_digest(model.state_dict()))), dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    digests = [bytes(tensor.tolist()).hex() for tensor in gathered]
    if rank() != 0:
        return
    (out_dir / RANKS_FILE).write_text(
        json.dumps({"world_size": world, "weights_sha256": digests}, indent=1), encoding="utf-8"
    )
    if len(set(digests)) > 1:
        raise TrainingError(f"the {world} ranks ended with different weights (see {out_dir / RANKS_FILE})")
