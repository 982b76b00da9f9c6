"""The one owner of process groups: the rank layout and the tensor-, pipeline-, data- and
embedding-parallel groups built from it.

Ranks are laid out tp fastest, then dp, then pp (Megatron's default order), so the members of a
tensor-parallel group are neighbours (one node's NVLink) and pipeline stages are furthest apart:

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

`RankLayout` is that arithmetic alone, testable without processes. `initialize_parallel(...)`
creates the groups on an initialised `torch.distributed` (gloo or NCCL), and the getters below
return them; every getter fails with a clear message when nothing is initialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankLayout:
    """Pure rank arithmetic for world = tp x pp x dp."""

    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in ("world_size", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"RankLayout: {name}={getattr(self, name)} must be at least 1")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(f"RankLayout: world_size={self.world_size} is not a multiple of "
                             f"tp x pp = {self.tp} x {self.pp}")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for t in range(self.tp)]
                for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for d in range(self.dp)]
                for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for p in range(self.pp)]
                for d in range(self.dp) for t in range(self.tp)]

    def embedding_groups(self) -> list[list[int]]:
        """First and last stage of each pipeline: they hold the two copies of the tied embedding."""
        return [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in self.pp_groups()]

    def model_parallel_groups(self) -> list[list[int]]:
        """All tp x pp ranks holding one replica of the model (for the global gradient norm)."""
        return [[self.rank(t, d, p) for p in range(self.pp) for t in range(self.tp)]
                for d in range(self.dp)]


@dataclass
class ParallelState:
    """This rank's place in the layout and its process groups."""

    layout: RankLayout
    rank: int
    tp_group: object
    dp_group: object
    pp_group: object
    embedding_group: object
    model_parallel_group: object
    pp_ranks: list[int]        # global ranks of this rank's pipeline, stage 0 first

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def tp_world_size(self) -> int:
        return self.layout.tp

    @property
    def dp_world_size(self) -> int:
        return self.layout.dp

    @property
    def pp_world_size(self) -> int:
        return self.layout.pp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


_STATE: ParallelState | None = None


def initialize_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> ParallelState:
    """Create every group on the initialised default process group; call it on all ranks."""
    global _STATE
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_parallel: torch.distributed is not initialised; call "
                           "dist.init_process_group (torchrun sets up its environment) first")
    if _STATE is not None:
        raise RuntimeError("initialize_parallel: the parallel state is already initialised; "
                           "call destroy_parallel() first")
    layout = RankLayout(dist.get_world_size(), tensor_parallel_size, pipeline_parallel_size)
    rank = dist.get_rank()

    def mine(groups: list[list[int]]):
        """new_group must be called by every rank for every group, in the same order."""
        found = None
        for ranks in groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                found = group
        return found

    pp_ranks = next(g for g in layout.pp_groups() if rank in g)
    _STATE = ParallelState(layout=layout, rank=rank, tp_group=mine(layout.tp_groups()),
                           dp_group=mine(layout.dp_groups()), pp_group=mine(layout.pp_groups()),
                           embedding_group=mine(layout.embedding_groups()),
                           model_parallel_group=mine(layout.model_parallel_groups()),
                           pp_ranks=pp_ranks)
    return _STATE


def destroy_parallel() -> None:
    """Forget the groups (the default process group is left to its owner)."""
    global _STATE
    _STATE = None


def is_initialized() -> bool:
    return _STATE is not None


def get_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("the parallel state is not initialised: call "
                           "megagpt.parallel.state.initialize_parallel(tp, pp) after "
                           "torch.distributed.init_process_group")
    return _STATE


def get_tensor_parallel_group():
    return get_state().tp_group


def get_tensor_parallel_rank() -> int:
    return get_state().tp_rank


def get_tensor_parallel_world_size() -> int:
    return get_state().tp_world_size


def get_pipeline_parallel_group():
    return get_state().pp_group


def get_pipeline_parallel_rank() -> int:
    return get_state().pp_rank


def get_pipeline_parallel_world_size() -> int:
    return get_state().pp_world_size


def get_data_parallel_group():
    return get_state().dp_group


def get_data_parallel_rank() -> int:
    return get_state().dp_rank


def get_data_parallel_world_size() -> int:
    return get_state().dp_world_size


def get_embedding_group():
    return get_state().embedding_group


class AnotherRankFailed(RuntimeError):
    """Raised on the other ranks when one failed at something every rank does (it says why)."""


def run_agreed(fn, what: str, errors: tuple[type[BaseException], ...]):
    """fn() on every rank, every rank stopping together when one fails with one of `errors`
    (a file missing or damaged on its node, say): after one all-reduce over the world, the rank
    that failed raises its error and the others raise AnotherRankFailed("another rank could not
    {what}"), instead of waiting in their next collective until its timeout. Returns fn()'s
    result where every rank succeeded. Without a process group, fn() alone."""
    failure = result = None
    try:
        result = fn()
    except errors as e:
        failure = e
    flag = torch.tensor([0 if failure is not None else 1], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if failure is not None:
        raise failure
    if not flag.item():
        raise AnotherRankFailed(f"another rank could not {what}")
    return result
