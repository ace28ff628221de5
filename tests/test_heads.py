"""Heads on 2D/3D encoders, layer-wise lr decay, the frozen linear probe, freeze-then-unfreeze,
class-weighted / focal losses, and MONAI-format ViT weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medmim.config import OptimSettings
from medmim.models import build_encoder
from medmim.models.heads import Classifier, encoder_layer_ids, layer_decay_groups
from medmim.models.segmentation import Segmenter
from medmim.train.loop import Runtime, fit
from medmim.train.rundir import RunDir
from medmim.train.tasks import ClassificationTask, class_counts, focal_loss


def tiny_vit(d: int, size: int = 16, patch: int = 4, depth: int = 2):
    return build_encoder("vit_tiny", spatial_dims=d, img_size=size, patch_size=patch, embed_dim=24,
                         depth=depth, num_heads=2)


def tiny_cnn(d: int, small: bool = True):
    return build_encoder("resnet18", spatial_dims=d, base_channels=4, small_input=small)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_classifier_shapes(d, kind):
    enc = tiny_vit(d) if kind == "vit" else tiny_cnn(d)
    x = torch.randn(2, 1, *(16,) * d)
    for mode in ("linear", "full"):
        assert Classifier(enc, 3, mode=mode)(x).shape == (2, 3)


@pytest.mark.parametrize("d", [2, 3])
def test_segmenter_shapes(d):
    size = 16
    x = torch.randn(2, 1, *(size,) * d)
    cases = [(tiny_vit(d, patch=4), "unetr"), (tiny_vit(d, patch=8 if d == 2 else 16), "unetr"),
             (tiny_cnn(d, small=True), "unet"), (tiny_vit(d, patch=4), "unet")]
    if d == 2:
        cases.append((tiny_cnn(d, small=False), "unet"))  # stride-4 stem: decoder upsamples past the finest map
        x32 = torch.randn(2, 1, 32, 32)
    for enc, kind in cases:
        model = Segmenter(enc, 4, decoder=kind)
        assert model.kind == kind
        inp = x32 if (d == 2 and enc.downsample_ratio > size) else x
        assert model(inp).shape == (2, 4, *inp.shape[2:])
    with pytest.raises(ValueError):
        Segmenter(tiny_cnn(d), 2, decoder="unetr")


def _group_of(groups, param):
    hits = [g for g in groups if any(p is param for p in g["params"])]
    assert len(hits) == 1, "every trainable parameter is in exactly one group"
    return hits[0]


def test_layer_decay_groups_vit():
    enc = tiny_vit(2, depth=3)
    model = Classifier(enc, 2, mode="full")
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    n_layers = 3 + 2
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)
    g = _group_of(groups, named["encoder.patch_embed.weight"])
    assert g["lr_scale"] == pytest.approx(0.5 ** (n_layers - 1)) and g["weight_decay"] == 0.05
    assert _group_of(groups, named["encoder.patch_embed.bias"])["weight_decay"] == 0.0
    for i in range(3):
        g = _group_of(groups, named[f"encoder.blocks.{i}.attn.qkv.weight"])
        assert g["lr_scale"] == pytest.approx(0.5 ** (n_layers - 1 - (i + 1)))
        assert _group_of(groups, named[f"encoder.blocks.{i}.norm1.weight"])["weight_decay"] == 0.0
    assert _group_of(groups, named["encoder.norm.weight"])["lr_scale"] == 1.0
    assert _group_of(groups, named["head.2.weight"])["lr_scale"] == 1.0
    # the loop turns lr_scale into per-group learning rates
    opt_groups = [{**g, "lr": 1e-3 * g["lr_scale"]} for g in groups]
    torch.optim.AdamW(opt_groups, lr=1e-3)
    # a linear probe's frozen encoder is left out
    probe = Classifier(tiny_vit(2), 2, mode="linear")
    assert sum(len(g["params"]) for g in layer_decay_groups(probe, 0.05, 0.75)) == 2


def test_layer_decay_groups_cnn_per_stage():
    enc = tiny_cnn(2)
    ids, n = encoder_layer_ids(enc)
    assert n == len(enc.feature_channels) + 2
    assert ids["conv1.weight"] == 0 and ids["bn1.weight"] == 0
    for i in range(len(enc.feature_channels)):
        assert ids[f"layer{i + 1}.0.conv1.weight"] == i + 1
    model = Segmenter(enc, 3)
    groups = layer_decay_groups(model, 0.05, 0.8)
    named = dict(model.named_parameters())
    assert _group_of(groups, named["encoder.conv1.weight"])["lr_scale"] == pytest.approx(0.8 ** (n - 1))
    assert _group_of(groups, named["encoder.layer4.1.conv2.weight"])["lr_scale"] == pytest.approx(0.8)
    assert _group_of(groups, named["decoder.out.weight"])["lr_scale"] == 1.0


def _tiny_loader(n=16, d=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *(size,) * d, generator=g)
    y = (x.flatten(1).mean(1) > 0).long()
    items = [{"image": x[i], "label": y[i]} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=8, shuffle=False)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_linear_probe_leaves_encoder_bit_identical(tmp_path):
    torch.manual_seed(0)
    enc = tiny_cnn(2)  # batch norm: running statistics must not move either
    model = Classifier(enc, 2, mode="linear")
    before = _snapshot(enc)
    head_before = _snapshot(model.head)
    task = ClassificationTask(model, 2)
    fit(task, _tiny_loader(), OptimSettings(epochs=2, batch_size=8, lr=1e-2, warmup_epochs=0), RunDir.create(tmp_path),
        Runtime(torch.device("cpu"), None), log=lambda s: None)
    assert _same(before, _snapshot(enc))
    assert not _same(head_before, _snapshot(model.head))


def test_freeze_then_unfreeze(tmp_path):
    torch.manual_seed(0)
    enc = tiny_vit(2)
    model = Classifier(enc, 2, mode="full")
    task = ClassificationTask(model, 2, freeze_epochs=1, epochs=2,
                              param_groups_fn=lambda m, wd: layer_decay_groups(m, wd, 0.75))
    assert model.frozen
    snaps = [_snapshot(enc)]
    fit(task, _tiny_loader(), OptimSettings(epochs=2, batch_size=8, lr=1e-2, warmup_epochs=0), RunDir.create(tmp_path),
        Runtime(torch.device("cpu"), None), on_epoch_end=lambda e, m: snaps.append(_snapshot(enc)),
        log=lambda s: None)
    assert _same(snaps[0], snaps[1])  # head-only epoch
    assert not _same(snaps[1], snaps[2])  # then the encoder trains
    assert not model.frozen
    assert "encoder_frozen" in model.state_dict()  # a resumed run knows its phase


def test_weighted_and_focal_losses_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([0, 1, 0])
    counts = [30, 10]  # weights: total / (K * count) = 40/60, 40/20
    w = torch.tensor([40 / 60, 40 / 20])
    task = ClassificationTask(torch.nn.Identity(), 2, loss="weighted_ce", class_counts=counts)
    assert torch.allclose(task.weight, w)
    logp = logits.log_softmax(1)
    nll = -logp[torch.arange(3), target]
    expected = (w[target] * nll).sum() / w[target].sum()  # PyTorch's weighted mean
    assert task.compute_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # focal, gamma 2, unweighted: mean of (1 - p_t)^2 * CE
    pt = logp[torch.arange(3), target].exp()
    assert focal_loss(logits, target).item() == pytest.approx(((1 - pt) ** 2 * nll).mean().item(), rel=1e-6)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(F.cross_entropy(logits, target).item())
    assert focal_loss(logits, target).item() < F.cross_entropy(logits, target).item()
    ftask = ClassificationTask(torch.nn.Identity(), 2, loss="focal", class_counts=counts)
    wf = (w[target] * (1 - pt) ** 2 * nll).mean()
    assert ftask.compute_loss(logits, target).item() == pytest.approx(wf.item(), rel=1e-6)
    # multi-label focal and class counts
    ml = ClassificationTask(torch.nn.Identity(), 2, loss="focal", multilabel=True)
    assert math.isfinite(ml.compute_loss(logits[:, :2], torch.tensor([[1, 0], [0, 1], [1, 1]])).item())
    assert class_counts([{"label": torch.tensor(1)}, {"label": torch.tensor(0)}, {"label": torch.tensor(1)}], 2) == [1, 2]
    assert class_counts([{"label": torch.tensor([1.0, 0.0])}, {"label": torch.tensor([1.0, 1.0])}], 2) == [2, 1]


@pytest.mark.parametrize("d,proj", [(2, "perceptron"), (3, "conv")])
def test_monai_vit_weights_load_and_compute_the_same(tmp_path, d, proj):
    from monai.networks.nets import ViT as MonaiViT

    from medmim.models.monai_compat import load_init_weights

    torch.manual_seed(0)
    size = 16 if d == 2 else 8
    theirs = MonaiViT(in_channels=1, img_size=size, patch_size=4, hidden_size=24, mlp_dim=96, num_layers=2,
                      num_heads=2, spatial_dims=d, classification=False, qkv_bias=True, proj_type=proj,
                      pos_embed_type="learnable").eval()
    path = tmp_path / "monai_vit.pt"
    torch.save({"state_dict": {f"vit.{k}": v for k, v in theirs.state_dict().items()}}, path)  # UNETR-style prefix
    ours = build_encoder("vit_tiny", spatial_dims=d, img_size=size, patch_size=4, embed_dim=24, depth=2,
                         num_heads=2, pos_embed="learned").eval()
    report = load_init_weights(ours, path, verbose=False)
    assert not report.missing and not report.mismatched
    assert all("norm_cross_attn" in k for k in report.unexpected)
    x = torch.randn(2, 1, *(size,) * d)
    tokens = ours(x)[0].flatten(2).transpose(1, 2)
    assert torch.allclose(theirs(x)[0], tokens, atol=1e-5)


def test_monai_mae_weights(tmp_path):
    from monai.networks.nets.masked_autoencoder_vit import MaskedAutoEncoderViT

    from medmim.models.monai_compat import load_init_weights

    mae = MaskedAutoEncoderViT(in_channels=1, img_size=16, patch_size=4, hidden_size=24, mlp_dim=96, num_layers=2,
                               num_heads=2, spatial_dims=2, decoder_hidden_size=16, decoder_mlp_dim=32,
                               decoder_num_layers=1, decoder_num_heads=2)
    path = tmp_path / "mae.pt"
    torch.save(mae.state_dict(), path)
    ours = tiny_vit(2, depth=2)
    report = load_init_weights(ours, path, verbose=False)
    assert "norm.weight" in report.matched  # MAE's final norm is blocks.{depth}
    assert torch.equal(ours.norm.weight, mae.state_dict()["blocks.2.weight"])
    assert report.missing == [f"blocks.{i}.attn.qkv.bias" for i in range(2)]  # MONAI: qkv_bias=False
    assert any(k.startswith("decoder") for k in report.unexpected)
