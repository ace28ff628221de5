"""One training loop for every task: pretraining, classification, segmentation, anomaly models.

A *task* owns the model and knows how to turn a batch into a loss and how to evaluate:

    task.model                          nn.Module (the loop moves it, wraps it in DDP)
    task.training_step(model, batch)    -> {"loss": tensor, ...scalars to log}
    task.evaluate(model, loader)        -> {"metric": float, ...}     (optional)
    task.param_groups(weight_decay)     -> optimizer groups with optional "lr_scale" (optional)

The loop adds: AdamW with warm-up + cosine, bf16 autocast on CUDA, gradient accumulation and
clipping, a NaN/Inf guard, metrics as JSON lines, atomic `last`/`best` checkpoints with RNG state,
exact resume, DDP (gradients averaged by DDP, metrics reduced across ranks, rank 0 writes).
"""

from __future__ import annotations

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
from medmim.train.distributed import all_reduce_sum, current
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
        precision = run.precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        return cls(device, torch.bfloat16 if precision == "bf16" else None)

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


def fit(task, train_loader, settings: OptimSettings, run: RunDir, runtime: Runtime, *,
        val_loader=None, monitor: str | None = None, monitor_mode: str = "max", resume: bool = False,
        stage: str = "train", on_epoch_end: Callable[[int, nn.Module], None] | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``task`` for ``settings.epochs`` epochs; return the final (and best) metrics.

    With ``resume``: a stage that finished returns its recorded result at once; one that was cut
    off continues from its last checkpoint with the same optimizer, schedule, RNG and data order.
    """
    done_file = run.path / "done.json"
    if resume and done_file.exists():
        import json
        return json.loads(done_file.read_text())

    info = current()
    model = task.model.to(runtime.device)
    groups = task.param_groups(settings.weight_decay) if hasattr(task, "param_groups") else \
        default_param_groups(model, settings.weight_decay)
    for g in groups:
        g["lr"] = settings.lr * g.get("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))
    steps_per_epoch = max(1, math.ceil(len(train_loader) / settings.grad_accum))
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, int(settings.warmup_epochs * steps_per_epoch)))
    ddp_model: nn.Module = model
    if info.enabled:
        ddp_model = DDP(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                        find_unused_parameters=getattr(task, "find_unused_parameters", False))

    start_epoch, step, best = 0, 0, None
    last_path = run.checkpoints / "last.pt"
    if resume and last_path.exists():
        ckpt = safe_torch_load(last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt.get("best")
        log(f"[{stage}] resumed from {last_path} at epoch {start_epoch}")

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, settings.epochs):
        t0 = time.time()
        ddp_model.train()
        set_loader_epoch(train_loader, epoch)
        sums = torch.zeros(2, dtype=torch.float64)  # loss sum, count
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(train_loader):
            batch = to_device(batch, runtime.device)
            last_micro = (i + 1) % settings.grad_accum == 0 or i + 1 == len(train_loader)
            sync = nullcontext() if (last_micro or not info.enabled) else ddp_model.no_sync()
            with sync:
                with runtime.autocast():
                    out = task.training_step(ddp_model, batch)
                loss = out["loss"]
                if not torch.isfinite(loss.detach()).all():
                    raise TrainingDiverged(
                        f"[{stage}] loss became {loss.item()} at epoch {epoch}, step {step}; stopped. "
                        f"The last good checkpoint is kept at {last_path}. Try a lower lr or clip_grad.")
                (loss / settings.grad_accum).backward()
            n = _batch_size(batch)
            sums += torch.tensor([loss.detach().float().item() * n, n], dtype=torch.float64)
            if last_micro:
                if settings.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if hasattr(task, "after_step"):
                    task.after_step(step, total)
        sums = all_reduce_sum(sums)
        metrics = {"stage": stage, "epoch": epoch, "step": step, "train_loss": float(sums[0] / max(sums[1], 1)),
                   "lr": scheduler.get_last_lr()[0], "epoch_time_s": round(time.time() - t0, 3)}
        if val_loader is not None and hasattr(task, "evaluate"):
            metrics.update({f"val_{k}": v for k, v in task.evaluate(model, val_loader, runtime).items()})
        improved = False
        if monitor is not None and monitor in metrics and metrics[monitor] == metrics[monitor]:
            value = metrics[monitor]
            if best is None or (value > best if monitor_mode == "max" else value < best):
                best, improved = value, True
        metrics["best"] = best
        run.log_metrics(metrics)
        log(f"[{stage}] epoch {epoch + 1}/{settings.epochs} "
            + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                       if isinstance(v, float) and k not in ("lr", "best")))
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        if run.writer:
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state(), "epoch": epoch, "step": step,
                    "best": best}
            save_checkpoint(ckpt, last_path)
            if improved or monitor is None:
                save_checkpoint({"model": model.state_dict(), "epoch": epoch, "best": best},
                                run.checkpoints / "best.pt")
    result = {**metrics, "best": best}
    if run.writer:
        write_json(done_file, result)
    return result


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).shape[0])
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    return int(batch.shape[0])
