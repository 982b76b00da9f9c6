"""What a run reports: FLOPs and MFU, the metrics.jsonl file, TensorBoard, and the console line.

- `flops_per_token` and `peak_flops` give DESIGN.md's MFU convention (PaLM's, as nanoGPT uses it):
  6·N + 12·L·d·T FLOPs per token over the device's dense bf16 peak.
- `MetricsWriter` appends one JSON object a line to `logging.metrics_file` (rank 0 only) and,
  optionally, TensorBoard scalars and a Weights & Biases run (`start_wandb`). Training records carry `step, loss, lr, grad_norm,
  tokens_per_s, tflops_per_gpu, mfu, mem_gb, skipped`; eval records `step, val_loss, val_ppl`.
  `mem_gb` is the largest `memory_gb` of any rank (the trainer all-reduces it with MAX at each
  log step; the last pipeline stage usually holds the most), null on CPUs.
- `StepTimer` measures seconds per step and tokens per second over a log interval, and
  `throughput` turns tokens per second into TFLOP/s per GPU and MFU.
- `format_console_line` prints a record as one compact line.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megagpt.config import ModelConfig
from megagpt.estimate import count_parameters

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s, matched in
# order against the CUDA device name: more specific names first.
PEAK_BF16_FLOPS = (
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),          # SXM
    (r"H200.*NVL", 835e12),
    (r"H200", 989e12),          # SXM, and GH200
    (r"B200", 2250e12),
    (r"A100", 312e12),          # SXM and PCIe
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"L4\b", 121e12),
)


def flops_per_token(model_cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6·N + 12·L·d·T.

    N is the parameter count without the position embeddings (the tied embedding counted once,
    as the output projection), L the layers, d the width, T the sequence length; no causal
    discount on the attention term. Recomputation is not counted (this is MFU, not HFU).
    """
    m = model_cfg
    n = count_parameters(m) - m.seq_length * m.d_model
    return 6.0 * n + 12.0 * m.n_layers * m.d_model * m.seq_length


def peak_flops_for_name(name: str) -> float | None:
    """The dense bf16 peak of a CUDA device name from `PEAK_BF16_FLOPS`, or None if unknown."""
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peak
    return None


def peak_flops(device: torch.device | str) -> float | None:
    """The dense bf16 peak FLOP/s of `device`; None on a CPU or an unknown GPU (MFU is then null)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def throughput(tokens_per_s: float, flops_per_tok: float, num_gpus: int,
               peak: float | None) -> tuple[float, float | None]:
    """(TFLOP/s per GPU, MFU) from the global tokens/s; MFU is None when `peak` is unknown.

    Args:
        tokens_per_s: tokens processed per second by the whole job.
        flops_per_tok: `flops_per_token(model_cfg)`.
        num_gpus: processes in the job (the world size).
        peak: `peak_flops(device)`.
    """
    if num_gpus < 1:
        raise ValueError(f"throughput: num_gpus={num_gpus} must be >= 1")
    per_gpu = tokens_per_s * flops_per_tok / num_gpus
    return per_gpu / 1e12, (per_gpu / peak if peak else None)


def memory_gb(device: torch.device | str) -> float | None:
    """Peak memory allocated by tensors on a CUDA device since the start, in GB (1e9 bytes);
    None on a CPU. This rank's only: the trainer logs the maximum over the ranks as `mem_gb`."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


class StepTimer:
    """Seconds per step and tokens per second over the steps since the last `lap()`.

        timer = StepTimer(synchronize=torch.cuda.synchronize)   # or no argument on a CPU
        for step in ...:
            ...train one step...
            timer.step(tokens=global_batch_tokens)
            if step % log_interval == 0:
                seconds_per_step, tokens_per_s = timer.lap()

    Args:
        synchronize: called before reading the clock, so queued GPU work is counted.
        clock: the time source, in seconds (tests pass a fake one).
    """

    def __init__(self, synchronize: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self._synchronize = synchronize
        self._clock = clock
        self._start = self._now()
        self._steps = 0
        self._tokens = 0

    def _now(self) -> float:
        if self._synchronize is not None:
            self._synchronize()
        return self._clock()

    def step(self, tokens: int) -> None:
        """Count one finished step that processed `tokens` tokens (all ranks together)."""
        self._steps += 1
        self._tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent in the block out of the interval (evaluation, checkpoints: as
        Megatron's interval timer, a step's throughput is that of training)."""
        began = self._now()
        try:
            yield
        finally:
            self._start += self._now() - began

    def lap(self) -> tuple[float, float]:
        """(seconds per step, tokens per second) since the last lap, then start a new interval.

        With no step counted, both are 0.
        """
        now = self._now()
        elapsed = now - self._start
        steps, tokens = self._steps, self._tokens
        self._start, self._steps, self._tokens = now, 0, 0
        if steps == 0 or elapsed <= 0:
            return 0.0, 0.0
        return elapsed / steps, tokens / elapsed


def perplexity(loss: float) -> float:
    """exp(loss), inf past what a float holds (null in metrics.jsonl, as NaN is)."""
    return math.inf if loss > 709 else math.exp(loss)


def _plain(value):
    """A JSON value for a record field: tensors and numpy scalars to numbers, NaN/inf to null."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f"metrics record value {value!r} of type {type(value).__name__} is not a "
                    f"number, string, bool or None")


def _holds_something(path: Path) -> bool:
    """A non-empty file or folder."""
    return any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0


class MetricsWriter:
    """Appends records to a JSON-lines file (and TensorBoard), one flushed line per record.

    Args:
        path: the metrics file (`logging.metrics_file`); parent folders are created, and an
            existing file is appended to, so a resumed run continues it.
        tensorboard_dir: write TensorBoard scalars there too (`logging.tensorboard`); None: no.
        wandb_run: a Weights & Biases run (`start_wandb`) that gets every record's numbers too,
            at the record's step; finished by `close`. None: no W&B.
        enabled: False on every rank but 0: nothing is opened or written.
        resume_step: when resuming from the checkpoint of this step, records of later steps (left
            by a run stopped after its last checkpoint) are dropped from the file, and from
            TensorBoard, so the file reads as one run.
        fresh: a run starting at step 0: a metrics file (and TensorBoard folder) already there,
            from another run or an attempt that saved nothing, is moved aside to
            `<name>.previous-<time>` (`set_aside` lists the moves), so the file reads as one run and
            nothing is lost.

    Non-finite numbers (a NaN loss on a skipped step) are written as null: the file stays JSON.
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None,
                 enabled: bool = True, resume_step: int | None = None, fresh: bool = False,
                 wandb_run=None):
        self.path = Path(path)
        self.enabled = enabled
        self.set_aside: list[tuple[Path, Path]] = []     # (what was there, where it went)
        self._file = None
        self._tb = None
        self._wandb = wandb_run
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for old in (self.path, tensorboard_dir):
                if old is not None and Path(old).exists() and _holds_something(Path(old)):
                    kept, n = Path(f"{old}.previous-{stamp}"), 1
                    while kept.exists():             # another start within the same second
                        kept, n = Path(f"{old}.previous-{stamp}-{n}"), n + 1
                    Path(old).rename(kept)
                    self.set_aside.append((Path(old), kept))
        if resume_step is not None and self.path.exists():
            self._drop_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge)

    def _drop_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                record_step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut short by a killed process
            if isinstance(record_step, int) and record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, record: dict) -> None:
        """Append one record; it must have an integer `step`. A no-op when disabled."""
        if not self.enabled:
            return
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"MetricsWriter.write: record['step']={step!r} must be an integer "
                             f"(the optimizer step); record: {record}")
        plain = {key: _plain(value) for key, value in record.items()}
        self._file.write(json.dumps(plain, allow_nan=False) + "\n")
        self._file.flush()
        numbers_of = {key: value for key, value in plain.items() if key != "step" and
                      isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._tb is not None:
            for key, value in numbers_of.items():
                self._tb.add_scalar(key, value, int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers_of, step=int(step))

    def close(self, failed: bool = False) -> None:
        """Close the file and TensorBoard; finish the W&B run, marked failed (exit code 1) when
        the run stopped on an error."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None


WANDB_ID_FILE = "wandb_run_id"


class WandbError(RuntimeError):
    """`wandb.init` failed (not logged in, no network): the message says what to do."""


def start_wandb(project: str, name: str, config: dict, run_dir: str | Path, resuming: bool):
    """A Weights & Biases run (`wandb.init`) for a training run's records, its files under
    `<run_dir>/wandb/`. The W&B run's id is kept in `<run_dir>/wandb_run_id`: a resumed run
    continues the same W&B run, a run starting at step 0 starts a new one. W&B's own settings
    (WANDB_ENTITY, WANDB_MODE=offline, WANDB_API_KEY, ...) come from the environment.

    W&B keeps the steps it was given: after a resume from the checkpoint of step N, records of
    steps N+1... that the stopped attempt had logged stay, and the resumed run's records of
    those steps are dropped by W&B (metrics.jsonl holds the resumed ones)."""
    import wandb

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)
        tmp = id_file.with_name(id_file.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, id_file)
    try:
        return wandb.init(project=project, name=name, id=run_id, resume="allow", config=config,
                          dir=str(run_dir))
    except Exception as e:
        raise WandbError(f"logging.wandb_project={project}: wandb.init failed ({e}); fix: "
                         f"`wandb login` or WANDB_API_KEY, WANDB_MODE=offline on a machine "
                         f"without network (then `wandb sync`), or logging.wandb_project=null") from e


def format_console_line(record: dict, max_steps: int | None = None) -> str:
    """One compact line for a training or eval record; absent or None fields are left out.

        step  120/1000 | loss 4.1234 | lr 3.00e-04 | grad 0.812 | 12,345 tok/s |
        101.2 TFLOP/s | MFU 41.3% | mem 12.3 GB | skipped 0          (on one line)

    Args:
        record: the fields MetricsWriter writes (`mfu` is a fraction, shown as a percentage);
            other keys are not shown.
        max_steps: `training.max_steps`, shown after the step and setting its width.
    """
    formats = [("loss", "loss {:.4f}"), ("val_loss", "val loss {:.4f}"),
               ("val_ppl", "val ppl {:.2f}"), ("lr", "lr {:.2e}"), ("grad_norm", "grad {:.3g}"),
               ("tokens_per_s", "{:,.0f} tok/s"), ("tflops_per_gpu", "{:.1f} TFLOP/s"),
               ("mfu", "MFU {:.1%}"), ("mem_gb", "mem {:.1f} GB"), ("skipped", "skipped {}")]
    step = record.get("step")
    if step is None:
        parts = []
    elif max_steps is not None:
        parts = [f"step {step:>{len(str(max_steps))}}/{max_steps}"]
    else:
        parts = [f"step {step}"]
    for key, fmt in formats:
        value = record.get(key)
        if value is not None:
            parts.append(fmt.format(value))
    return " | ".join(parts)
