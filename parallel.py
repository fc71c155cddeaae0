"""Distributed set-up and Ulysses sequence parallelism in plain torch.distributed; everything runs unchanged
without torchrun.

    torchrun --nproc_per_node 4 train.py configs/stage0.yaml              # data parallel (DDP)
    torchrun --nproc_per_node 4 train.py configs/stage3.yaml sp_size=4    # sequence parallel x data parallel
    torchrun --nproc_per_node 4 train.py configs/stage3.yaml sp_size=2 fsdp=true  # ... with sharded weights
    torchrun --nproc_per_node 4 sample.py --prompt "..."                  # sequence-parallel sampling

`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts NCCL on GPU or gloo on CPU;
without it, it returns a single process on the best device. Ranks form a 2-D DeviceMesh (dp x sp):
consecutive groups of `sp_size` ranks share one sample's token sequence (the "sp" dimension: Ulysses), and the
groups split the batch (the "dp" dimension). `fully_shard_model` shards a model with FSDP2 over every rank of
the mesh: the ranks of an SP group hold the same weights and sum their gradients, so they shard them like
data-parallel ranks do (torchtitan's dp_shard x cp mesh does the same).

Ulysses (DeepSpeed-Ulysses, arXiv 2309.14509): each rank holds N/P tokens of the sequence for every layer
except self-attention. Around self-attention one all-to-all trades "my tokens, all heads" for "all tokens,
my H/P heads" (q, k and v in one exchange), so each rank attends over the whole sequence for its heads with
the same Attention Tile mask, and a second all-to-all trades back. The exchanges are autograd functions
whose backward is the inverse exchange.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cli import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    sp_size: int = 1
    sp_group: object = None  # this rank's sequence-parallel process group (None: no sequence parallelism)
    cpu_group: object = None  # every rank over gloo, for agreeing on host-side facts without a GPU sync

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def dp_rank(self):  # which slice of the batch this rank's SP group works on
        return self.rank // self.sp_size

    @property
    def dp_size(self):
        return self.world // self.sp_size


def pick_device(name: str | None = None) -> torch.device:
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r}: this code runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu "
                        "(device=cpu in a training config)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def setup(device: str | None = None, sp_size: int = 1) -> Dist:
    """Start the process group when launched by torchrun; a no-op otherwise. sp_size ranks share a sequence."""
    if "RANK" not in os.environ:
        if sp_size != 1:
            raise UserError(f"sp_size={sp_size} needs {sp_size} processes: launch with torchrun --nproc_per_node")
        return Dist(device=pick_device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if sp_size < 1 or world % sp_size:
        raise UserError(f"sp_size={sp_size} does not divide the {world} processes: start a multiple of {sp_size}")
    dev = pick_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"--nproc_per_node asks for GPU {local}, but only {torch.cuda.device_count()} are "
                            "visible: start at most that many processes per node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    mesh = init_device_mesh(dev.type, (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    cpu_group = dist.new_group(backend="gloo") if dev.type == "cuda" else dist.group.WORLD
    return Dist(rank, world, local, dev, sp_size, mesh.get_group("sp") if sp_size > 1 else None, cpu_group)


def fully_shard_model(model, device, param_dtype=None):
    """FSDP2 over every rank: each block is one unit (its weights are gathered just before it runs and freed
    after), the rest of the model is the root unit. param_dtype: the dtype the weights are gathered in (bf16 mixed
    precision; None keeps them as stored); gradients are reduced in fp32. -> model (its parameters become
    DTensor shards)"""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)
    # inputs are left as they come (autocast picks each op's dtype): a block recomputed by activation checkpointing
    # runs without FSDP's input cast, and its recomputed tensors must match the forward's
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def local_tensor(t):
    """This rank's part of a (possibly sharded, DTensor) tensor: the tensor itself when it is not sharded."""
    return t.to_local() if hasattr(t, "to_local") else t


# ----------------------------------------------------------------------------------------------------------
# Ulysses exchanges

def check_heads(heads: int, sp_size: int, what: str = "sp_size"):
    """Ulysses splits the heads over the group: a clear error, with the sizes that work, where it cannot."""
    if heads % sp_size:
        ok = ", ".join(str(p) for p in range(1, heads + 1) if heads % p == 0)
        raise UserError(f"{what}={sp_size}: the model's {heads} attention heads do not split over {sp_size} "
                        f"processes; use one of {ok}")


def group_size(group) -> int:
    return dist.get_world_size(group)


def _all_to_all(x, group, scatter_dim: int, gather_dim: int):
    P = group_size(group)
    send = x.unflatten(scatter_dim, (P, -1)).movedim(scatter_dim, 0).contiguous()  # [P, ...]: i goes to rank i
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # chunks from ranks 0..P-1, in order (a view with batch 1, where torch.cat would copy)
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim = ctx.args
        return _all_to_all(grad.contiguous(), group, gather_dim, scatter_dim), None, None, None


def seq_to_heads(x, group, seq_dim: int = 1, head_dim: int = 3):
    """[B, N/P, ..., H, ...] (my tokens, all heads) -> [B, N, ..., H/P, ...] (all tokens, my heads)."""
    return _AllToAll.apply(x, group, head_dim, seq_dim)


def heads_to_seq(x, group, seq_dim: int = 1, head_dim: int = 2):
    """The inverse: [B, N, H/P, D] -> [B, N/P, H, D]."""
    return _AllToAll.apply(x, group, seq_dim, head_dim)


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence; every rank then holds (and takes the loss of) the whole output, so the
    backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.args = group, dim
        parts = [torch.empty_like(x) for _ in range(group_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        group, dim = ctx.args
        return grad.chunk(group_size(group), dim=dim)[dist.get_rank(group)].contiguous(), None, None


def gather_seq(x, group, dim: int = 1):
    return _GatherSeq.apply(x, group, dim)


def shard_seq(x, group, dim: int = 1):
    """Pad the sequence to a multiple of the group size and keep this rank's contiguous slice."""
    P, r = group_size(group), dist.get_rank(group)
    N = x.shape[dim]
    pad = -N % P
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim=dim)
    return x.chunk(P, dim=dim)[r]


def group_total(x, group):
    """x summed over the group as the value, with this rank's own gradient: a loss that each rank computes on
    its share (say, its heads) backpropagates that share, while every rank sees (and logs) the total."""
    total = x.detach().clone()
    dist.all_reduce(total, group=group)
    return x + (total - x.detach())


def mean_over_heads(x, group):
    """x: a mean over this rank's H/P heads (after the Ulysses exchange) -> the mean over all H heads as the value,
    backpropagating this rank's share (layer-wise distillation under sequence parallelism); x without a group."""
    return x if group is None else group_total(x / group_size(group), group)


def backward(loss, sp_size: int):
    """loss.backward() for a rank of a sequence-parallel group of sp_size: each rank's gradients cover its own
    tokens, so the sample's gradient is their sum over the group, while DDP and FSDP average over all ranks
    (sp_size times too few): hence the factor."""
    (loss * sp_size).backward()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(x):
    """The mean of a tensor over every rank (a copy); x itself in a single process."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def any_rank(flag: bool, device, group=None) -> bool:
    """True on every rank if it is True on any (so that all ranks take the same branch). With a gloo group
    (Dist.cpu_group) and device "cpu" the agreement never waits for the GPU."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def same_on_all_ranks(value: int, device) -> bool:
    """True on every rank if every rank holds the same integer."""
    if not dist.is_initialized():
        return True
    t = torch.tensor([value, -value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0].item() == value and -t[1].item() == value)


def barrier():
    if dist.is_initialized():
        dist.barrier()
