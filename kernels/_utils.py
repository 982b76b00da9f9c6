"""Shared helpers of the kernel files: where Triton can run, launch configs, and the input checks.

Triton decides at ``@triton.jit`` time (when a kernel module is imported) whether a kernel is
compiled for a GPU or run by its CPU interpreter: ``TRITON_INTERPRET=1`` must be set before
``megagpt.kernels`` is imported. ``KERNELS_INTERPRETED`` records which of the two the kernels of
this import are. On the CPU they run only when they were built for the interpreter and
``TRITON_INTERPRET=1`` is still set when called; otherwise the public functions run the
plain-torch references, so the model works on any machine.

Launch settings (block sizes, rows a program, warps, pipeline stages) are chosen by Triton's
autotuner on a GPU (`Autotuned`): at the first call with a new key (the sizes that matter, and
the tensors' dtypes) it times each config of a small list and keeps the fastest for that key.
The interpreter cannot time a kernel, so there each kernel has exactly one config, chosen so that
the tests cover several blocks and partial ones.

Where Triton is not installed at all (it ships wheels for Linux only), a stand-in module lets the
kernel files import and define their kernels; every public function then runs its reference.
"""
import functools
import os
import types

import torch

try:
    import triton
    import triton.language as tl
    import triton.testing

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
    triton = types.SimpleNamespace(  # kernels stay plain, never-called functions
        jit=lambda fn: fn,
        Config=lambda kwargs, **options: types.SimpleNamespace(kwargs=kwargs, **options))
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)  # annotations, constants

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = "float16, bfloat16, float32"

if HAS_TRITON:
    @triton.jit
    def _probe_kernel():
        pass

    KERNELS_INTERPRETED = not isinstance(_probe_kernel, triton.runtime.jit.JITFunction)
else:
    KERNELS_INTERPRETED = False


def _time_config(kernel_call, quantiles):
    """How the autotuner times one config: Triton's do_bench with a shorter warm-up and run
    (5 and 25 ms instead of its default 25 and 100); the kernels take microseconds to a few
    milliseconds, so that is still a few to thousands of runs a config."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


AUTOTUNED = []  # every `Autotuned` kernel, for `autotune_choices`

# MEGAGPT_AUTOTUNE=0 (read at import): every kernel launches with the first config of its list, so
# runs are reproducible bit for bit. Tuning picks by timing, which can choose differently from one
# run to the next (a resumed run then continues to rounding, not exactly) and from one rank to
# another (tensor-parallel replicas of a layer norm then round differently).
AUTOTUNE = os.environ.get("MEGAGPT_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def launch_configs(configs, interpreter_config) -> list:
    """The configs a kernel's tuner chooses among: the interpreter's one; on a GPU all of
    ``configs``, or only the first when ``AUTOTUNE`` is off."""
    if KERNELS_INTERPRETED:
        return [interpreter_config]
    return list(configs) if AUTOTUNE else list(configs)[:1]


class Autotuned:
    """A kernel under ``triton.autotune``, launched as ``tuned[grid](*args, **meta)`` with the grid
    a function of the chosen meta-parameters.

    On a GPU it tunes over ``configs`` (``triton.Config``s), once for each new value of the
    arguments named in ``key`` and of the tensor arguments' dtypes; under the interpreter, which
    cannot time kernels, it has the one ``interpreter_config``. ``options`` go to
    ``triton.autotune`` (``prune_configs_by``; ``restore_value`` for a kernel that may write over
    its inputs, since tuning runs it many times). Every config must be valid for every launch: the
    tuner only picks the fastest.

    The autotuner rebuilds its key from every argument at each call (several microseconds of
    Python a launch); so the first launch of a key goes through it, and later ones launch the
    kernel directly with the config it chose, found by a key of the same information: the key
    arguments' values and the tensor arguments' dtypes (the positions of the tensors, the
    kernel's pointers, are the same at every launch of a kernel: our launchers pass them in
    order).
    """

    def __init__(self, kernel, configs, interpreter_config, key, **options):
        self.kernel = kernel
        self.chosen = {}  # launch key -> the chosen config's meta-parameters and options
        if not HAS_TRITON:
            return
        self.tuner = triton.autotune(
            configs=launch_configs(configs, interpreter_config), key=key,
            do_bench=_time_config, **options)(kernel)
        self._key_args = [(kernel.arg_names.index(name), name) for name in key]
        self._tensor_args = None
        AUTOTUNED.append(self)

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **meta):
        if self._tensor_args is None:   # the kernel's pointer arguments, fixed by its launcher
            self._tensor_args = [i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor)]
        device = args[self._tensor_args[0]].device
        if on_another_gpu(device):
            with torch.cuda.device(device):
                return self._launch(grid, *args, **meta)
        key = (*[args[i] if i < len(args) else meta[name] for i, name in self._key_args],
               *[args[i].dtype for i in self._tensor_args])
        options = self.chosen.get(key)
        if options is None:
            self.tuner[grid](*args, **meta)
            self.chosen[key] = self.tuner.best_config.all_kwargs()
        else:
            self.kernel.run(*args, grid=grid, warmup=False, **meta, **options)


def on_another_gpu(device: torch.device) -> bool:
    """Whether `device` is a GPU other than the current one. Triton launches a kernel on the
    current GPU and its current stream, whatever its tensors' device: a launch for tensors on
    another GPU must make theirs current first (a torch op runs on its inputs' device), or it
    faults, or with peer access runs on the wrong GPU unordered with their stream."""
    return device.type == "cuda" and device.index != torch.cuda.current_device()


def autotune_choices() -> dict:
    """{kernel name: {launch key: chosen config}} of every key launched so far in this process,
    as text (the key holds the values of the kernel's key arguments, then the tensor arguments'
    dtypes)."""
    choices = {}
    for tuned in AUTOTUNED:
        for key, options in tuned.chosen.items():
            config = " ".join(f"{name}={value}" for name, value in options.items()
                              if value is not None)
            choices.setdefault(tuned.kernel.__name__, {})[str(key)] = config
    return choices


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of positive integers. Host code uses this and `next_power_of_2`, not Triton's:
    in recent Triton those are constexpr functions, several microseconds a call from Python, and
    a small kernel's launch is as fast as its host code."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()


def drop_blocks_longer_than(size: str, block: str):
    """An ``early_config_prune`` for ``triton.autotune``: drops the configs whose meta-parameter
    ``block`` exceeds the power of two covering the argument ``size`` (such a block is mostly
    padding); when every config's does, keeps those with the shortest ``block``."""
    def prune(configs, named_args, **kwargs):
        limit = next_power_of_2(named_args[size])
        fits = [c for c in configs if c.kwargs[block] <= limit]
        shortest = min(c.kwargs[block] for c in configs)
        return fits or [c for c in configs if c.kwargs[block] == shortest]

    return prune


# (elements a program, warps) of the kernels that handle whole rows, BLOCK_M rows of BLOCK_N
# columns (the row width's power of two) a program: 8 to 32 elements a thread.
_ROW_TILES = ((1024, 4), (2048, 4), (4096, 8), (8192, 8), (16384, 16))


def row_configs(block_n: int, max_tile: int = 16384) -> list:
    """GPU configs of a whole-row kernel for rows padded to ``block_n``: BLOCK_M rows a program
    for each tile size of ``block_n`` to ``max_tile`` elements in `_ROW_TILES`; for rows longer
    than ``max_tile``, the one config of one row a program with the most warps (16)."""
    if block_n > max_tile:
        return [triton.Config({"BLOCK_M": 1}, num_warps=16)]
    return [triton.Config({"BLOCK_M": tile // block_n}, num_warps=warps)
            for tile, warps in _ROW_TILES if block_n <= tile <= max_tile]


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    """The streaming multiprocessors of CUDA device ``device_index`` (asked once a device)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set now to a value Triton reads as on: Triton's own
    reading where it has one (`triton.knobs`, which takes "y" too), else 1/true/on/yes."""
    knobs = getattr(triton, "knobs", None) if HAS_TRITON else None
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_runs_on(device) -> bool:
    """True when this import's Triton kernels can run on tensors of ``device``.

    CUDA: always (Triton installed). CPU: only under the interpreter. Raises when
    ``TRITON_INTERPRET=1`` is set now but the kernels were compiled for the GPU, since the
    variable was set after ``megagpt.kernels`` was imported and cannot take effect.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not HAS_TRITON:
        return False
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    if interpreter_requested() and not KERNELS_INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set, but megagpt.kernels was imported before it was set, so its "
            "kernels were built for a GPU; set TRITON_INTERPRET=1 before importing megagpt.kernels"
        )
    return KERNELS_INTERPRETED and interpreter_requested()


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise unless ``t`` is a tensor of a supported floating dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {_DTYPE_NAMES}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise unless every tensor lies on the same device; names them when they do not."""
    names = list(tensors)
    first = tensors[names[0]].device
    for name in names[1:]:
        if tensors[name].device != first:
            raise ValueError(f"{names[0]} is on {first} but {name} is on {tensors[name].device}; "
                             "all inputs must be on one device")


def check_last_dim(name: str, t: torch.Tensor, size: int, of: str) -> None:
    """Raise unless ``t`` is 1-D of length ``size`` (the last dimension of ``of``)."""
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) to match the last dimension of {of}, "
                         f"got {tuple(t.shape)}")
