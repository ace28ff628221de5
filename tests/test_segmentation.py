"""Segmentation: the task on the one loop, sliding-window inference, and a tiny phantom run end to end
(finetune with head=segment, then `medmim predict` on its images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from medmim.models import build_encoder
from medmim.models.segmentation import Segmenter, unetr_layers, vit_intermediate_tokens
from medmim.train.loop import Runtime
from medmim.train.segment import SegmentationTask, sliding_window_logits

CPU = Runtime(torch.device("cpu"), None)


def test_sliding_window_matches_direct_for_a_pointwise_model():
    conv = nn.Conv3d(1, 3, 1)
    x = torch.randn(1, 1, 20, 24, 16)
    with torch.no_grad():
        direct = conv(x)
        windowed = sliding_window_logits(conv, x, (16, 16, 16), overlap=0.25)
    assert windowed.shape == direct.shape
    assert torch.allclose(windowed, direct, atol=1e-5)


def test_vit_intermediate_tokens_match_the_forward():
    vit = build_encoder("vit_tiny", spatial_dims=2, img_size=16, patch_size=4, embed_dim=24, depth=4, num_heads=2)
    x = torch.randn(2, 1, 16, 16)
    hidden, last = vit_intermediate_tokens(vit, x, [0, 2])
    assert [h.shape for h in hidden] == [(2, 24, 4, 4)] * 2
    assert torch.allclose(last, vit(x)[0], atol=1e-6)
    assert unetr_layers(12, 4) == [2, 5, 8]  # UNETR's z3, z6, z9


@pytest.mark.parametrize("d", [2, 3])
def test_segmentation_task_step_and_windowed_evaluation(d):
    torch.manual_seed(0)
    size = 32 if d == 2 else 16
    enc = build_encoder("vit_tiny", spatial_dims=d, img_size=16 if d == 2 else 8, patch_size=4, embed_dim=24,
                        depth=2, num_heads=2)
    model = Segmenter(enc, 3, feature_size=8)
    roi = (16,) * d if d == 2 else (8,) * d  # smaller than the images: sliding windows at evaluation
    task = SegmentationTask(model, 3, roi=roi)
    x = torch.rand(2, 1, *(size,) * d)
    mask = (x > 0.5).long() + (x > 0.8).long()
    out = task.training_step(model, {"image": x, "mask": mask})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.decoder.out.weight.grad is not None
    loader = torch.utils.data.DataLoader([{"image": x[i], "mask": mask[i]} for i in range(2)], batch_size=2)
    metrics = task.evaluate(model, loader, CPU, bootstrap=20)
    for k in ("dice", "dice_class1", "dice_class2", "hd95", "loss", "dice_ci_low", "dice_ci_high"):
        assert k in metrics
    assert 0.0 <= metrics["dice"] <= 1.0


def test_phantom_segmentation_run_and_predict(tmp_path, monkeypatch):
    """finetune head=segment on tiny 2D phantoms (lung/heart/lesion masks), then predict PNG masks."""
    from PIL import Image

    from medmim.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["finetune", "-c", "phantoms_seg", "--init", "scratch", "run.name=seg", "run.out_dir=runs",
            "data.phantoms.out_dir=phantoms", "data.phantoms.n_patients=12", "data.phantoms.images_per_patient=1",
            "data.phantoms.size_2d=32", "data.image_size=32", "encoder.embed_dim=24", "encoder.depth=2",
            "encoder.num_heads=2", "finetune.epochs=1", "finetune.batch_size=4", "finetune.seg_feature_size=8",
            "finetune.seg_patch_size=16", "finetune.bootstrap=20"]
    assert main(args) == 0
    result = json.loads((tmp_path / "runs" / "seg" / "segment" / "result.json").read_text())
    assert result["decoder"] == "unetr" and result["roi"] == [16, 16]
    assert 0.0 <= result["test_dice"] <= 1.0 and "test_hd95" in result and "test_dice_ci_low" in result
    images = sorted((tmp_path / "phantoms" / "2d" / "images").glob("*.png"))[:2]
    assert main(["predict", "runs/seg", *map(str, images), "-o", "masks"]) == 0
    for img in images:
        mask = np.array(Image.open(tmp_path / "masks" / f"{img.stem}_seg.png"))
        assert mask.shape == np.array(Image.open(img)).shape
        assert mask.max() < 4
