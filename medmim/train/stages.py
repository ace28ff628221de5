"""The two stages every pipeline is made of: pretrain an encoder, fine-tune it on labels.

Each stage runs in its own run directory (metrics.jsonl, checkpoints/last.pt + best.pt, done.json)
through the one training loop, so a killed pipeline resumes stage by stage, epoch by epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from medmim.config import Config
from medmim.data.dataset import (DataBundle, augment_transforms, make_loader, materialize, pretrain_transforms,
                                 without_labels)
from medmim.data.labels import check_supervised, fill_inferred
from medmim.data.splits import label_fraction
from medmim.errors import MedmimError
from medmim.eval.model_card import write_model_card
from medmim.eval.predictions import save_test_predictions
from medmim.models import build_pretext, encoder_from_config
from medmim.models.export import WEIGHTS_NAME, channel_metadata, export_encoder
from medmim.eval.recon_grid import save_recon_grid
from medmim.models.heads import Classifier, layer_decay_groups
from medmim.models.pretrained import load_pretrained
from medmim.models.protocols import accepts_generator
from medmim.io import safe_torch_load
from medmim.train.distributed import current
from medmim.train.loop import Runtime, fit
from medmim.train.rundir import RunDir, seed_everything
from medmim.train.tasks import ClassificationTask, PretrainTask, class_counts


def build_encoder_for(cfg: Config) -> torch.nn.Module:
    """The run's encoder: ``cfg.encoder`` on ``data.spatial_dims``, ``data.image_size`` and
    ``data.in_channels`` (one per declared channel). Every stage, verb and pipeline builds it here."""
    return encoder_from_config(cfg.encoder, cfg.data.spatial_dims, cfg.data.image_size, cfg.data.in_channels)


def pretrain_stage(cfg: Config, data: DataBundle, run: RunDir, runtime: Runtime, *, resume: bool = True,
                   log: Callable[[str], None] = print) -> Path:
    """Pretrain ``cfg.pretrain.method`` on the unlabelled images; export the encoder; return its path."""
    weights = run.path / WEIGHTS_NAME
    if resume and weights.exists() and (run.path / "done.json").exists():
        log(f"[pretrain] {cfg.pretrain.method}: already done, reusing {weights}")
        return weights
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    pc = cfg.pretrain
    records = data.pretrain_records(include_test=cfg.data.pretrain_on_test)
    # self-supervised: labels never enter pretraining batches
    items = without_labels(materialize(records, cfg.data, data.preset, skipped=data.skipped))  # stays lazy
    info = current()
    loader = make_loader(items, pc.batch_size, shuffle=True, seed=cfg.run.seed,
                         augment=augment_transforms(cfg.data, False, stage="pretrain") if pc.method == "simclr"
                         else pretrain_transforms(cfg.data),
                         drop_last=True, rank=info.rank, world_size=info.world_size,
                         num_workers=cfg.data.num_workers)
    encoder = build_encoder_for(cfg)
    pretext = build_pretext(pc, encoder)
    task = PretrainTask(pretext)
    preview = torch.stack([items[i]["image"] for i in range(min(8, len(items)))])

    def save_grid(epoch: int, model) -> None:
        last = epoch + 1 == pc.epochs
        if not run.writer or not (last or (pc.recon_every and (epoch + 1) % pc.recon_every == 0)):
            return
        png = run.path / "recon" / f"epoch{epoch + 1:03d}.png"
        save_recon_preview(model, preview, png, runtime,
                           channel_names=cfg.data.channel_names if cfg.data.channels else None)
        if run.tracker is not None and png.exists():
            run.tracker.log_image("pretrain/reconstructions", png)  # TensorBoard, at this epoch's step

    fit(task, loader, pc, run, runtime, stage=f"pretrain:{pc.method}", resume=resume, on_epoch_end=save_grid,
        monitor=None, log=log)
    if run.writer:
        export_encoder(encoder, run.path, {
            "architecture": cfg.encoder.name, "encoder_config": cfg.encoder.model_dump(),
            "pretext": pc.method, "image_size": cfg.data.image_size, "data_fingerprint": data.fingerprint,
            "channels": channel_metadata(cfg.data, data.preset),
            "data_source": data.source, "epochs": pc.epochs, "seed": cfg.run.seed})
        write_model_card(run.path, cfg, data, runtime=runtime, n_images=len(items))  # model_card.md beside it
    return weights


@torch.no_grad()
def save_recon_preview(model, images: torch.Tensor, path: Path, runtime: Runtime,
                       channel_names: list[str] | None = None) -> None:
    """PNG grid of input / masked input / reconstruction for masked-modelling pretexts."""
    if not hasattr(model, "encoder") or getattr(model, "pretext_kind", "masked") != "masked":
        return
    was_training = model.training
    model.eval()
    out = model(images.to(runtime.device), generator=torch.Generator().manual_seed(0)) \
        if accepts_generator(model) else model(images.to(runtime.device))
    model.train(was_training)
    if "recon" not in out or "mask" not in out:
        return
    save_recon_grid(path, images.cpu(), out["recon"].float().cpu(), out["mask"].cpu(),
                    patch_size=model.encoder.downsample_ratio, spatial_dims=images.ndim - 2,
                    channel_names=channel_names)


def labelled_items(cfg: Config, data: DataBundle, seed: int, with_mask: bool = False):
    """Prepared (train, val, test) items for a supervised stage: the train split reduced to
    ``finetune.label_fraction`` (nested, stratified, by seed) -- and the val split too when
    ``finetune.val_labels`` is "fraction"; unreadable files skipped and recorded."""
    fc = cfg.finetune
    train_records = label_fraction(data.split("train"), fc.label_fraction, seed=seed)
    val_records = data.split("val")
    if fc.val_labels == "fraction" and val_records:
        val_records = label_fraction(val_records, fc.label_fraction, seed=seed)
    check_supervised(train_records, val_records, data.split("test"), cfg)  # one-line errors before training
    return tuple(materialize(records, cfg.data, data.preset, with_mask=with_mask, skipped=data.skipped)
                 for records in (train_records, val_records, data.split("test")))


def start_stage(cfg: Config, run: RunDir, seed: int | None, resume: bool) -> tuple[int, dict | None]:
    """Prologue of a fine-tuning stage: the seed it uses (``run.seed`` unless given) and, when
    resuming a stage that already wrote ``result.json``, that result (else None: RNGs seeded)."""
    seed = cfg.run.seed if seed is None else seed
    done = run.path / "result.json"
    if resume and done.exists():
        return seed, json.loads(done.read_text())
    seed_everything(seed, cfg.run.num_threads)
    return seed, None


class SupervisedHead:
    """What one kind of supervised fine-tuning adds to :func:`supervised_stage`: its items, its
    model and task, the validation metric it keeps the best checkpoint by, its test evaluation and
    its result fields. The stage itself (label fraction, loaders, weights, layer decay, the loop,
    best-checkpoint reload, result.json) is shared."""

    stage = "finetune"  # metrics/log name of the stage
    monitor = "val_auroc"  # validation metric that picks best.pt (higher is better)
    eval_batch = 256  # validation/test batch: the whole split is encoded in few no-grad passes
    with_mask = False  # items carry a segmentation mask

    def check(self, cfg: Config, train: list[dict], val: list[dict], test: list[dict]) -> None:
        """Raise MedmimError when the items cannot train this head (may normalise them in place)."""
        if not val:
            raise MedmimError("fine-tuning needs a validation split (data.val_fraction > 0 or a 'val' split)")

    def augment(self, cfg: Config):
        return augment_transforms(cfg.data, False)

    def trains_encoder(self, cfg: Config) -> bool:
        """Whether the encoder's weights change (layer-wise lr decay and freeze-then-unfreeze apply)."""
        return cfg.finetune.mode == "full"

    def build(self, cfg: Config, encoder, train_items: list[dict], groups_fn, freeze_epochs: int):
        """(model, task) for the loop."""
        fc, k = cfg.finetune, cfg.data.num_classes
        model = Classifier(encoder, k, mode=fc.mode)
        task = ClassificationTask(model, k, loss=fc.loss, multilabel=fc.multilabel,
                                  class_counts=class_counts(train_items, k), param_groups_fn=groups_fn,
                                  freeze_epochs=freeze_epochs, epochs=fc.epochs)
        return model, task

    def test(self, cfg: Config, task, model, loader, runtime: Runtime, seed: int) -> dict[str, Any]:
        return task.evaluate(model, loader, runtime, bootstrap=cfg.finetune.bootstrap, per_class=True, seed=seed)

    def describe(self, cfg: Config, model) -> tuple[dict[str, Any], dict[str, Any]]:
        """Result fields (before ``n_labelled``, after ``seed``)."""
        return {}, {"mode": cfg.finetune.mode}


def supervised_stage(head: SupervisedHead, cfg: Config, data: DataBundle, run: RunDir, runtime: Runtime, *,
                     init: str | Path | None, resume: bool = True, seed: int | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune ``head`` on a label fraction of the train split; evaluate the best-val model on test.

    ``init``: None = from scratch, or a weights file (medmim safetensors export, MONAI-format ViT).
    Layer-wise lr decay (``finetune.layer_decay``) and freeze-then-unfreeze (``finetune.freeze_epochs``)
    apply only when the head trains the encoder. Validation runs at most ``finetune.max_evals`` times.
    Writes ``result.json``; its ``time_s`` splits the stage's wall-clock time into data (reading and
    preparing items, waiting for batches), train, val and test.
    """
    fc = cfg.finetune
    seed, finished = start_stage(cfg, run, seed, resume)
    if finished is not None:
        return finished
    t_data = time.perf_counter()
    fill_inferred(cfg, data)  # data.num_classes / class_names read from the labels, when the config has none
    run.save_config(cfg)  # `medmim predict` rebuilds the model from it
    train_items, val_items, test_items = labelled_items(cfg, data, seed, with_mask=head.with_mask)
    head.check(cfg, train_items, val_items, test_items)
    t_data = time.perf_counter() - t_data
    info = current()
    bs = min(fc.batch_size, len(train_items))
    train_loader = make_loader(train_items, bs, shuffle=True, seed=seed, augment=head.augment(cfg),
                               drop_last=len(train_items) > bs, rank=info.rank, world_size=info.world_size,
                               num_workers=cfg.data.num_workers)

    def eval_loader(items):
        return make_loader(items, head.eval_batch, shuffle=False, seed=seed, rank=info.rank,
                           world_size=info.world_size)

    encoder = build_encoder_for(cfg)
    report = None
    if init is not None:
        # any layout (medmim, MONAI, MAE, SparK, timm, torchvision); the key report is printed
        report = load_pretrained(encoder, init, inflate=fc.init_inflate, allow_partial=fc.init_allow_partial,
                                 channels=cfg.data.channel_names)
        log(f"[{head.stage}] init from {Path(init).name}: {report.summary().splitlines()[0]}")
        if not report.matched:
            raise MedmimError(f"{init}: no weights matched the encoder ({cfg.encoder.name})")
    trains = head.trains_encoder(cfg)
    groups_fn = (lambda m, wd: layer_decay_groups(m, wd, fc.layer_decay)) if trains and fc.layer_decay < 1 \
        else None
    model, task = head.build(cfg, encoder, train_items, groups_fn, fc.freeze_epochs if trains else 0)
    done = fit(task, train_loader, fc, run, runtime, val_loader=eval_loader(val_items), monitor=head.monitor,
               monitor_mode="max", resume=resume, stage=head.stage, max_evals=fc.max_evals, log=log)
    best = safe_torch_load(run.checkpoints / "best.pt")
    model.load_state_dict(best["model"])
    t_test = time.perf_counter()
    test = head.test(cfg, task, model, eval_loader(test_items), runtime, seed) if test_items else {}
    if test_items:
        save_test_predictions(run, task, cfg)  # predictions_test.csv: ROC/PR, confusion in the report
    times = dict(done.get("time_s") or {})
    times["data"] = round(times.get("data", 0.0) + t_data, 3)
    times["test"] = round(time.perf_counter() - t_test, 3)
    before, after = head.describe(cfg, model)
    result = {**before, "n_labelled": len(train_items), "label_fraction": fc.label_fraction, "seed": seed,
              **after, "best_epoch": int(best["epoch"]), head.monitor: best.get("best"),
              **{f"test_{k}": v for k, v in test.items()},
              "weights_report": None if report is None else
              {"matched": len(report.matched), "missing": len(report.missing),
               "unexpected": len(report.unexpected), "mismatched": len(report.mismatched)},
              "time_s": times}
    run.write_json("result.json", result)
    return result


def finetune_stage(cfg: Config, data: DataBundle, run: RunDir, runtime: Runtime, *,
                   init: str | Path | None, resume: bool = True, seed: int | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune a classifier (``finetune.mode`` linear or full); see :func:`supervised_stage`."""
    return supervised_stage(SupervisedHead(), cfg, data, run, runtime, init=init, resume=resume, seed=seed, log=log)
