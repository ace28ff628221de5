"""One training loop for every task: pretraining, classification, segmentation, anomaly models.

A *task* owns the model and knows how to turn a batch into a loss and how to evaluate:

    task.model                          nn.Module (the loop moves it, wraps it in DDP)
    task.training_step(model, batch)    -> {"loss": tensor, ...scalars to log}
    task.evaluate(model, loader, runtime) -> {"metric": float, ...}     (optional)
    task.param_groups(weight_decay)     -> optimizer groups with optional "lr_scale" (optional)
    task.after_step(step, total)        called after every optimizer step (optional); it must be a
                                        function of (step, total) only (a schedule), because a
                                        resumed run calls it once with the restored step
    task.find_unused_parameters         bool for DDP (optional)

``loss`` is the *mean* over the batch's samples: the loop weights each batch by its share of the
samples of an optimizer step, so gradient accumulation and DDP give the gradient of the mean loss
over the whole (global) batch, even for a short last batch.

The loop adds: AdamW with warm-up + cosine, bf16 autocast on CUDA (fp32 on CPU), gradient
accumulation and clipping, a NaN/Inf guard (TrainingDiverged; the last good checkpoint is kept),
metrics as JSON lines, atomic `last`/`best` checkpoints with RNG state (at each epoch end and every
``checkpoint_every_steps`` optimizer steps), exact resume (mid-epoch too: the already consumed
batches of the deterministic order are skipped), and DDP (gradients averaged by DDP, metrics
reduced across ranks, only rank 0 writes or logs).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from medmim.config import OptimSettings, RunConfig
from medmim.data.dataset import set_loader_epoch
from medmim.errors import MedmimError
from medmim.io import write_json
from medmim.train.checkpoint import rng_state, safe_torch_load, save_checkpoint, set_rng_state
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


def fit(task, train_loader, settings: OptimSettings, run: RunDir, runtime: Runtime, *,
        val_loader=None, monitor: str | None = None, monitor_mode: str = "max", resume: bool = False,
        stage: str = "train", on_epoch_end: Callable[[int, nn.Module], None] | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``task`` for ``settings.epochs`` epochs; return the final (and best) metrics.

    With ``resume``: a stage that finished returns its recorded result at once (and ``task.model``
    holds its final weights); one that was cut off continues from its last checkpoint (end of an
    epoch, or every ``settings.checkpoint_every_steps`` optimizer steps) with the same model,
    optimizer, schedule, RNG states and data order, skipping the batches it had already consumed,
    so that it ends with the same numbers as a run that was never interrupted.
    """
    info = current()
    say = log if info.is_main else (lambda _msg: None)
    done_file = run.path / "done.json"
    last_path = run.checkpoints / "last.pt"
    model = task.model.to(runtime.device)
    if resume and done_file.exists():
        if last_path.exists():
            model.load_state_dict(safe_torch_load(last_path)["model"])
        return json.loads(done_file.read_text())

    groups = task.param_groups(settings.weight_decay) if hasattr(task, "param_groups") else \
        default_param_groups(model, settings.weight_decay)
    for g in groups:
        g["lr"] = settings.lr * g.get("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))
    accum = settings.grad_accum
    n_batches = len(train_loader)
    steps_per_epoch = max(1, math.ceil(n_batches / accum))
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, int(settings.warmup_epochs * steps_per_epoch)))
    ddp_model: nn.Module = model
    if info.enabled:
        ddp_model = DDP(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                        find_unused_parameters=getattr(task, "find_unused_parameters", False))

    start_epoch, skip, step, best = 0, 0, 0, None
    carried: Optional[torch.Tensor] = None  # this rank's loss sums of a resumed, cut-off epoch
    metrics: dict[str, Any] = {}
    if resume and last_path.exists():
        ckpt = safe_torch_load(last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        ranks_rng = ckpt.get("rng_ranks") or []
        set_rng_state(ranks_rng[info.rank] if len(ranks_rng) == info.world_size else ckpt["rng"])
        step, best, metrics = ckpt["step"], ckpt.get("best"), dict(ckpt.get("metrics") or {})
        if ckpt.get("batch"):  # cut off inside an epoch
            start_epoch, skip = ckpt["epoch"], int(ckpt["batch"])
            sums = ckpt["sums"]
            carried = sums[info.rank].clone() if sums.shape[0] == info.world_size else \
                (sums.sum(0) if info.is_main else torch.zeros(2, dtype=torch.float64))
        else:
            start_epoch = ckpt["epoch"] + 1
        if step and hasattr(task, "after_step"):
            task.after_step(step, total)  # schedules that follow the step count (idempotent)
        say(f"[{stage}] resumed from {last_path} at epoch {start_epoch + 1}"
            + (f", batch {skip + 1}/{n_batches}" if skip else ""))
    elif run.writer:
        done_file.unlink(missing_ok=True)
    run.keep_metrics(lambda r: r.get("stage") != stage or int(r.get("epoch", -1)) < start_epoch)

    def state(epoch: int, batch: int, sums: Optional[torch.Tensor]) -> dict[str, Any]:
        rngs = gather_objects(rng_state())  # collective: every rank calls it at the same point
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
                "epoch": epoch, "batch": batch, "step": step, "best": best, "metrics": metrics,
                "sums": sums, "world_size": info.world_size}

    every = getattr(settings, "checkpoint_every_steps", 0) or 0
    for epoch in range(start_epoch, settings.epochs):
        t0 = time.time()
        ddp_model.train()
        set_loader_epoch(train_loader, epoch)
        first = skip if epoch == start_epoch else 0
        plan = _plan(train_loader, n_batches)
        weights = _loss_weights(plan, accum, info.world_size, n_batches)
        sums = carried if (first and carried is not None) else torch.zeros(2, dtype=torch.float64)
        batches = _batches_from(train_loader, first)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches, start=first):
            batch = to_device(batch, runtime.device)
            last_micro = (i + 1) % accum == 0 or i + 1 == n_batches
            sync = nullcontext() if (last_micro or not info.enabled) else ddp_model.no_sync()
            with sync:
                with runtime.autocast():
                    out = task.training_step(ddp_model, batch)
                loss = out["loss"]
                value = loss.detach().float()
                local_ok = bool(torch.isfinite(value).all())
                if any_rank(not local_ok):
                    what = f"{value.item()}" if not local_ok else "NaN/Inf on another rank"
                    raise TrainingDiverged(
                        f"[{stage}] loss became {what} at epoch {epoch + 1}, batch {i + 1} (step {step}); "
                        f"stopped. The last good checkpoint is kept at {last_path}. "
                        f"Try a lower lr or set clip_grad.")
                if weights is not None:
                    n_real, w = plan[i][0], weights[i]
                else:
                    n_real, w = _batch_size(batch), 1.0 / min(accum, n_batches - (i // accum) * accum)
                (loss * w).backward()
            sums += torch.tensor([value.item() * n_real, n_real], dtype=torch.float64)
            if last_micro:
                if settings.clip_grad:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
                    if not torch.isfinite(norm):
                        raise TrainingDiverged(
                            f"[{stage}] gradient norm became {norm.item()} at epoch {epoch + 1}, step {step}; "
                            f"stopped. The last good checkpoint is kept at {last_path}.")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if hasattr(task, "after_step"):
                    task.after_step(step, total)
                if every and step % every == 0 and i + 1 < n_batches:
                    per_rank = all_gather_cat(sums[None])
                    ckpt = state(epoch, i + 1, per_rank)
                    if run.writer:
                        save_checkpoint(ckpt, last_path)
        totals = all_reduce_sum(sums)
        metrics = {"stage": stage, "epoch": epoch, "step": step,
                   "train_loss": float(totals[0] / max(float(totals[1]), 1.0)),
                   "lr": scheduler.get_last_lr()[0], "epoch_time_s": round(time.time() - t0, 3)}
        if val_loader is not None and hasattr(task, "evaluate"):
            metrics.update({f"val_{k}": v for k, v in task.evaluate(model, val_loader, runtime).items()})
        improved = False
        if monitor is not None and monitor in metrics and metrics[monitor] == metrics[monitor]:
            value = metrics[monitor]
            if best is None or (value > best if monitor_mode == "max" else value < best):
                best, improved = value, True
        metrics["best"] = best
        # order matters for a kill at any point: the metrics line first (a resumed run drops it and
        # logs it again), then best.pt, then last.pt (which moves the resume point past this epoch)
        run.log_metrics(metrics)
        say(f"[{stage}] epoch {epoch + 1}/{settings.epochs} "
            + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                       if isinstance(v, float) and k not in ("lr", "best")))
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        ckpt = state(epoch, 0, None)
        if run.writer:
            if improved or monitor is None:
                save_checkpoint({"model": ckpt["model"], "epoch": epoch, "best": best}, run.checkpoints / "best.pt")
            save_checkpoint(ckpt, last_path)
    result = {**metrics, "best": best}
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
