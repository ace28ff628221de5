"""Tasks for the one training loop (see medmim/train/loop.py for the protocol)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medmim.eval.metrics import classification_metrics
from medmim.train.distributed import all_gather_cat, all_reduce_sum
from medmim.train.loop import default_param_groups, to_device


class PretrainTask:
    """Self-supervised pretraining: the pretext returns its own loss (Pretext contract)."""

    def __init__(self, pretext: nn.Module):
        self.model = pretext
        self.find_unused_parameters = True  # e.g. a loss-guided mask head not used every step

    def training_step(self, model, batch):
        out = model(batch["image"])
        return {"loss": out["loss"]}

    def param_groups(self, weight_decay: float):
        return default_param_groups(self.model, weight_decay)

    def after_step(self, step: int, total: int) -> None:
        if hasattr(self.model, "set_progress"):
            self.model.set_progress(step / max(1, total))

    @torch.no_grad()
    def evaluate(self, model, loader, runtime):
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        gen = torch.Generator().manual_seed(0)  # same validation masks every epoch
        for batch in loader:
            x = to_device(batch, runtime.device)["image"]
            with runtime.autocast():
                out = model(x, generator=gen) if _accepts_generator(model) else model(x)
            sums += torch.tensor([out["loss"].float().item() * len(x), len(x)], dtype=torch.float64)
        sums = all_reduce_sum(sums)
        return {"loss": float(sums[0] / max(1.0, float(sums[1])))}


def _accepts_generator(model) -> bool:
    import inspect

    try:
        return "generator" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def focal_loss(logits, target, gamma: float = 2.0, weight=None):
    logp = F.log_softmax(logits, dim=1)
    ce = F.nll_loss(logp, target, weight=weight, reduction="none")
    pt = logp.gather(1, target[:, None]).squeeze(1).exp()
    return ((1 - pt) ** gamma * ce).mean()


class ClassificationTask:
    """Binary / multi-class (softmax) or multi-label (sigmoid) classification."""

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "ce", multilabel: bool = False,
                 class_counts: list[int] | None = None, param_groups_fn=None):
        self.model = model
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.loss = loss
        self._groups_fn = param_groups_fn
        self.weight = None
        if loss in ("weighted_ce", "focal") and class_counts:
            counts = torch.tensor(class_counts, dtype=torch.float32).clamp(min=1)
            self.weight = counts.sum() / (len(counts) * counts)

    def param_groups(self, weight_decay: float):
        if self._groups_fn is not None:
            return self._groups_fn(self.model, weight_decay)
        return default_param_groups(self.model, weight_decay)

    def compute_loss(self, logits, target):
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target.float())
        weight = self.weight.to(logits.device) if self.weight is not None else None
        if self.loss == "focal":
            return focal_loss(logits.float(), target, weight=weight)
        return F.cross_entropy(logits.float(), target, weight=weight)

    def training_step(self, model, batch):
        return {"loss": self.compute_loss(model(batch["image"]), batch["label"])}

    @torch.no_grad()
    def predict(self, model, loader, runtime):
        """Probabilities and labels for the whole loader (gathered across DDP ranks)."""
        model.eval()
        probs, labels = [], []
        for batch in loader:
            batch = to_device(batch, runtime.device)
            with runtime.autocast():
                logits = model(batch["image"]).float()
            probs.append(torch.sigmoid(logits) if self.multilabel else logits.softmax(1))
            labels.append(batch["label"])
        p = all_gather_cat(torch.cat(probs)).cpu().numpy()
        y = all_gather_cat(torch.cat(labels)).cpu().numpy()
        return p, y

    def evaluate(self, model, loader, runtime):
        p, y = self.predict(model, loader, runtime)
        m = classification_metrics(y, p, multilabel=self.multilabel)
        m["loss"] = float(F.cross_entropy(torch.log(torch.as_tensor(p).clamp_min(1e-8)), torch.as_tensor(y)).item()) \
            if not self.multilabel else float("nan")
        return {k: v for k, v in m.items() if not k.startswith("auroc_class")}


def class_counts(items: list[dict], num_classes: int) -> list[int]:
    labels = np.array([int(it["label"]) for it in items if "label" in it])
    return np.bincount(labels, minlength=num_classes).tolist()
