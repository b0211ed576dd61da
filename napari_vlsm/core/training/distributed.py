"""A training run over several processes (torchrun): joining the process group, starting every
rank from rank 0's weights, averaging gradients, and deciding by rank 0's numbers."""

from __future__ import annotations

import math
import os

import torch

from napari_vlsm.core.models.backend import TorchBackend


def world_and_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def from_rank0(*values, device=None):
    import torch.distributed as dist

    # NCCL moves only CUDA tensors; gloo takes CPU ones
    t = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return tuple(None if math.isnan(v) else v for v in t.tolist())


def gather_weight_sums(backend) -> list[float]:
    import torch.distributed as dist

    mine = torch.tensor([sum(float(p.detach().double().abs().sum()) for p in backend.module.parameters())],
                        dtype=torch.float64, device=backend.device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [float(t.item()) for t in every]


def all_reduce_grads(params, world: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def start_from_rank0(backend: TorchBackend, world: int) -> None:
    """Every rank of a distributed run starts from rank 0's weights."""
    if world > 1:
        import torch.distributed as dist

        for t in backend.module.state_dict().values():
            dist.broadcast(t, 0)


def init_distributed() -> bool:
    """Join a torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True
