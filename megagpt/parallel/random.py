"""Random streams for parallel training and layout-independent initialisation.

Dropout must differ across tensor-parallel ranks where activations are sharded (attention heads,
sequence-parallel regions) and agree where they are replicated (the residual stream without
sequence parallelism). Two streams do that, as in Megatron:

- the device's default generator, seeded `seed + 100 * pp_rank`: the same on every tensor- and
  data-parallel rank of a stage;
- the named "tensor-parallel" stream, seeded `seed + 2718 + 100 * pp_rank + tp_rank`, swapped in
  with `get_rng_tracker().fork()` around dropout on sharded activations.

Initialisation does not use either: each parameter is drawn from a generator seeded by (seed, the
parameter's global name) at its full, unsharded shape, and each rank keeps its slice. A model split
any way over tp and pp therefore holds exactly the slices of the single-process model's weights.
"""
from __future__ import annotations

import contextlib
import random
import zlib

import numpy as np
import torch

TP_STREAM = "tensor-parallel"


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states swapped into the device's default generator on `fork(name)`."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")

    def reset(self, device: torch.device) -> None:
        self.states, self.device = {}, torch.device(device)

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists")
        saved = _get_state(self.device)
        torch.manual_seed(seed) if self.device.type == "cpu" else torch.cuda.manual_seed(seed)
        self.states[name] = _get_state(self.device)
        _set_state(self.device, saved)

    @contextlib.contextmanager
    def fork(self, name: str = TP_STREAM):
        """Run the block with stream `name` as the default generator, then restore."""
        if name not in self.states:
            raise RuntimeError(f"RNG stream {name!r} is not set up; call seed_everything(...) first")
        saved = _get_state(self.device)
        _set_state(self.device, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(self.device, saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def seed_everything(seed: int, tp_rank: int = 0, pp_rank: int = 0,
                    device: torch.device | str = "cpu") -> None:
    """Seed Python, NumPy, torch (CPU and the device) and the tensor-parallel stream."""
    device = torch.device(device)
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2 ** 32)
    torch.manual_seed(stage_seed)
    _TRACKER.reset(device)
    _TRACKER.add(TP_STREAM, stage_seed + 2718 + tp_rank)


def parameter_seed(seed: int, name: str) -> int:
    """A seed for one parameter from the run's seed and its layout-independent global name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63


def full_init(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """The unsharded N(0, std) initial value of parameter `name`, the same on every layout (CPU)."""
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def shard(full: torch.Tensor, dim: int, rank: int, world: int, stride: int = 1) -> torch.Tensor:
    """This rank's slice of `full` along `dim`.

    stride > 1 views the dimension as `stride` equal blocks (e.g. the query, key and value
    projections stacked in one weight) and takes this rank's part of each block, so a rank gets
    the heads' q, k and v together.
    """
    size = full.shape[dim]
    if size % (stride * world):
        raise ValueError(f"shard: dim {dim} of size {size} does not split into {stride} blocks "
                         f"x {world} ranks")
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(world, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def unshard(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every rank's slice, rank order."""
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[b] for p in per_rank], dim=dim) for b in range(stride)], dim=dim)


class _SaveTrackerStates:
    def __init__(self, saved: dict):
        self.saved = saved

    def __enter__(self):
        self.saved.update(_TRACKER.get_states())

    def __exit__(self, *exc):
        return False


class _RestoreTrackerStates:
    def __init__(self, saved: dict):
        self.saved, self.current = saved, None

    def __enter__(self):
        self.current = _TRACKER.get_states()
        _TRACKER.set_states(self.saved)

    def __exit__(self, *exc):
        _TRACKER.set_states(self.current)
        return False


def recompute_contexts():
    """`context_fn` for torch.utils.checkpoint: the recomputation draws the same dropout masks
    from the tracker's streams as the original forward did (torch restores the default stream)."""
    saved: dict = {}
    return _SaveTrackerStates(saved), _RestoreTrackerStates(saved)
