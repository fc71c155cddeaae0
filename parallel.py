"""Distributed set-up in plain torch.distributed; everything runs unchanged without torchrun.

    torchrun --nproc_per_node 4 train.py configs/stage0.yaml     # data parallel (DDP)

`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts NCCL on GPU or gloo on CPU;
without it, it returns a single process on the best device. Leaves out: sequence parallelism (its own issue).
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def pick_device(name: str | None = None) -> torch.device:
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup(device: str | None = None) -> Dist:
    """Start the process group when launched by torchrun; a no-op otherwise."""
    if "RANK" not in os.environ:
        return Dist(device=pick_device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dev = pick_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is True on any (so that all ranks take the same branch)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier():
    if dist.is_initialized():
        dist.barrier()
