"""One training loop for every task: pretraining, classification, segmentation, anomaly models.

A *task* (a :class:`Task` subclass) owns the model and knows how to turn a batch into a loss and
how to evaluate:

    task.model                          nn.Module (the loop moves it, wraps it in DDP)
    task.training_step(model, batch)    -> {"loss": tensor, ...scalars to log}
    task.evaluate(model, loader, runtime) -> {"metric": float, ...}     (default: {})
    task.param_groups(weight_decay)     -> optimizer groups with optional "lr_scale"
    task.after_step(step, total)        called after every optimizer step; a function of
                                        (step, total) only (a schedule), because a resumed run
                                        calls it once with the restored step
    task.find_unused_parameters         bool for DDP

``loss`` is the *mean* over the batch's samples: the loop weights each batch by its share of the
samples of an optimizer step, so gradient accumulation and DDP give the gradient of the mean loss
over the whole (global) batch, even for a short last batch.

The loop adds: AdamW with warm-up + cosine, bf16 autocast on CUDA (fp32 on CPU), gradient
accumulation and clipping, a NaN/Inf guard (TrainingDiverged; the last good checkpoint is kept),
validation at most ``max_evals`` times per run (evenly spaced over the optimizer steps, always
after the last), a train / val / data split of the wall-clock time, metrics as JSON lines, atomic `last`/`best` checkpoints with RNG state (at each epoch end and every
``checkpoint_every_steps`` optimizer steps), exact resume (mid-epoch too: the already consumed
batches of the deterministic order are skipped), and DDP (gradients averaged by DDP, metrics
reduced across ranks, only rank 0 writes or logs).
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from medmim.config import OptimSettings, RunConfig
from medmim.data.augment import augment_batch
from medmim.data.dataset import set_loader_epoch
from medmim.errors import MedmimError
from medmim.io import safe_torch_load, save_checkpoint, write_json
from medmim.progress import ProgressBar
from medmim.train.checkpoint import rng_state, set_rng_state
from medmim.train.distributed import all_gather_cat, all_reduce_sum, any_rank, barrier, current, gather_objects
from medmim.train.rundir import RunDir


class TrainingDiverged(MedmimError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None = fp32

    @classmethod
    def from_config(cls, run: RunConfig) -> "Runtime":
        want_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise MedmimError("run.device is 'cuda' but no CUDA device is available")
        if want_cuda:
            info = current()
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        return cls(device, resolve_precision(run.precision, device.type))

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def resolve_precision(precision: str, device_type: str) -> Optional[torch.dtype]:
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere; ``bf16``/``fp32`` as asked. None = fp32."""
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


class Task:
    """What the loop trains. Subclasses set ``self.model`` and implement ``training_step``; the rest
    has defaults.

    ``find_unused_parameters``: tell DDP that some parameters may get no gradient (optional parts).
    """

    model: nn.Module
    find_unused_parameters: bool = False

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """``{"loss": mean loss over the batch's samples, ...}``; ``model`` may be the DDP wrapper."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, runtime: "Runtime") -> dict[str, float]:
        """Validation metrics (names without the ``val_`` prefix); {} when the task has none."""
        return {}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups, each with an optional ``lr_scale``."""
        return default_param_groups(self.model, weight_decay)

    def after_step(self, step: int, total: int) -> None:
        """Called after every optimizer step. A function of (step, total) only (a schedule):
        a resumed run calls it once with the restored step."""


def eval_epochs(steps_per_epoch: int, epochs: int, max_evals: int) -> set[int]:
    """The epochs whose end runs validation: at most ``max_evals`` evaluations, spaced evenly over
    the optimizer steps (step ``ceil(k * total / max_evals)``, k = 1..max_evals, rounded up to the
    end of its epoch), the last step always among them. ``max_evals`` 0: every epoch."""
    total = steps_per_epoch * epochs
    if max_evals <= 0 or max_evals >= epochs:
        return set(range(epochs))
    return {(math.ceil(k * total / max_evals) - 1) // steps_per_epoch for k in range(1, max_evals + 1)}


class _Timer:
    """Wall-clock seconds spent waiting for data, validating, and in the rest (training)."""

    def __init__(self, state: dict | None = None):
        self.s = {"train": 0.0, "val": 0.0, "data": 0.0, **(state or {})}

    def add(self, key: str, seconds: float) -> None:
        self.s[key] += seconds


def _timed_batches(batches, timer: _Timer):
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        timer.add("data", time.perf_counter() - t)
        yield batch


class _Fit:
    """The state of one ``fit`` call, split into restore / run an epoch / end an epoch."""

    def __init__(self, task: Task, train_loader, settings: OptimSettings, run: RunDir, runtime: Runtime,
                 val_loader, monitor: str | None, monitor_mode: str, stage: str, max_evals: int,
                 on_epoch_end, log):
        self.info = current()
        self.say = log if self.info.is_main else (lambda _msg: None)
        self.task, self.loader, self.settings, self.run, self.runtime = task, train_loader, settings, run, runtime
        self.val_loader, self.monitor, self.monitor_mode, self.stage = val_loader, monitor, monitor_mode, stage
        self.on_epoch_end = on_epoch_end
        self.last_path = run.checkpoints / "last.pt"
        self.model = task.model.to(runtime.device)
        groups = task.param_groups(settings.weight_decay)
        for g in groups:
            g["lr"] = settings.lr * g.get("lr_scale", 1.0)
        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))
        self.accum = settings.grad_accum
        self.n_batches = len(train_loader)
        self.steps_per_epoch = max(1, math.ceil(self.n_batches / self.accum))
        self.total = self.steps_per_epoch * settings.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total, int(settings.warmup_epochs * self.steps_per_epoch)))
        self.evals = eval_epochs(self.steps_per_epoch, settings.epochs, max_evals)
        self.ddp_model: nn.Module = self.model
        if self.info.enabled:
            self.ddp_model = DDP(self.model, device_ids=[runtime.device.index] if runtime.device.type == "cuda"
                                 else None, find_unused_parameters=task.find_unused_parameters)
        self.start_epoch, self.skip, self.step, self.best = 0, 0, 0, None
        self.bar = ProgressBar(0, stage, enabled=False)  # batches; fit() shows it on an interactive rank 0
        self.carried: Optional[torch.Tensor] = None  # this rank's loss sums of a resumed, cut-off epoch
        self.metrics: dict[str, Any] = {}
        self.timer = _Timer()

    # ---- restore -------------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from ``last.pt``: weights, optimizer, schedule, RNGs, the position in the epoch."""
        info = self.info
        ckpt = safe_torch_load(self.last_path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        ranks_rng = ckpt.get("rng_ranks") or []
        set_rng_state(ranks_rng[info.rank] if len(ranks_rng) == info.world_size else ckpt["rng"])
        self.step, self.best, self.metrics = ckpt["step"], ckpt.get("best"), dict(ckpt.get("metrics") or {})
        self.timer = _Timer(ckpt.get("time_s"))
        if ckpt.get("batch"):  # cut off inside an epoch
            self.start_epoch, self.skip = ckpt["epoch"], int(ckpt["batch"])
            sums = ckpt["sums"]
            self.carried = sums[info.rank].clone() if sums.shape[0] == info.world_size else \
                (sums.sum(0) if info.is_main else torch.zeros(2, dtype=torch.float64))
        else:
            self.start_epoch = ckpt["epoch"] + 1
        if self.step:
            self.task.after_step(self.step, self.total)  # schedules that follow the step count (idempotent)
        self.say(f"[{self.stage}] resumed from {self.last_path} at epoch {self.start_epoch + 1}"
                 + (f", batch {self.skip + 1}/{self.n_batches}" if self.skip else ""))

    def state(self, epoch: int, batch: int, sums: Optional[torch.Tensor]) -> dict[str, Any]:
        rngs = gather_objects(rng_state())  # collective: every rank calls it at the same point
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
                "epoch": epoch, "batch": batch, "step": self.step, "best": self.best, "metrics": self.metrics,
                "sums": sums, "world_size": self.info.world_size, "time_s": dict(self.timer.s)}

    # ---- one epoch -----------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> torch.Tensor:
        """Train one epoch (from the resumed batch, if any); return this rank's (loss sum, count)."""
        info, settings, accum, n_batches = self.info, self.settings, self.accum, self.n_batches
        self.ddp_model.train()
        set_loader_epoch(self.loader, epoch)
        first = self.skip if epoch == self.start_epoch else 0
        plan = _plan(self.loader, n_batches)
        weights = _loss_weights(plan, accum, info.world_size, n_batches)
        sums = self.carried if (first and self.carried is not None) else torch.zeros(2, dtype=torch.float64)
        every = settings.checkpoint_every_steps or 0
        t_start, data0 = time.perf_counter(), self.timer.s["data"]
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(_timed_batches(_batches_from(self.loader, first), self.timer), start=first):
            t_aug = time.perf_counter()  # batched augmentation on the device (medmim.data.augment) is data time
            batch = augment_batch(self.loader, to_device(batch, self.runtime.device))
            self.timer.add("data", time.perf_counter() - t_aug)
            last_micro = (i + 1) % accum == 0 or i + 1 == n_batches
            sync = nullcontext() if (last_micro or not info.enabled) else self.ddp_model.no_sync()
            with sync:
                with self.runtime.autocast():
                    out = self.task.training_step(self.ddp_model, batch)
                loss = out["loss"]
                value = loss.detach().float()
                local_ok = bool(torch.isfinite(value).all())
                if any_rank(not local_ok):
                    what = f"{value.item()}" if not local_ok else "NaN/Inf on another rank"
                    raise TrainingDiverged(
                        f"[{self.stage}] loss became {what} at epoch {epoch + 1}, batch {i + 1} (step {self.step}); "
                        f"stopped. The last good checkpoint is kept at {self.last_path}. "
                        f"Try a lower lr or set clip_grad.")
                if weights is not None:
                    n_real, w = plan[i][0], weights[i]
                else:
                    n_real, w = _batch_size(batch), 1.0 / min(accum, n_batches - (i // accum) * accum)
                (loss * w).backward()
            sums += torch.tensor([value.item() * n_real, n_real], dtype=torch.float64)
            self.bar.advance()
            if last_micro:
                self._optimizer_step(epoch)
                if every and self.step % every == 0 and i + 1 < n_batches:
                    ckpt = self.state(epoch, i + 1, all_gather_cat(sums[None]))
                    if self.run.writer:
                        save_checkpoint(ckpt, self.last_path)
        self.timer.add("train", time.perf_counter() - t_start - (self.timer.s["data"] - data0))
        return sums

    def _optimizer_step(self, epoch: int) -> None:
        if self.settings.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_grad)
            if not torch.isfinite(norm):
                raise TrainingDiverged(
                    f"[{self.stage}] gradient norm became {norm.item()} at epoch {epoch + 1}, step {self.step}; "
                    f"stopped. The last good checkpoint is kept at {self.last_path}.")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.task.after_step(self.step, self.total)

    # ---- end of an epoch -----------------------------------------------------------------------
    def end_epoch(self, epoch: int, sums: torch.Tensor, t0: float) -> None:
        """Log the epoch, validate when scheduled, keep the best, checkpoint."""
        totals = all_reduce_sum(sums)
        metrics = {"stage": self.stage, "epoch": epoch, "step": self.step,
                   "train_loss": float(totals[0] / max(float(totals[1]), 1.0)),
                   "lr": self.scheduler.get_last_lr()[0], "epoch_time_s": round(time.time() - t0, 3)}
        if self.val_loader is not None and epoch in self.evals:
            tv = time.perf_counter()
            metrics.update({f"val_{k}": v for k, v in self.task.evaluate(self.model, self.val_loader,
                                                                         self.runtime).items()})
            self.timer.add("val", time.perf_counter() - tv)
        improved = False
        monitor = self.monitor
        if monitor is not None and monitor in metrics and metrics[monitor] == metrics[monitor]:
            value = metrics[monitor]
            if self.best is None or (value > self.best if self.monitor_mode == "max" else value < self.best):
                self.best, improved = value, True
        metrics["best"] = self.best
        self.metrics = metrics
        # order matters for a kill at any point: the metrics line first (a resumed run drops it and
        # logs it again), then best.pt, then last.pt (which moves the resume point past this epoch)
        self.run.log_metrics(metrics, {"images_per_s": float(totals[1]) / max(metrics["epoch_time_s"], 1e-3)})
        self.say(f"[{self.stage}] epoch {epoch + 1}/{self.settings.epochs} "
                 + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                            if isinstance(v, float) and k not in ("lr", "best")))
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, self.model)
        ckpt = self.state(epoch, 0, None)
        if self.run.writer:
            if improved or monitor is None:
                save_checkpoint({"model": ckpt["model"], "epoch": epoch, "best": self.best},
                                self.run.checkpoints / "best.pt")
            save_checkpoint(ckpt, self.last_path)


def fit(task: Task, train_loader, settings: OptimSettings, run: RunDir, runtime: Runtime, *,
        val_loader=None, monitor: str | None = None, monitor_mode: str = "max", resume: bool = False,
        stage: str = "train", max_evals: int = 0, on_epoch_end: Callable[[int, nn.Module], None] | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``task`` for ``settings.epochs`` epochs; return the final (and best) metrics.

    Validation (``val_loader``) runs at the end of the epochs :func:`eval_epochs` picks: at most
    ``max_evals`` times, spread evenly over the optimizer steps, always after the last one (0: every
    epoch). The result's ``time_s`` splits the wall-clock time into train / val / data (waiting
    for batches).

    With ``resume``: a stage that finished returns its recorded result at once (and ``task.model``
    holds its final weights); one that was cut off continues from its last checkpoint (end of an
    epoch, or every ``settings.checkpoint_every_steps`` optimizer steps) with the same model,
    optimizer, schedule, RNG states and data order, skipping the batches it had already consumed,
    so that it ends with the same numbers as a run that was never interrupted.
    """
    done_file = run.path / "done.json"
    last_path = run.checkpoints / "last.pt"
    if resume and done_file.exists():
        model = task.model.to(runtime.device)
        if last_path.exists():
            model.load_state_dict(safe_torch_load(last_path)["model"])
        return json.loads(done_file.read_text())
    f = _Fit(task, train_loader, settings, run, runtime, val_loader, monitor, monitor_mode, stage, max_evals,
             on_epoch_end, log)
    if resume and last_path.exists():
        f.restore()
    elif run.writer:
        done_file.unlink(missing_ok=True)
    run.keep_metrics(lambda r: r.get("stage") != stage or int(r.get("epoch", -1)) < f.start_epoch)
    # a batch-level bar on a terminal; logs and CI keep the one line per epoch that end_epoch prints
    todo = (settings.epochs - f.start_epoch) * f.n_batches - f.skip
    with ProgressBar(todo, f"[{stage}] batches", enabled=f.info.is_main and sys.stderr.isatty()) as f.bar:
        for epoch in range(f.start_epoch, settings.epochs):
            t0 = time.time()
            f.end_epoch(epoch, f.run_epoch(epoch), t0)
    result = {**f.metrics, "best": f.best, "time_s": {k: round(v, 3) for k, v in f.timer.s.items()}}
    if run.writer:
        write_json(done_file, result)
    barrier()  # every rank may read last.pt / best.pt / done.json after this
    return result


def _plan(loader, n_batches: int) -> Optional[list[tuple[int, int]]]:
    """Per batch (real samples on this rank, samples in the global batch), if the sampler says."""
    sampler = getattr(loader, "batch_sampler", None)
    if hasattr(sampler, "plan"):
        plan = sampler.plan()
        if len(plan) == n_batches:
            return plan
    return None


def _loss_weights(plan, accum: int, world_size: int, n_batches: int) -> Optional[list[float]]:
    """Weight of each batch's mean loss so that the summed (and DDP-averaged) gradient of an
    optimizer step is the gradient of the mean loss over every sample of that step."""
    if plan is None:
        return None
    out = []
    for i, (n_real, _) in enumerate(plan):
        g0 = (i // accum) * accum
        n_step = sum(n for _, n in plan[g0:min(g0 + accum, n_batches)])
        out.append(n_real * world_size / n_step)
    return out


def _batches_from(loader, first: int):
    """Iterate ``loader`` from batch ``first``: the sampler skips (no data read) when it can."""
    if first == 0:
        return loader
    sampler = getattr(loader, "batch_sampler", None)
    if hasattr(sampler, "skip"):
        sampler.skip(first)
        return loader
    it = iter(loader)
    for _ in range(first):
        next(it)
    return it


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).shape[0])
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    return int(batch.shape[0])
