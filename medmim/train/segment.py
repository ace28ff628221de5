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
from medmim.data.dataset import DataBundle, augment_transforms, make_loader
from medmim.errors import MedmimError
from medmim.eval.metrics import segmentation_case_metrics, summarize_segmentation
from medmim.models.segmentation import Segmenter
from medmim.train.checkpoint import safe_torch_load
from medmim.train.distributed import all_gather_cat, current
from medmim.train.loop import Runtime, fit, to_device
from medmim.train.tasks import SupervisedTask
from medmim.train.rundir import RunDir


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


def segment_stage(cfg: Config, data: DataBundle, run: RunDir, runtime: Runtime, *,
                  init: str | Path | None, resume: bool = True, seed: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune a segmenter on a label fraction of the train split; evaluate the best-val model on test.

    ``init``: None = from scratch, a medmim export (MAE/SparK ``encoder.safetensors``) or MONAI-format
    ViT weights. Writes ``result.json`` (test Dice, HD95, per-class values, Dice 95% CI).
    """
    from medmim.models.heads import layer_decay_groups
    from medmim.models.monai_compat import load_init_weights
    from medmim.train.stages import build_encoder_for, labelled_items, start_stage

    fc = cfg.finetune
    seed, finished = start_stage(cfg, run, seed, resume)
    if finished is not None:
        return finished
    run.save_config(cfg)  # `medmim predict` rebuilds the model from it
    train_items, val_items, test_items = labelled_items(cfg, data, seed, with_mask=True)
    if not train_items:
        raise MedmimError("segmentation needs masks: no training record has a 'mask' column")
    if not val_items:
        raise MedmimError("segmentation fine-tuning needs a validation split with masks")
    for items in (train_items, val_items, test_items):
        for it in items:
            it["mask"] = it["mask"].round().clamp(0, fc.num_seg_classes - 1)
            it.pop("label", None)
    top = max(int(it["mask"].max()) for it in train_items)
    if top >= fc.num_seg_classes:
        raise MedmimError(f"masks hold label {top} but finetune.num_seg_classes is {fc.num_seg_classes}")
    d = cfg.data.spatial_dims
    patch = fc.seg_patch_size if fc.seg_patch_size and fc.seg_patch_size < cfg.data.image_size else None
    roi = (patch,) * d if patch else None
    augment = augment_transforms(cfg.data, with_mask=True)
    if patch:
        augment = mt.Compose([*augment.transforms, RandForegroundCropd((patch,) * d)])
    info = current()
    bs = min(fc.batch_size, len(train_items))
    train_loader = make_loader(train_items, bs, shuffle=True, seed=seed, augment=augment,
                               drop_last=len(train_items) > bs, rank=info.rank, world_size=info.world_size)
    eval_loader = lambda items: make_loader(items, 8, shuffle=False, seed=seed, rank=info.rank,  # noqa: E731
                                            world_size=info.world_size)
    encoder = build_encoder_for(cfg)
    report = None
    if init is not None:
        report = load_init_weights(encoder, init, verbose=True)
        log(f"[segment] init from {Path(init).name}: {report.summary().splitlines()[0]}")
        if not report.matched:
            raise MedmimError(f"{init}: no weights matched the encoder ({cfg.encoder.name})")
    model = Segmenter(encoder, fc.num_seg_classes, decoder=fc.seg_decoder, feature_size=fc.seg_feature_size)
    groups_fn = (lambda m, wd: layer_decay_groups(m, wd, fc.layer_decay)) if fc.layer_decay < 1 else None  # noqa: E731
    task = SegmentationTask(model, fc.num_seg_classes, roi=roi, overlap=fc.sw_overlap, param_groups_fn=groups_fn,
                            freeze_epochs=fc.freeze_epochs, epochs=fc.epochs, hd95=False)
    fit(task, train_loader, fc, run, runtime, val_loader=eval_loader(val_items), monitor="val_dice",
        monitor_mode="max", resume=resume, stage="segment", log=log)
    best = safe_torch_load(run.checkpoints / "best.pt")
    model.load_state_dict(best["model"])
    task.hd95 = True
    test = task.evaluate(model, eval_loader(test_items), runtime, bootstrap=fc.bootstrap, seed=seed) \
        if test_items else {}
    result = {"head": "segment", "decoder": model.kind, "n_labelled": len(train_items),
              "label_fraction": fc.label_fraction, "seed": seed, "num_seg_classes": fc.num_seg_classes,
              "roi": list(roi) if roi else None, "best_epoch": int(best["epoch"]), "val_dice": best.get("best"),
              **{f"test_{k}": v for k, v in test.items()},
              "weights_report": None if report is None else
              {"matched": len(report.matched), "missing": len(report.missing),
               "unexpected": len(report.unexpected), "mismatched": len(report.mismatched)}}
    run.write_json("result.json", result)
    return result
