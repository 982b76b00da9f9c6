"""Training through DeepSpeed: when `parallel.deepspeed_config` names a DeepSpeed JSON, the model
trains through `deepspeed.initialize` (ZeRO stage 0 to 3) instead of our data-parallel `Engine`.

`DeepSpeedEngine(cfg, state, device)` has the surface the Trainer uses from `Engine`:

    chunks                        [the model], built and initialised exactly as Engine builds it;
                                  weights loaded into it before start() are what DeepSpeed gets
    start()                       deepspeed.initialize(model, our AdamW parameter groups (no decay
                                  on biases, norms, embeddings), the merged config: ds_config.py)
    train_step(microbatches, lr)  -> StepResult; eval_step(microbatches) -> float
    global_tokens(microbatches)   -> float: the loss tokens of a step, summed over replicas
    save(...), load(path)         checkpoints in our layout, DeepSpeed's files inside (see below)

The loss and gradients equal the native path's (in fp32; in bf16/fp16 DeepSpeed accumulates
and reduces them in the 16-bit type, the native path in float32). Each micro-batch back-propagates
`loss_sum x gas x dp / global tokens`; DeepSpeed divides by gas (gradient accumulation) and
averages over the dp ranks, so the gradients are those of the global mean loss over every token of
the global batch, as `Engine` makes them; the reported loss is the same global sum / tokens. The
learning rate of our schedule is set on the optimizer's groups before every step; DeepSpeed clips
to `training.grad_clip` and steps at the last micro-batch. A step whose gradients are not finite
is skipped by DeepSpeed (ZeRO 1-3, bf16's overflow check, fp16's loss scaler; at the scale's
minimum it skips too, instead of raising), and here for ZeRO-0 without DeepSpeed's 16-bit wrapper
(fp32, or torch_autocast), which has no such check (the optimizer's update is left out; the
gradient norm is computed here too); `StepResult.skipped` says so.

A checkpoint is our step folder (atomic, `latest`, `keep_last`, hashes in meta.json), holding:
DeepSpeed's own `save_checkpoint` files under `deepspeed/` (module, ZeRO-partitioned optimizer
and loss-scaler state, its step counters), `model_tp0_pp0.pt` with the full fp32 weights (so
generate.py, convert_checkpoint.py and checkpoint.pretrained read it as any checkpoint of ours),
and our per-rank `optim_rank*.pt` (skipped-step count) and `rng_rank*.pt`; meta.json's `parallel`
says `engine: deepspeed` and the ZeRO stage.

On CPUs DeepSpeed picks its CPU accelerator (DS_ACCELERATOR=cpu is set here when the device is a
CPU and nothing chose one) over the gloo process group the entry point created; its
shared-memory collectives (`deepspeed_shm_comm`, a C++ op it would compile) are marked
incompatible, and the optimizer is torch's AdamW (`torch_adam`), so nothing is compiled.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from megagpt.config import Config, ConfigError, read_json
from megagpt.data.documents import document_inputs
from megagpt.model.gpt import build_stage, loss_tokens
from megagpt.parallel.state import ParallelState, run_agreed
from megagpt.training import checkpoint as ckpt
from megagpt.training.ds_config import merge_deepspeed_config, resolve_deepspeed_path
from megagpt.training.engine import StepResult, sum_losses, to_device
from megagpt.training.optim import param_groups, set_hyperparameters, set_lr

DS_TAG = "deepspeed"           # DeepSpeed's folder inside a step folder


class DeepSpeedError(RuntimeError):
    """DeepSpeed cannot train this run here (not importable, another accelerator, a precision
    or layout it lacks); the message names the setting and the fix."""


def import_deepspeed(device: torch.device):
    """deepspeed, set up for `device`: its CPU accelerator on a CPU, no shared-memory op build."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise DeepSpeedError(f"parallel.deepspeed_config is set but deepspeed cannot be imported "
                           f"({e}); fix: pip install 'deepspeed>=0.19' (pip install -e "
                           f"'.[deepspeed]'), or remove parallel.deepspeed_config to train "
                           f"through the native data-parallel path") from e
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if (accelerator.device_name() == "cpu") != (device.type == "cpu"):
        raise DeepSpeedError(f"DeepSpeed chose its {accelerator.device_name()} accelerator but the "
                           f"model is on {device}; fix: set DS_ACCELERATOR="
                           f"{'cpu' if device.type == 'cpu' else device.type} (it is "
                           f"{os.environ.get('DS_ACCELERATOR')!r})")
    if accelerator.device_name() == "cpu":
        with _stderr_silenced():   # the probe test-links optional ops (-laio) and says so on fd 2
            compatible = deepspeed.ops.__compatible_ops__
        compatible["deepspeed_shm_comm"] = False
    return deepspeed


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 (this process's and its children's stderr) to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)



def scale_can_back_off(optimizer) -> bool:
    """Whether DeepSpeed's fp16 loss scale is dynamic and above its minimum, read from its
    optimizer: the ZeRO optimizers keep a `loss_scaler` (dynamic, cur_scale, min_scale), the
    fp16 optimizer a `loss_scale_config`. False when neither says so (a static scale, bf16, or
    fields this DeepSpeed names otherwise): its skips then count as faults."""
    for holder in (getattr(optimizer, "loss_scaler", None),
                   getattr(optimizer, "loss_scale_config", None)):
        if holder is None:
            continue
        dynamic = getattr(holder, "dynamic", getattr(holder, "dynamic_loss_scale", False))
        low = getattr(holder, "min_scale", getattr(holder, "min_loss_scale", None))
        scale = getattr(holder, "cur_scale", None)
        return bool(dynamic) and None not in (low, scale) and scale > low
    return False


def keep_skipping_at_min_scale(optimizer) -> None:
    """DeepSpeed's dynamic fp16 loss scaler raises a bare Exception ("Current loss scale already
    at minimum") from inside `step()` when it would back off below its minimum: here it stays
    at its minimum and skips the step, as ours does, so the skip counts as a fault and the run
    stops only after `training.max_skipped_steps` of them in a row, with our message."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if hasattr(scaler, "raise_error_at_min_scale"):
        scaler.raise_error_at_min_scale = False


class DeepSpeedEngine:
    """The model, trained through DeepSpeed. See the module docstring."""

    def __init__(self, cfg: Config, state: ParallelState, device: torch.device | str = "cpu"):
        self.cfg, self.state, self.device = cfg, state, torch.device(device)
        if state.tp_world_size != 1 or state.pp_world_size != 1:
            raise DeepSpeedError(f"parallel.deepspeed_config={cfg.parallel.deepspeed_config}: the "
                             f"DeepSpeed engine runs data parallel only, but the layout has tp "
                             f"{state.tp_world_size} and pp {state.pp_world_size}; fix: set "
                             f"tensor_parallel_size and pipeline_parallel_size to 1")
        raw = read_json(resolve_deepspeed_path(cfg), "parallel.deepspeed_config")
        self.ds_config, problems = merge_deepspeed_config(raw, cfg, state.dp_world_size)
        if problems:
            raise ConfigError(problems, cfg.source)
        if cfg.training.precision == "fp16" and self.device.type == "cpu":
            raise DeepSpeedError("training.precision=fp16: DeepSpeed has no fp16 on CPUs; fix: "
                                 "training.precision=bf16 or fp32")
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        # ZeRO-0 without DeepSpeed's bf16/fp16 wrapper (fp32, or torch_autocast over float32
        # weights) steps torch's AdamW directly: DeepSpeed neither checks its gradients nor
        # reports their norm, so this engine does both
        self.own_check = self.zero_stage == 0 and not any(
            isinstance(self.ds_config.get(p), dict) and self.ds_config[p].get("enabled") is True
            for p in ("bf16", "fp16"))
        self.gas = int(self.ds_config["gradient_accumulation_steps"])
        self.deepspeed = import_deepspeed(self.device)
        self.chunks = [build_stage(cfg, tp_group=state.tp_group, device=self.device)]
        self.ds = None         # the DeepSpeed engine, from start()

    @property
    def description(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage} ({self.cfg.parallel.deepspeed_config})"

    def master_weights(self):
        """As `Engine.master_weights`. Weights are loaded before `start()`, while the chunk still
        holds its float32 weights, so there is nothing to swap in."""
        return contextlib.nullcontext()

    def start(self) -> None:
        """deepspeed.initialize: after any weights are loaded into `chunks[0]`; collective."""
        if self.ds is not None:
            return
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedEngine.start: torch.distributed is not initialised; the "
                               "entry point (pretrain_gpt.py) creates the process group first")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r".*torch\.distributed\.(all_gather_into_tensor|"
                                        r"reduce_scatter_tensor).* is deprecated")
        model = self.chunks[0]
        groups = param_groups(model.named_parameters(), self.cfg.training.weight_decay)
        self.ds, _, _, _ = self.deepspeed.initialize(model=model, model_parameters=groups,
                                                     config=self.ds_config,
                                                     dist_init_required=False)
        keep_skipping_at_min_scale(self.ds.optimizer)

    def _engine(self):
        self.start()
        return self.ds

    # ---- steps --------------------------------------------------------------------------

    def _to_device(self, microbatches):
        return to_device(microbatches, self.device)

    def _dp_sum(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64)
        if self.state.dp_world_size > 1:
            dist.all_reduce(total, group=self.state.dp_group)
        return total.item()

    def global_tokens(self, microbatches) -> float:
        """The loss tokens of the global batch (their summed loss-mask weights); call it on the
        CPU micro-batches, before `_to_device` (as `Engine` does), so counting them is no device
        sync."""
        local = sum(loss_tokens(mb["labels"], mb.get("loss_mask")) for mb in microbatches)
        return self._dp_sum(local)

    def train_step(self, microbatches: list[dict], lr: float) -> StepResult:
        """One optimizer step over this rank's `gradient_accumulation_steps` micro-batches."""
        ds = self._engine()
        if len(microbatches) != self.gas:
            raise ValueError(f"DeepSpeedEngine.train_step: {len(microbatches)} micro-batches, the "
                             f"DeepSpeed config accumulates {self.gas}")
        ds.train()
        can_back_off = scale_can_back_off(ds.optimizer)   # before this step's update
        tokens = self.global_tokens(microbatches)     # before the copy: no device sync
        if not tokens:             # as Engine: no loss in the global batch, no step at all
            return StepResult(math.nan, None, True, 0.0)
        microbatches = self._to_device(microbatches)
        factor = self.gas * self.state.dp_world_size / tokens
        set_lr(ds.optimizer, lr)
        loss_sums, own_norm = [], None
        for i, mb in enumerate(microbatches):
            loss_sum, _ = ds(mb["tokens"], mb["labels"], mb.get("loss_mask"),
                             **document_inputs(mb))
            loss_sums.append(loss_sum.detach())         # no sync per micro-batch
            ds.backward(loss_sum * factor)
            if i == self.gas - 1 and self.own_check:
                own_norm = self._zero0_grad_norm()
                if not math.isfinite(own_norm):
                    with self._zero0_skip_update():
                        ds.step()
                    continue
            ds.step()
        loss = self._dp_sum(sum_losses(loss_sums)) / tokens
        norm = own_norm if own_norm is not None else ds.get_global_grad_norm()
        norm = None if norm is None else float(norm)     # None: DeepSpeed computed none
        skipped = (not ds.was_step_applied() or not math.isfinite(loss)
                   or (norm is not None and not math.isfinite(norm)))
        # an overflow a dynamic fp16 scale above its minimum backs off from is not a fault
        overflow = (skipped and self.cfg.training.precision == "fp16" and math.isfinite(loss)
                    and can_back_off)
        return StepResult(loss, None if skipped else norm, skipped, tokens, overflow)

    def _zero0_grad_norm(self) -> float:
        """ZeRO-0 without DeepSpeed's 16-bit wrapper (torch's AdamW, gradients already averaged
        over the ranks at the last micro-batch): the global gradient norm, which DeepSpeed does
        not report there."""
        grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    @contextlib.contextmanager
    def _zero0_skip_update(self):
        """ZeRO-0 without DeepSpeed's 16-bit wrapper has no overflow check: around ds.step(),
        zero the non-finite gradients (for its clipping) and make the optimizer's step a no-op,
        so no parameter or optimizer state changes, while DeepSpeed's step counters advance as
        on any step."""
        opt = self.ds.optimizer
        for p in self.ds.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        opt.step = lambda *args, **kwargs: None
        try:
            yield
        finally:
            del opt.step                        # the class's step again

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict]) -> float:
        """The global mean loss of a batch, without gradients."""
        ds = self._engine()
        ds.eval()
        tokens = self.global_tokens(microbatches)     # before the copy: no device sync
        microbatches = self._to_device(microbatches)
        loss_sums = [ds(mb["tokens"], mb["labels"], mb.get("loss_mask"), **document_inputs(mb))[0]
                     for mb in microbatches]
        return self._dp_sum(sum_losses(loss_sums)) / tokens if tokens else math.nan

    # ---- weights and checkpoints --------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model, fp32, on the CPU, on data-parallel rank 0 ({} elsewhere); collective
        (ZeRO gathers each parameter's fp32 master copy)."""
        from deepspeed.utils import safe_get_full_fp32_param
        ds = self._engine()
        keep = self.state.dp_rank == 0
        params = dict(ds.module.named_parameters())
        out = {}
        for name, value in ds.module.state_dict().items():
            if name in params:
                full = safe_get_full_fp32_param(params[name])
                value = params[name].detach() if full is None else full   # ZeRO-0: the params
            if keep:
                out[name] = value.detach().float().cpu().clone()
        return out

    def save(self, save_dir: str | Path, step: int, *, meta: dict, extra_state: dict,
             rng_state: dict, keep_last: int, all_min, warn=None) -> Path:
        """Write the checkpoint of `step` (collective): ckpt.save_checkpoint's folder with
        DeepSpeed's files in `deepspeed/` and the full fp32 weights in model_tp0_pp0.pt."""
        ds, s = self._engine(), self.state
        model_state = {"chunk0": self.full_state_dict()}

        def write_deepspeed(tmp: Path) -> None:
            if not ds.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False):
                raise ckpt.CheckpointError(f"DeepSpeed's save_checkpoint into {tmp} failed")

        return ckpt.save_checkpoint(save_dir, step, rank=s.rank, tp_rank=0, pp_rank=0,
                                    dp_rank=s.dp_rank, model_state=model_state,
                                    optim_state=extra_state, rng_state=rng_state, meta=meta,
                                    keep_last=keep_last, all_min=all_min,
                                    write_extra=write_deepspeed, warn=warn)

    def load(self, path: str | Path) -> tuple[dict, dict]:
        """Restore DeepSpeed's state from step folder `path` after checking every file's SHA-256
        (the ranks share the hashing); returns this rank's (extra_state, rng_state). Collective."""
        ds, path = self._engine(), Path(path)
        meta = ckpt.read_meta(path)
        self._verify_engine_files(path, meta)
        loaded, _ = ds.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        if loaded is None:
            raise ckpt.CheckpointError(f"{path}: DeepSpeed found no checkpoint in {path / DS_TAG}")
        set_hyperparameters(ds.optimizer, self.cfg.training)  # the saved ones came with the state
        keep_skipping_at_min_scale(ds.optimizer)             # and the saved loss scaler
        source = self.state.rank if self.state.rank < meta["world_size"] else 0
        return run_agreed(       # a rank that cannot read its own files stops every rank
            lambda: (ckpt._read_verified(path, ckpt.optim_file(source), meta, True),
                     ckpt._read_verified(path, ckpt.rng_file(source), meta, True)),
            f"read its part of {path}", (ckpt.CheckpointError, OSError))

    def _verify_engine_files(self, path: Path, meta: dict) -> None:
        ours = set(ckpt.expected_files(1, 1, meta["world_size"]))
        theirs = sorted(f for f in meta["files"] if f not in ours)
        if not any(f.startswith(f"{DS_TAG}/") for f in theirs):
            raise ckpt.CheckpointError(f"{path} holds no DeepSpeed files ({DS_TAG}/); it was not "
                                       f"saved by the DeepSpeed engine")
        rank, world = self.state.rank, self.state.layout.world_size
        errors = []
        for f in theirs[rank::world]:
            actual = ckpt.sha256_file(path / f) if (path / f).is_file() else "missing"
            if actual != meta["files"][f]:
                errors.append(f"{path / f} is corrupt or missing: SHA-256 {actual}, meta.json "
                              f"records {meta['files'][f]}")
        gathered = [None] * world
        dist.all_gather_object(gathered, errors)
        errors = [e for part in gathered for e in part]
        if errors:
            raise ckpt.CheckpointError("; ".join(errors) + "; resume from an earlier checkpoint "
                                       "(checkpoint.load=<save_dir>/step_NNNNNNN)")
