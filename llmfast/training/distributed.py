"""Processes for ``llmfast train --distributed ddp|fsdp`` under ``torchrun``: the process group (NCCL with CUDA,
gloo on the CPU), the model wrapped in DDP or sharded with FSDP2 (``fully_shard`` per block, then the root), and
the few collectives the loop needs: a mean over ranks, and :meth:`Cluster.agree`, which turns one rank's error
into the same clear error on every rank instead of a hang in the next collective.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

MODES = ("ddp", "fsdp")


def _error(message: str, exit_code: int = 1) -> Exception:
    from llmfast.cli import CliError

    return CliError(message, exit_code=exit_code)


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as torchrun sets them; ``(0, 1, 0)`` for a plain process."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise _error("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None


@dataclass
class Cluster:
    """This process's place in the run. ``mode`` None is a plain single-process run (no process group)."""

    mode: str | None
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # whether close() should destroy the process group (not when a caller made it)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates into the history and writes the single-file export."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode is not None

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks (each rank's value weighted equally)."""
        value = value.detach().to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32)
        if self.active and self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / self.world_size
        return float(value)

    def agree(self, error: str | None) -> None:
        """Every rank calls this with its own error (or None); if any rank failed, all raise the first message.

        Ranks check their inputs independently, and one that stops alone would leave the others waiting forever
        in the next collective; exchanging the outcome first makes every rank stop with the same message.
        """
        if not (self.active and self.world_size > 1):
            if error:
                raise _error(error)
            return
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, error)
        for rank, message in enumerate(messages):
            if message:
                raise _error(message if rank == self.rank or message == error else f"{message} (rank {rank})")

    def barrier(self) -> None:
        if self.active and self.world_size > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int, distributed: bool) -> torch.device:
    """``--device`` for this process: under torchrun, CUDA means the local rank's GPU."""
    from llmfast.cli import resolve_device as resolve_one

    device = resolve_one(name)
    if distributed and device.type == "cuda":
        if name in ("auto", "cuda"):
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def setup(mode: str | None, device_name: str) -> Cluster:
    """Join (or make) the process group for ``--distributed mode``; a plain run makes none.

    Launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR set): the env:// rendezvous. Without torchrun and with
    ``--distributed``: a one-process group, so the same code (and checkpoints) serve one GPU too. A process group
    that already exists (a test that spawned the workers) is used as it is.
    """
    rank, world_size, local_rank = world_from_env()
    if mode is None:
        if world_size > 1:
            raise _error(f"started as one of {world_size} processes (WORLD_SIZE={world_size}, torchrun?) but "
                         f"without --distributed: add --distributed ddp or --distributed fsdp", exit_code=2)
        return Cluster(None, 0, 1, 0, resolve_device(device_name, 0, False))
    if not dist.is_available():
        raise _error(f"--distributed {mode}: this torch is built without torch.distributed", exit_code=2)
    owns = False
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_name, local_rank, True)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, **kwargs)
        elif world_size == 1:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            raise _error(f"WORLD_SIZE={world_size} but no MASTER_ADDR: start the processes with torchrun",
                         exit_code=2)
        owns = True
    return Cluster(mode, rank, world_size, local_rank, device, owns)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks (GPT ``blocks``, Llama ``layers``): FSDP2's unit of sharding."""
    for name in ("blocks", "layers"):
        if isinstance(getattr(model, name, None), nn.ModuleList):
            return getattr(model, name)
    raise TypeError(f"{type(model).__name__} has no blocks/layers ModuleList to shard")


def wrap(model: nn.Module, cluster: Cluster) -> nn.Module:
    """DDP around the model, or FSDP2 ``fully_shard`` on each block and then the root (which holds the embeddings,
    the final norm and the, possibly tied, lm-head, so the tied matrix stays one parameter)."""
    if cluster.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [cluster.device.index] if cluster.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if cluster.mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5 has FSDP2 under its first name
            from torch.distributed._composable.fsdp import fully_shard

        for block in blocks_of(model):
            fully_shard(block)
        fully_shard(model)
        return model
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, cluster: Cluster, sync: bool) -> Iterator[None]:
    """Within a gradient-accumulation step, skip the gradient reduction on all micro-steps but the last: DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)`` (the gradients accumulate unsharded locally)."""
    if cluster.mode == "ddp" and not sync:
        with model.no_sync():
            yield
    elif cluster.mode == "fsdp":
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
