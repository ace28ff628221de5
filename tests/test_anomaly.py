"""Anomaly detection: covering masks, error maps, metrics, monotonicity, memory, geometry, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from medmim.anomaly.memory import MemoryModule
from medmim.anomaly.metrics import best_dice, image_metrics, operating_point, pixel_metrics, threshold_at_specificity
from medmim.anomaly.model import MemoryMAE
from medmim.anomaly.outputs import save_nifti_map
from medmim.anomaly.scoring import (ScoreSettings, anomaly_maps, covering_masks, gaussian_filter,
                                    image_scores, min_masks, ssim_map)
from medmim.masking import num_masked
from medmim.models.mae import MAE
from medmim.models.vit import build_vit

torch.set_num_threads(1)


# ---- covering masks -----------------------------------------------------------------------------
@pytest.mark.parametrize("grid,ratio,k", [((7, 7), 0.75, 2), ((7, 7), 0.75, 4), ((8, 8), 0.5, 2),
                                          ((8, 8), 0.9, 3), ((4, 4, 4), 0.75, 4), ((3, 5, 2), 0.6, 5),
                                          ((6, 6), 0.25, 4)])
def test_covering_masks_union_covers_every_patch(grid, ratio, k):
    gen = torch.Generator().manual_seed(0)
    masks = covering_masks(8, grid, ratio, k, generator=gen)
    assert masks.shape == (8, k, *grid) and masks.dtype == torch.bool
    h, n = num_masked(grid, ratio), math.prod(grid)
    # every mask meets the mask contract (exactly h hidden) and the union is the whole grid
    assert (masks.reshape(8, k, -1).sum(-1) == h).all()
    assert masks.any(dim=1).all()
    # each patch is hidden floor(K h / N) or ceil(K h / N) times: the cyclic scheme is balanced
    times = masks.sum(1)
    assert times.min() >= (k * h) // n and times.max() <= -(-(k * h) // n)
    # samples get different masks
    assert not torch.equal(masks[0], masks[1])


def test_covering_masks_refuse_too_few_masks():
    assert min_masks((7, 7), 0.25) == 5  # 12 hidden of 49: 4 masks hide at most 48
    with pytest.raises(ValueError, match="num_masks >= 5"):
        covering_masks(2, (7, 7), 0.25, 4)
    assert covering_masks(2, (7, 7), 0.25, 5).any(dim=1).all()


# ---- error maps ---------------------------------------------------------------------------------
def test_ssim_map_matches_skimage_inside():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((40, 36)).astype(np.float64)
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    _, ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                   data_range=1.0, full=True)
    ours = ssim_map(torch.tensor(a)[None, None], torch.tensor(b)[None, None], sigma=1.5)[0, 0].numpy()
    r = 6  # borders differ only by the padding convention
    assert np.allclose(ours[r:-r, r:-r], ref[r:-r, r:-r], atol=1e-4)
    # identical images: SSIM 1 everywhere; 2D and 3D
    for shape in [(1, 1, 12, 12), (1, 1, 8, 8, 8)]:
        x = torch.rand(shape)
        assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-5)


@pytest.mark.parametrize("sigma", [0.5, 1.5, 2.0])
def test_ssim_map_matches_skimage_everywhere_on_reflect_padded_input(sigma):
    """MONAI's SSIM on reflect-padded input: the whole map equals scikit-image's on the same padding."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.random((28, 24))
    b = np.clip(a + 0.15 * rng.standard_normal(a.shape), 0, 1)
    r = max(1, int(3.5 * sigma + 0.5))
    pa, pb = np.pad(a, r, mode="reflect"), np.pad(b, r, mode="reflect")  # numpy's reflect = torch's
    _, ref = structural_similarity(pa, pb, gaussian_weights=True, sigma=sigma, truncate=3.5,
                                   use_sample_covariance=False, data_range=1.0, full=True)
    ours = ssim_map(torch.tensor(a)[None, None], torch.tensor(b)[None, None], sigma=sigma)[0, 0].numpy()
    assert ours.shape == a.shape
    assert np.allclose(ours, ref[r:-r, r:-r], atol=2e-4)


@pytest.mark.parametrize("shape,sigma", [((2, 1, 28, 28), 1.0), ((1, 2, 12, 10), 0.5), ((1, 1, 10, 12, 9), 1.5)])
def test_gaussian_filter_matches_scipy(shape, sigma):
    from scipy import ndimage

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = gaussian_filter(x, sigma).numpy()
    for b in range(shape[0]):
        for c in range(shape[1]):
            ref = ndimage.gaussian_filter(x[b, c].numpy(), sigma, mode="mirror", truncate=3.5)
            assert np.allclose(ours[b, c], ref, atol=1e-6)


def test_gaussian_filter_preserves_mean_and_image_scores():
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1
    y = gaussian_filter(x, 2.0)
    assert abs(float(y.sum()) - 1.0) < 1e-4 and int(y.flatten().argmax()) == 10 * 21 + 10
    maps = torch.arange(100.0).reshape(1, 10, 10)
    assert image_scores(maps, "mean").item() == pytest.approx(49.5)
    assert image_scores(maps, "max").item() == 99
    assert image_scores(maps, "topk", 0.05).item() == pytest.approx(97.0)  # mean of 95..99


# ---- metrics on hand-made examples ----------------------------------------------------------------
def test_metrics_hand_made():
    m = image_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["auroc"] == pytest.approx(0.75)  # 3 of the 4 (anomalous, normal) pairs ranked right
    assert m["ap"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert math.isnan(image_metrics([1, 1], [0.2, 0.3])["auroc"])
    # best Dice: predicting {0.9, 0.6, 0.5} catches both lesion pixels with one false positive: 4/5
    dice, thr = best_dice([1, 1, 0, 0, 0], [0.9, 0.5, 0.6, 0.1, 0.2])
    assert dice == pytest.approx(0.8) and thr == pytest.approx(0.5)
    # tied scores are one threshold: {0.7, 0.7} has TP 1 -> Dice 2/3, never a split of the tie (1.0)
    dice, thr = best_dice([1, 0, 0], [0.7, 0.7, 0.1])
    assert dice == pytest.approx(2 / 3) and thr == pytest.approx(0.7)
    px = pixel_metrics(np.array([[0, 1], [0, 0]]), np.array([[0.1, 0.9], [0.2, 0.3]]))
    assert px["pixel_auroc"] == 1.0 and px["pixel_ap"] == 1.0 and px["pixel_best_dice"] == 1.0
    t = threshold_at_specificity(np.arange(1, 21), 0.95)
    assert t == 19  # 19 of 20 normal scores are <= 19
    op = operating_point([0, 0, 1, 1], [1, 30, 25, 10], t)
    assert op["specificity"] == 0.5 and op["sensitivity"] == 0.5


def test_metrics_agree_with_sklearn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.random(500) < 0.3
    s = np.round(y * 0.5 + rng.random(500), 1)  # coarse scores: many ties
    m = image_metrics(y, s)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s)) and m["ap"] == pytest.approx(average_precision_score(y, s))
    gt, maps = y.reshape(20, 25), s.reshape(20, 25)
    px = pixel_metrics(gt, maps)
    assert px["pixel_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert px["pixel_ap"] == pytest.approx(average_precision_score(y, s))


# ---- models used by the tests ---------------------------------------------------------------------
class VisibleMeanInpainter(nn.Module):
    """A fixed reconstruction model with no access to hidden pixels: every hidden patch becomes the
    mean (or median) of the image's visible pixels (Pretext contract: ``forward(x, mask) -> {"recon"}``)."""

    def __init__(self, patch_size: int, spatial_dims: int = 2, stat: str = "mean"):
        super().__init__()
        self.patch_size, self.stat = patch_size, stat
        self.encoder = nn.Module()
        self.encoder.downsample_ratio = patch_size
        self.encoder.spatial_dims = spatial_dims

    def forward(self, x, mask=None):
        from medmim.anomaly.scoring import upsample_mask

        hidden = upsample_mask(mask, self.patch_size).unsqueeze(1)
        vis = (~hidden).float()
        if self.stat == "median":
            mean = torch.stack([xi[vi > 0].median() for xi, vi in zip(x, vis.expand_as(x))])
        else:
            mean = (x * vis).flatten(1).sum(1) / vis.flatten(1).sum(1)
        fill = mean.reshape(-1, *[1] * (x.ndim - 1)).expand_as(x)
        return {"recon": torch.where(hidden, fill, x), "mask": mask}


def blob(size: int, centre, radius: float, dims: int = 2) -> torch.Tensor:
    coords = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * dims, indexing="ij")
    d2 = sum((c - m) ** 2 for c, m in zip(coords, centre))
    return torch.exp(-d2 / (2 * radius**2))


@pytest.mark.parametrize("error", ["l2", "l1"])
def test_score_rises_with_lesion_contrast_fixed_model(error):
    """With a model that cannot see hidden pixels and predicts them linearly from the visible ones,
    the error map of ``background + c * lesion`` is ``c^2`` (L2) or ``|c|`` (L1) times one fixed map,
    so every image score must rise strictly with the contrast ``c``."""
    model = VisibleMeanInpainter(4)
    base = torch.full((1, 1, 32, 32), 0.3)
    lesion = blob(32, (12, 19), 2.5)
    settings = ScoreSettings(num_masks=4, mask_ratio=0.75, error=error, smooth_sigma=1.0)
    for how in ("mean", "max", "topk"):
        scores = []
        for c in (0.0, 0.1, 0.2, 0.4, 0.6):
            x = base + c * lesion
            maps = anomaly_maps(model, x, settings, generator=torch.Generator().manual_seed(0))[error]
            scores.append(image_scores(maps, how, 0.02).item())
        assert scores[0] == pytest.approx(0.0, abs=1e-6)
        assert all(b > a for a, b in zip(scores, scores[1:])), (how, scores)


def _normal_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth 'normal anatomy': a random gentle gradient plus a fixed bright bar, light noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    a = torch.rand(n, 3, generator=g)
    img = 0.3 + 0.1 * a[:, :1, None] * xx + 0.1 * a[:, 1:2, None] * yy
    img = img + 0.3 * (xx.abs() < 0.15).float()
    img = img + 0.01 * torch.randn(n, size, size, generator=g)
    return img.unsqueeze(1)


def test_score_rises_with_lesion_contrast_trained_mae():
    """A tiny MAE trained briefly on lesion-free images: a bright blob it never saw gets a higher
    score the higher its contrast (mean over 8 test images, top-k score of the L2 map)."""
    torch.manual_seed(0)
    enc = build_vit("tiny", spatial_dims=2, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model = MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
    data = _normal_images(256, 16, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(250):
        idx = torch.randint(0, len(data), (32,), generator=g)
        loss = model(data[idx], generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = _normal_images(8, 16, seed=99)
    lesion = blob(16, (5, 11), 1.5)
    settings = ScoreSettings(num_masks=4, mask_ratio=0.75, error="l2", smooth_sigma=1.0)
    scores = []
    for c in (0.0, 0.15, 0.3, 0.5):
        maps = anomaly_maps(model, test + c * lesion, settings, generator=torch.Generator().manual_seed(0))["l2"]
        scores.append(image_scores(maps, "topk", 0.05).mean().item())
    assert all(b > a for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] > 3 * scores[0]


def test_scorer_works_with_spark_cnn():
    """The scorer only needs the Pretext contract: SparK on a ResNet works as MAE does."""
    from medmim.models import build_encoder
    from medmim.models.spark import SparK

    torch.manual_seed(0)
    enc = build_encoder("resnet18", spatial_dims=2, img_size=64, width=8)
    model = SparK(enc, mask_ratio=0.5, backend="dense", norm_pix_loss=False, decoder_width=16).eval()
    settings = ScoreSettings(num_masks=2, mask_ratio=0.5, error="l2")
    out = anomaly_maps(model, torch.rand(2, 1, 64, 64), settings, errors=("l2", "ssim"))
    assert out["l2"].shape == out["ssim"].shape == (2, 64, 64)
    assert (out["hidden_count"] >= 1).all() and torch.isfinite(out["ssim"]).all()


# ---- memory -----------------------------------------------------------------------------------------
def test_memory_module_sparse_convex_addressing():
    torch.manual_seed(0)
    mem = MemoryModule(16, 8, shrink=None, temperature=0.1)
    z = torch.randn(3, 5, 8)
    z_hat, w = mem(z)
    assert z_hat.shape == z.shape and w.shape == (3, 5, 16)
    assert torch.allclose(w.sum(-1), torch.ones(3, 5), atol=1e-5) and (w >= 0).all()
    assert (w == 0).any()  # hard shrinkage removes the weak slots
    assert torch.allclose(z_hat, w @ mem.slots, atol=1e-6)


def test_memory_mae_trains_through_the_memory():
    torch.manual_seed(0)
    enc = build_vit("tiny", spatial_dims=2, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    model = MemoryMAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False,
                      memory_slots=10, entropy_weight=0.01)
    x = torch.rand(4, 1, 16, 16)
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert {"loss", "mask", "recon", "pred", "memory_entropy"} <= set(out)
    assert out["recon"].shape == x.shape
    out["loss"].backward()
    assert model.memory.slots.grad is not None and model.memory.slots.grad.abs().sum() > 0
    assert model._weights is None  # nothing of a forward is kept on the module


# ---- geometry -------------------------------------------------------------------------------------
def _map_back_to_source(tmp_path, dc, preset: str, source: dict) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Read ``source`` through training's chain, score it (L2 of a visible-mean inpainter), write the
    map back to the source grid, and read it with nibabel: ``(map, affine, network-space shape)``."""
    import nibabel as nib

    from medmim.data.dataset import deterministic_transforms

    item = deterministic_transforms(dc, preset, with_mask=False)(dict(source))
    x = item["image"][None].float()  # (1, C, 16, 16, 16) network space
    settings = ScoreSettings(num_masks=4, mask_ratio=0.75, error="l2", smooth_sigma=0.0)
    amap = anomaly_maps(VisibleMeanInpainter(4, 3, "median"), x, settings,
                        generator=torch.Generator().manual_seed(0))["l2"][0]
    img = nib.load(str(save_nifti_map(tmp_path / "map.nii.gz", amap, source, dc, preset)))
    return np.asarray(img.dataobj), np.asarray(img.affine), tuple(item["image"].shape)


def test_nifti_map_round_trips_source_geometry(tmp_path):
    """A lesion at known voxels of a NIfTI source goes through MONAI's loader and resize, the
    scorer, and back: the written map has the source shape and affine and peaks on the lesion."""
    import nibabel as nib

    from medmim.config import DataConfig

    shape = (24, 20, 16)
    affine = np.array([[-1.2, 0, 0, 30.0], [0, 0.9, 0, -12.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    vol = np.full(shape, -200.0, np.float32)  # below the soft-tissue window: 0 like the padding
    lesion_vox = np.zeros(shape, bool)
    lesion_vox[14:18, 5:9, 9:12] = True  # known voxels, away from the centre
    vol[lesion_vox] = 200.0
    src = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(src))

    # RAS reorientation flips the first axis (negative x spacing), resampling to 2 mm and the
    # aspect-keeping resize + pad all happen on the way in, and are undone on the way out
    dc = DataConfig(source="manifest", path="unused.csv", spatial_dims=3, image_size=16, modality="ct",
                    target_spacing=[2.0, 2.0, 2.0])
    data, got_affine, _ = _map_back_to_source(tmp_path, dc, "ct_soft_tissue", {"image": str(src)})
    assert data.shape == shape
    assert np.allclose(got_affine, affine)
    peak = np.unravel_index(int(np.argmax(data)), shape)
    assert lesion_vox[peak], (peak, np.argwhere(lesion_vox).mean(0))
    assert data[lesion_vox].mean() > 5 * data[~lesion_vox].mean()


def test_png_maps_are_in_picture_orientation(tmp_path):
    """The loader keeps a PNG in (row, column) order, so a 2D map is drawn without transposing."""
    from PIL import Image

    from medmim.config import DataConfig
    from medmim.data.dataset import deterministic_transforms

    pic = np.zeros((20, 20), np.uint8)
    pic[3:5, 14:17] = 255  # rows 3-4, columns 14-16
    Image.fromarray(pic).save(tmp_path / "p.png")
    dc = DataConfig(source="manifest", path="unused.csv", spatial_dims=2, image_size=20, modality="xray")
    x = deterministic_transforms(dc, "uint8", False)({"image": str(tmp_path / "p.png")})["image"][0]
    assert np.array_equal(np.argwhere(x.numpy() > 0.5), np.argwhere(pic > 0))


# ---- the CLI, end to end on tiny phantoms ------------------------------------------------------------
TINY = ["run.num_threads=1", "encoder.embed_dim=32", "encoder.depth=1", "encoder.num_heads=2",
        "pretrain.decoder_dim=32", "pretrain.decoder_depth=1", "pretrain.epochs=1", "pretrain.warmup_epochs=0",
        "anomaly.max_heatmaps=4"]


def test_cli_train_and_score_2d_phantoms_with_memory(tmp_path):
    from medmim.cli import main

    args = ["anomaly", "train", "-c", "anomaly_phantoms", f"run.out_dir={tmp_path}", "run.name=a2",
            f"data.phantoms.out_dir={tmp_path / 'ph'}", "data.phantoms.n_patients=16", "data.image_size=32",
            "data.phantoms.size_2d=32", "encoder.patch_size=8", "anomaly.memory=true", "anomaly.memory_slots=8",
            *TINY]
    assert main(args) == 0
    run = tmp_path / "a2"
    side = json.loads((run / "anomaly_model.json").read_text())
    assert side["memory"] is True
    assert (run / "anomaly_model.safetensors").exists()
    assert set(side["thresholds"]) == {"l2", "l1", "ssim", "texture"}
    assert (run / "texture_atlas.safetensors").exists()
    assert side["threshold"] == side["thresholds"][side["primary_error"]]
    assert main(["anomaly", "score", "--run-dir", str(run)]) == 0
    out = run / "scores_test"
    metrics = json.loads((out / "metrics.json").read_text())
    for kind in ("l2", "l1", "ssim", "texture"):
        assert 0 <= metrics[kind]["image_auroc"] <= 1 and 0 <= metrics[kind]["pixel_auroc"] <= 1
        assert 0 <= metrics[kind]["pixel_best_dice"] <= 1
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("index,source,label,anomalous,score_l2,score_l1,score_ssim,score_texture,score,")
    assert len(rows) - 1 == metrics["n_images"]
    assert len(list((out / "heatmaps").glob("*.png"))) == 4
    # every evaluation reports the sanity baselines, chosen on val, beside the detector
    cmp = metrics["baselines"]
    assert cmp["detector_score"] == "detector_ssim"
    assert {"untrained_l2", "untrained_l1", "untrained_ssim", "+mean", "-mean", "+variance", "-variance",
            "+laplacian", "-laplacian", "+highfreq_s1", "-highfreq_s1"} <= set(cmp["candidates"])
    assert cmp["best_baseline"] != "detector_ssim" and ("BEATS" in cmp["verdict"]) == cmp["beats_best_baseline"]
    assert cmp["detector"]["value"] == pytest.approx(metrics["ssim"]["image_auroc"])
    assert set(cmp["other_detectors"]) == {"l2", "l1", "texture"}
    assert cmp["other_detectors"]["l1"]["auroc"]["value"] == pytest.approx(metrics["l1"]["image_auroc"])
    assert cmp["verdict"] in (out / "baselines.md").read_text()
    assert (out / "baselines.csv").read_text().startswith("score,role,val_auroc,auroc")


def test_cli_train_with_texmim_saves_it_and_score_reuses_it(tmp_path, capsys):
    from medmim.cli import main

    args = ["anomaly", "train", "-c", "anomaly_phantoms", f"run.out_dir={tmp_path}", "run.name=tm",
            f"data.phantoms.out_dir={tmp_path / 'ph'}", "data.phantoms.n_patients=16", "data.image_size=32",
            "data.phantoms.size_2d=32", "encoder.patch_size=8", "anomaly.error=texmim", "anomaly.texmim_epochs=2",
            "anomaly.texmim_cell=8", *TINY]
    assert main(args) == 0
    run = tmp_path / "tm"
    assert (run / "texture_mim.safetensors").exists()
    side = json.loads((run / "anomaly_model.json").read_text())
    assert side["primary_error"] == "texmim" and side["threshold"] == side["thresholds"]["texmim"]
    assert "untrained_texmim" in side["val_baselines"]["candidates"]
    capsys.readouterr()
    assert main(["anomaly", "score", "--run-dir", str(run)]) == 0
    assert "training the masked texture model" not in capsys.readouterr().out  # the saved one was used
    metrics = json.loads((run / "scores_test" / "metrics.json").read_text())
    assert metrics["threshold_note"] == side["threshold_source"]  # same settings: the saved thresholds hold
    assert metrics["texmim"]["operating_point"]["threshold"] == pytest.approx(side["thresholds"]["texmim"])


def test_cli_train_and_score_3d_phantoms_writes_nifti_in_source_geometry(tmp_path):
    import nibabel as nib

    from medmim.cli import main

    args = ["anomaly", "train", "-c", "anomaly_phantoms3d", f"run.out_dir={tmp_path}", "run.name=a3",
            f"data.phantoms.out_dir={tmp_path / 'ph'}", "data.phantoms.n_patients=8",
            "data.phantoms.size_3d=16", "data.image_size=16", *TINY]
    assert main(args) == 0
    assert main(["anomaly", "score", "--run-dir", str(tmp_path / "a3"), "anomaly.num_masks=5",
                 "anomaly.error=texture"]) == 0
    maps = sorted((tmp_path / "a3" / "scores_test" / "maps").glob("*.nii.gz"))
    assert maps
    metrics = json.loads((tmp_path / "a3" / "scores_test" / "metrics.json").read_text())
    assert "re-chosen" in metrics["threshold_note"]  # other scoring settings than at training
    assert metrics["primary_error"] == "texture" and metrics["baselines"]["detector_score"] == "detector_texture"
    assert metrics["baselines"]["detector"]["value"] == pytest.approx(metrics["texture"]["image_auroc"])
    rows = (tmp_path / "a3" / "scores_test" / "scores.csv").read_text().splitlines()[1:]
    src = rows[int(maps[0].name[:5])].split(",")[1]
    m, s = nib.load(str(maps[0])), nib.load(src)
    assert m.shape == s.shape and np.allclose(m.affine, s.affine)
    # masked texture modelling: trained at scoring time when chosen and the run has none
    assert main(["anomaly", "score", "--run-dir", str(tmp_path / "a3"), "--out", str(tmp_path / "tm"),
                 "anomaly.error=texmim", "anomaly.texmim_epochs=1", "anomaly.texmim_width=4"]) == 0
    metrics = json.loads((tmp_path / "tm" / "metrics.json").read_text())
    assert metrics["baselines"]["detector_score"] == "detector_texmim"
    assert "untrained_texmim" in metrics["baselines"]["candidates"]  # its own untrained network, a baseline
    assert metrics["baselines"]["detector"]["value"] == pytest.approx(metrics["texmim"]["image_auroc"])
    assert 0 <= metrics["texmim"]["pixel_auroc"] <= 1
    assert (tmp_path / "tm" / "scores.csv").read_text().splitlines()[0].endswith(
        "score_ssim,score_texture,score_texmim,score,predicted_anomalous")


def test_nifti_map_of_a_two_sequence_case_is_on_the_first_sequence_grid(tmp_path):
    """A multi-channel case (one NIfTI per sequence, the second on another grid) is read back through
    training's chain with its channels, and its map lands on the first sequence's voxels and affine
    (nibabel is the reference); the lesion is where the first sequence has it."""
    nib = pytest.importorskip("nibabel")
    from medmim.config import DataConfig

    shape = (24, 20, 16)
    affine = np.array([[-1.2, 0, 0, 30.0], [0, 0.9, 0, -12.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    t1 = np.broadcast_to(100.0 + 4.0 * np.arange(shape[1], dtype=np.float32)[None, :, None], shape).copy()
    lesion_vox = np.zeros(shape, bool)  # a smooth ramp (distinct percentiles) and a bright block
    lesion_vox[14:18, 5:9, 9:12] = True
    t1[lesion_vox] = 900.0
    # the second sequence on a coarser grid over the same space (every second voxel of x and y): it is
    # resampled onto the first sequence's grid on the way in
    aff2 = affine.copy()
    aff2[0, 0], aff2[1, 1] = 2 * affine[0, 0], 2 * affine[1, 1]
    t2 = t1[::2, ::2].copy()
    files = [tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"]
    nib.save(nib.Nifti1Image(t1, affine), str(files[0]))
    nib.save(nib.Nifti1Image(t2, aff2), str(files[1]))

    dc = DataConfig(source="manifest", path="unused.csv", spatial_dims=3, image_size=16, modality="mri",
                    channels=["t1", "t2"])
    data, got_affine, net_shape = _map_back_to_source(tmp_path, dc, "mri_percentile",
                                                      {"image": [str(f) for f in files]})
    assert net_shape == (2, 16, 16, 16)
    assert data.shape == shape
    assert np.allclose(got_affine, affine)
    peak = np.unravel_index(int(np.argmax(data)), shape)
    assert lesion_vox[peak], (peak, np.argwhere(lesion_vox).mean(0))
    assert data[lesion_vox].mean() > 2 * data[~lesion_vox].mean()
