"""Data-parallel training and evaluation across processes started by ``torchrun`` (gloo on CPU, nccl on GPU).

One step on W ranks: the global batch of the config (rows [s, s + B) of the epoch, the same permutation and
the same binarised pixels on every rank, from the shared data stream) is split into W contiguous shards;
rank r computes the gradient of the mean over its shard with its own noise stream (seeded from the seed and
r), scales it by B_r/B and one all-reduce (sum) of the flat gradient buffer gives every rank the gradient
of the global batch mean. Every rank then applies the same Adam update to the same weights, so the weights
stay identical without a broadcast. This is DistributedDataParallel's algorithm written for vaelab's flat
buffers: the fused engine computes gradients without autograd, where DDP's hooks would never fire, and the
flat buffer makes DDP's bucketing one all-reduce. Rank 0 alone writes checkpoints and metrics; a checkpoint
keeps every rank's noise stream, so a run resumes bitwise under the same world size (a different one is
refused: its shards and streams would differ).

Multi-node: the same command on every node with torchrun's rendezvous flags, e.g.
``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m vaelab train
--out /shared/run``; the run directory and the data must be on a file system every node sees.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from dataclasses import dataclass

import torch

from vaelab.errors import UsageError, VaelabError


class RankLost(VaelabError):
    """Another rank ended (killed, crashed, its machine gone) while this one waited for it in a collective."""

    exit_code = 1


# (host digest, pid) of every rank, gathered once when the process group starts; what lets a survivor name
# the rank it lost (on its own machine, by a pid that no longer runs).
_peers: list[tuple[int, int]] = []


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def torchrun(self) -> str:
        """The torchrun command that starts as many processes ("" for one)."""
        nodes = self.size // max(1, self.local_size)
        return "" if not self.distributed else (f"torchrun --nproc-per-node {self.local_size}" if nodes == 1 else
                                                f"torchrun --nnodes {nodes} --nproc-per-node {self.local_size} (with "
                                                f"the rendezvous flags)")

    @property
    def launcher(self) -> str:
        """What starts vaelab as this world: `vaelab`, or torchrun's `-m vaelab` (a run resumes exactly only under
        the world size that wrote it)."""
        return f"{self.torchrun} -m vaelab" if self.distributed else "vaelab"


SINGLE = World()


def world_from_environment() -> World:
    """The process's place among torchrun's processes (RANK, WORLD_SIZE, …), or a world of one."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError as exc:
        raise UsageError(f"torchrun's environment is malformed ({exc})") from exc
    return World(rank, size, local_rank, local_size) if size > 1 else SINGLE


def init(world: World) -> None:
    """Join the process group: gloo for CPU tensors, nccl for GPU tensors where there is a GPU; nothing for a
    world of one."""
    import torch.distributed as dist

    if world.distributed and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=world.rank, world_size=world.size)
        me = torch.tensor([_host_digest(), os.getpid()], dtype=torch.int64)
        _peers[:] = [tuple(int(v) for v in part) for part in gather(me, world)]


def _host_digest() -> int:
    return int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:7], "little")


def lost_ranks(world: World) -> str:
    """Which rank(s) this one lost: those on this machine whose process has ended, else what can be said."""
    from vaelab.resources import process_runs

    here = _host_digest()
    gone = [rank for rank, (host, pid) in enumerate(_peers)
            if rank != world.rank and host == here and not process_runs(pid)]
    if gone:
        return ", ".join(f"rank {rank} (pid {_peers[rank][1]} has ended)" for rank in gone)
    if world.size == 2:
        return f"rank {1 - world.rank}"
    return "another rank (one on another machine, or one whose process still runs but stopped answering)"


def _collective(function):
    """A collective whose failure because a peer went away is a one-line RankLost, not gloo's traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except RuntimeError as exc:          # gloo: "Connection reset by peer", "Connection closed by peer", …
            world = next((a for a in (*args, *kwargs.values()) if isinstance(a, World)), SINGLE)
            reason = str(exc).split("] ", 1)[-1].split(". ")[0]
            raise RankLost(f"rank {world.rank} of {world.size} lost {lost_ranks(world)} ({reason})") from exc

    return wrapper


def shard(x: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous rows of a global batch (sizes differ by at most one)."""
    return x.tensor_split(world.size)[world.rank] if world.distributed else x


def shard_start(x: torch.Tensor, world: World) -> int:
    """The index in ``x`` of the first row of this rank's ``shard``."""
    return sum(len(part) for part in x.tensor_split(world.size)[:world.rank]) if world.distributed else 0


@_collective
def all_reduce_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """In-place sum over ranks."""
    if world.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when it is true on any (a stop signal seen by one rank stops all at the same step)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_(value, world)
    return bool(value.item() > 0)


@_collective
def gather(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all), in rank order, on every rank."""
    if not world.distributed:
        return [tensor]
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def gather_rows(values: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's (n_r, …) rows in rank order; n_r may differ by rank."""
    if not world.distributed:
        return values
    counts = gather(torch.tensor([len(values)], device=values.device), world)
    longest = max(int(c) for c in counts)
    padded = torch.zeros((longest, *values.shape[1:]), dtype=values.dtype, device=values.device)
    padded[: len(values)] = values
    return torch.cat([part[: int(count)] for part, count in zip(gather(padded, world), counts)])


@_collective
def broadcast_json(value, world: World):
    """Rank 0's JSON-able ``value`` on every rank (as UTF-8 bytes in a tensor: nothing is unpickled)."""
    if not world.distributed:
        return value
    import json

    import torch.distributed as dist

    payload = json.dumps(value).encode() if world.main else b""
    length = torch.tensor([len(payload)], dtype=torch.int64)
    dist.broadcast(length, src=0)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if world.main else \
        torch.empty(int(length), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return json.loads(bytes(data.tolist()).decode())


def on_main(world: World, action):
    """Run ``action`` on rank 0; if it fails with a VaelabError, every rank raises one with the same message
    and exit code, so that no rank waits forever in a collective for a rank that gave up. Returns rank 0's
    result (JSON-able) on every rank."""
    if not world.distributed:
        return action()
    outcome = None
    if world.main:
        try:
            outcome = {"ok": action()}
        except VaelabError as exc:
            outcome = {"error": str(exc), "code": exc.exit_code}
    outcome = broadcast_json(outcome, world)
    if "error" in outcome:
        error = VaelabError(outcome["error"])
        error.exit_code = outcome["code"]
        raise error
    return outcome["ok"]


@_collective
def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
