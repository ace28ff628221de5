"""Tasks for the one training loop (see medmim/train/loop.py for the protocol)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medmim.models.protocols import accepts_generator
from medmim.eval.metrics import CLASSIFICATION_METRICS, bootstrap_cis, classification_metrics
from medmim.train.distributed import all_gather_cat, all_reduce_sum
from medmim.train.loop import Task, to_device


class PretrainTask(Task):
    """Self-supervised pretraining: the pretext returns its own loss (Pretext contract)."""

    def __init__(self, pretext: nn.Module):
        self.model = pretext
        # DDP must tolerate parameters without gradients only where a pretext has optional parts
        # (e.g. the loss-guided mask predictor); elsewhere the check costs time and warns
        self.find_unused_parameters = getattr(pretext, "predictor", None) is not None

    def training_step(self, model, batch):
        out = model(batch["image"])
        return {"loss": out["loss"]}

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
                out = model(x, generator=gen) if accepts_generator(model) else model(x)
            sums += torch.tensor([out["loss"].float().item() * len(x), len(x)], dtype=torch.float64)
        sums = all_reduce_sum(sums)
        return {"loss": float(sums[0] / max(1.0, float(sums[1])))}


def focal_loss(logits, target, gamma: float = 2.0, weight=None):
    """Softmax focal loss, the mean over samples of ``weight[y] * (1 - p_y)^gamma * -log p_y``:
    MONAI's ``FocalLoss`` (per-class terms, summed over classes, where only the target's is non-zero)."""
    from monai.losses import FocalLoss

    fl = FocalLoss(gamma=gamma, weight=weight, use_softmax=True, to_onehot_y=True, reduction="none")
    return fl(logits, target[:, None]).sum(1).mean()


def binary_focal_loss(logits, target, gamma: float = 2.0):
    """Focal loss for sigmoid outputs (multi-label), mean over elements: MONAI's sigmoid ``FocalLoss``."""
    from monai.losses import FocalLoss

    return FocalLoss(gamma=gamma, use_softmax=False, reduction="mean")(logits, target)


class SupervisedTask(Task):
    """Shared by the supervised tasks: optimizer groups (e.g. layer-wise lr decay) and the
    freeze-then-unfreeze schedule. With ``freeze_epochs`` (and the total ``epochs``) the model's
    encoder is frozen (``FreezableEncoder.freeze_encoder``) for the first ``freeze_epochs`` epochs
    of optimizer steps, then trains with the head."""

    def __init__(self, model: nn.Module, param_groups_fn=None, freeze_epochs: int = 0,
                 epochs: int | None = None):
        self.model = model
        self._groups_fn = param_groups_fn
        self.freeze_epochs = int(freeze_epochs or 0)
        self.epochs = epochs
        if self.freeze_epochs > 0 and hasattr(model, "freeze_encoder"):
            if not epochs:
                raise ValueError("freeze_epochs needs the total number of epochs")
            model.freeze_encoder(True)
            self.find_unused_parameters = True  # DDP: the encoder gets no gradients in the head-only phase

    def after_step(self, step: int, total: int) -> None:
        """Unfreeze the encoder once ``freeze_epochs`` epochs of optimizer steps are done."""
        if self.freeze_epochs > 0 and getattr(self.model, "frozen", False) and getattr(self.model, "mode", "") != "linear":
            if step >= self.freeze_epochs * total / self.epochs:
                self.model.freeze_encoder(False)

    def param_groups(self, weight_decay: float):
        if self._groups_fn is not None:
            return self._groups_fn(self.model, weight_decay)
        return super().param_groups(weight_decay)


class ClassificationTask(SupervisedTask):
    """Binary / multi-class (softmax) or multi-label (sigmoid) classification.

    ``loss``: ``ce``, ``weighted_ce`` (inverse class frequency from ``class_counts``) or ``focal``
    (gamma 2, class-weighted when counts are given); multi-label uses BCE (``focal``: sigmoid focal).
    ``freeze_epochs`` with ``epochs``: freeze-then-unfreeze (see :class:`SupervisedTask`).
    """

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "ce", multilabel: bool = False,
                 class_counts: list[int] | None = None, param_groups_fn=None, freeze_epochs: int = 0,
                 epochs: int | None = None):
        super().__init__(model, param_groups_fn, freeze_epochs, epochs)
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.loss = loss
        self.weight = None
        if loss in ("weighted_ce", "focal") and class_counts and not multilabel:
            counts = torch.tensor(class_counts, dtype=torch.float32).clamp(min=1)
            self.weight = counts.sum() / (len(counts) * counts)

    def compute_loss(self, logits, target):
        if self.multilabel:
            if self.loss == "focal":
                return binary_focal_loss(logits.float(), target.float())
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
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

    def evaluate(self, model, loader, runtime, bootstrap: int = 0, per_class: bool = False, seed: int = 0):
        """Metrics on a loader. ``bootstrap`` > 0 adds 95% CIs (``{metric}_ci_low/high``) from that
        many case resamples, and ``per_class`` keeps ``auroc_class{c}`` (with CIs)."""
        p, y = self.predict(model, loader, runtime)
        self.last_predictions = (p, y)  # the stage saves the test split's (save_test_predictions)
        m = classification_metrics(y, p, multilabel=self.multilabel)
        m["loss"] = float(F.cross_entropy(torch.log(torch.as_tensor(p).clamp_min(1e-8)), torch.as_tensor(y)).item()) \
            if not self.multilabel else float("nan")
        if not per_class:
            m = {k: v for k, v in m.items() if not k.startswith("auroc_class")}
        if bootstrap:
            names = list(CLASSIFICATION_METRICS) + ([k for k in m if k.startswith("auroc_class")] if per_class else [])
            for name, ci in bootstrap_cis(y, p, names, n=bootstrap, seed=seed, multilabel=self.multilabel).items():
                m[f"{name}_ci_low"], m[f"{name}_ci_high"] = ci["low"], ci["high"]
            m["n"] = int(len(y))
        return m


def class_counts(items: list[dict], num_classes: int) -> list[int]:
    """Images per class (multi-label: positives per label)."""
    labels = [it["label"] for it in items if "label" in it]
    if labels and torch.as_tensor(labels[0]).ndim > 0:
        return torch.stack([torch.as_tensor(v) for v in labels]).sum(0).long().tolist()
    return np.bincount(np.array([int(v) for v in labels], dtype=np.int64), minlength=num_classes).tolist()
