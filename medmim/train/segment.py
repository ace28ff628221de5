"""Segmentation fine-tuning: a task for the one training loop and the stage that runs it.

Data: records with a ``mask`` (integer label map on the image grid; the phantoms write organ and
lesion masks). Training sees whole images resized to ``data.image_size``, or random crops of
``finetune.seg_patch_size`` when set; validation and test run sliding-window inference
(``monai.inferers.sliding_window_inference``) whenever an image is larger than the training patch.
Loss: Dice + cross-entropy (``monai.losses.DiceCELoss``). Metrics: Dice and HD95 per foreground
class (``monai.metrics``), the mean over classes, and a bootstrap 95% CI of the mean Dice on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from monai import transforms as mt
from torch import nn

from medmim.config import Config
from medmim.data.dataset import DataBundle, augment_transforms
from medmim.errors import MedmimError
from medmim.eval.metrics import segmentation_case_metrics, summarize_segmentation
from medmim.models.segmentation import Segmenter
from medmim.train.distributed import all_gather_cat
from medmim.train.loop import Runtime, to_device
from medmim.train.rundir import RunDir
from medmim.train.stages import SupervisedHead, supervised_stage
from medmim.train.tasks import SupervisedTask


def sliding_window_logits(model: nn.Module, x: torch.Tensor, roi: tuple[int, ...] | None, overlap: float = 0.25,
                          sw_batch_size: int = 4) -> torch.Tensor:
    """Logits for ``x``; through overlapping windows of ``roi`` (Gaussian-weighted) when ``x`` is
    larger than ``roi`` on any axis, in one pass otherwise. Smaller images are padded by MONAI."""
    if roi is None or tuple(x.shape[2:]) == tuple(roi):
        return model(x)
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(x, roi, sw_batch_size, model, overlap=overlap, mode="gaussian")


class SegmentationTask(SupervisedTask):
    """Semantic segmentation with Dice + CE; batches hold ``image`` and ``mask`` ``(B, 1, *spatial)``."""

    def __init__(self, model: nn.Module, num_classes: int, roi: tuple[int, ...] | None = None,
                 overlap: float = 0.25, param_groups_fn=None, freeze_epochs: int = 0, epochs: int | None = None,
                 hd95: bool = True):
        from monai.losses import DiceCELoss

        super().__init__(model, param_groups_fn, freeze_epochs, epochs)
        self.num_classes = num_classes
        self.roi = roi
        self.overlap = overlap
        self.hd95 = hd95
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def training_step(self, model, batch):
        logits = model(batch["image"]).float()
        return {"loss": self.loss_fn(logits, batch["mask"].long())}

    @torch.no_grad()
    def predict(self, model, loader, runtime):
        """Per-case Dice/HD95 arrays ``(cases, K-1)`` and the mean loss, gathered across ranks."""
        model.eval()
        dice, hd, losses = [], [], []
        for batch in loader:
            batch = to_device(batch, runtime.device)
            with runtime.autocast():
                logits = sliding_window_logits(model, batch["image"], self.roi, self.overlap).float()
            target = batch["mask"].long()
            losses.append(self.loss_fn(logits, target).reshape(1).repeat(len(target)))
            pred = logits.argmax(1)
            m = segmentation_case_metrics(pred.cpu(), target[:, 0].cpu(), self.num_classes, hd95=self.hd95)
            dice.append(torch.tensor(m["dice"], dtype=torch.float64))
            if self.hd95:
                hd.append(torch.tensor(m["hd95"], dtype=torch.float64))
        dice_all = all_gather_cat(torch.cat(dice).to(runtime.device)).cpu().numpy()
        hd_all = all_gather_cat(torch.cat(hd).to(runtime.device)).cpu().numpy() if self.hd95 else None
        loss = float(all_gather_cat(torch.cat(losses).float()).mean().item())
        return dice_all, hd_all, loss

    def evaluate(self, model, loader, runtime, bootstrap: int = 0, seed: int = 0):
        dice, hd, loss = self.predict(model, loader, runtime)
        out = summarize_segmentation(dice, hd, n_boot=bootstrap, seed=seed)
        out["loss"] = loss
        if bootstrap:
            out["n"] = int(len(dice))
        return out


class RandForegroundCropd(mt.Randomizable, mt.MapTransform):
    """A random ``size`` crop of image and mask, centred on foreground half of the time (so small
    lesions are seen); one dict in, one dict out (MONAI's RandCropByPosNegLabeld returns a list)."""

    def __init__(self, size: tuple[int, ...]):
        mt.MapTransform.__init__(self, ["image", "mask"])
        self.crop = mt.RandCropByPosNegLabeld(["image", "mask"], label_key="mask", spatial_size=size, pos=1, neg=1,
                                              num_samples=1, allow_smaller=True)

    def set_random_state(self, seed=None, state=None):
        self.crop.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:  # the inner crop draws its own numbers
        pass

    def __call__(self, data):
        out = self.crop(data)
        return out[0] if isinstance(out, list) else out


def _roi(cfg: Config) -> tuple[int, ...] | None:
    """The training crop (and sliding-window size): ``finetune.seg_patch_size`` when smaller than the image."""
    patch = cfg.finetune.seg_patch_size
    return (patch,) * cfg.data.spatial_dims if patch and patch < cfg.data.image_size else None


class SegmentHead(SupervisedHead):
    """Segmentation for :func:`medmim.train.stages.supervised_stage`: UNet / UNETR decoder, Dice + CE,
    best checkpoint by validation Dice, test Dice and HD95 with a bootstrap CI of the mean Dice."""

    stage = "segment"
    monitor = "val_dice"
    eval_batch = 8  # sliding-window inference holds many windows per image
    with_mask = True

    def check(self, cfg, train, val, test):
        k = cfg.finetune.num_seg_classes
        if not train:
            raise MedmimError("segmentation needs masks: no training record has a 'mask' column")
        if not val:
            raise MedmimError("segmentation fine-tuning needs a validation split with masks")
        for items in (train, val, test):
            for it in items:
                it["mask"] = it["mask"].round().clamp(0, k - 1)
                it.pop("label", None)
        top = max(int(it["mask"].max()) for it in train)
        if top >= k:
            raise MedmimError(f"masks hold label {top} but finetune.num_seg_classes is {k}")

    def augment(self, cfg):
        augment = augment_transforms(cfg.data, with_mask=True)
        roi = _roi(cfg)
        return mt.Compose([*augment.transforms, RandForegroundCropd(roi)]) if roi else augment

    def trains_encoder(self, cfg):
        return True  # a segmenter has no linear-probe mode

    def build(self, cfg, encoder, train_items, groups_fn, freeze_epochs):
        fc = cfg.finetune
        model = Segmenter(encoder, fc.num_seg_classes, decoder=fc.seg_decoder, feature_size=fc.seg_feature_size)
        task = SegmentationTask(model, fc.num_seg_classes, roi=_roi(cfg), overlap=fc.sw_overlap,
                                param_groups_fn=groups_fn, freeze_epochs=freeze_epochs, epochs=fc.epochs,
                                hd95=False)  # HD95 on test only: it costs more than the rest of validation
        return model, task

    def test(self, cfg, task, model, loader, runtime, seed):
        task.hd95 = True
        return task.evaluate(model, loader, runtime, bootstrap=cfg.finetune.bootstrap, seed=seed)

    def describe(self, cfg, model):
        roi = _roi(cfg)
        return {"head": "segment", "decoder": model.kind}, \
            {"num_seg_classes": cfg.finetune.num_seg_classes, "roi": list(roi) if roi else None}


def segment_stage(cfg: Config, data: DataBundle, run: RunDir, runtime: Runtime, *,
                  init: str | Path | None, resume: bool = True, seed: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune a segmenter (see :func:`medmim.train.stages.supervised_stage`); ``result.json`` holds
    test Dice, HD95, per-class values and the Dice 95% CI."""
    return supervised_stage(SegmentHead(), cfg, data, run, runtime, init=init, resume=resume, seed=seed, log=log)
