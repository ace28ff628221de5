"""Multi-channel inputs (multi-sequence MRI) through every model path: encoders built with
``data.in_channels``, per-channel norm-pix targets (MAE, SparK) against a hand computation, SimCLR
views, heads and segmenters, RGB -> C stems, channel dropout (batched and per sample: same law,
never all channels), the multi-sequence phantoms, and pretrain -> finetune -> predict end to end."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from medmim.config import load_config
from medmim.data import augment as aug
from medmim.errors import ConfigError
from medmim.models import build_encoder
from medmim.models.patches import normalise_patches, patchify
from medmim.train.stages import build_encoder_for

TINY_VIT = ["encoder.embed_dim=32", "encoder.depth=1", "encoder.num_heads=2", "encoder.patch_size=4"]


def channels_cfg(names, *extra):
    return load_config(None, [f"data.channels=[{','.join(names)}]", *extra])


# ---- encoders get data.in_channels --------------------------------------------------------------------
@pytest.mark.parametrize("name,dims", [("vit_tiny", 2), ("vit_tiny", 3), ("resnet18", 2), ("resnet18", 3),
                                       ("convnext_tiny", 2)])
def test_every_encoder_is_built_with_the_declared_channels(name, dims):
    size = 16
    cfg = channels_cfg(["t1", "t2", "flair"], f"encoder.name={name}", f"data.spatial_dims={dims}",
                       f"data.image_size={size}", "encoder.width=8", *TINY_VIT)
    assert cfg.data.in_channels == 3
    enc = build_encoder_for(cfg)
    assert enc.in_channels == 3
    feats = enc(torch.randn(2, 3, *(size,) * dims))
    assert feats[-1].shape[0] == 2
    with pytest.raises((RuntimeError, ValueError)):
        enc(torch.randn(2, 1, *(size,) * dims))  # a grayscale batch does not fit a 3-channel stem


# ---- per-channel norm-pix targets -----------------------------------------------------------------
def hand_normalised(x: np.ndarray, p: int) -> np.ndarray:
    """(C, H, W) -> (N, p*p, C): each patch of each channel minus its mean over its unbiased std,
    cut straight from the image with loops (no patchify)."""
    c, h, w = x.shape
    out = []
    for gy in range(h // p):
        for gx in range(w // p):
            block = x[:, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].reshape(c, -1)  # (C, p*p), row-major
            cols = [(block[k] - block[k].mean()) / np.sqrt(block[k].var(ddof=1) + 1e-6) for k in range(c)]
            out.append(np.stack(cols, 1))
    return np.stack(out)


def test_normalise_patches_is_per_channel_against_a_hand_computation():
    rng = np.random.default_rng(0)
    scale, shift = np.array([1.0, 100.0, 0.01])[:, None, None], np.array([0, 500, -3])[:, None, None]
    x = rng.normal(size=(3, 8, 12)) * scale + shift
    t = patchify(torch.as_tensor(x[None]), 4)
    normed, mean, std = normalise_patches(t, channels=3)
    want = hand_normalised(x, 4)  # (N, 16, 3): patchify's layout is (p, p, C) within a patch
    np.testing.assert_allclose(normed[0].reshape(want.shape).numpy(), want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose((normed * std + mean).numpy(), t.numpy(), rtol=1e-9, atol=1e-9)
    # pooled statistics would differ (the point of doing it per channel)
    pooled, _, _ = normalise_patches(t)
    assert not np.allclose(pooled.numpy(), normed.numpy(), atol=1e-2)


def _rescaled(x: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    y = x.clone()
    y[:, 1] = y[:, 1] * scale + shift
    return y


def test_mae_norm_pix_loss_is_per_channel():
    """MAE's loss is the squared error against targets normalised per patch AND per channel (computed
    by hand from the image), over the hidden patches; one channel on a far larger scale (another
    sequence) does not change how the other is normalised."""
    from medmim.models.mae import MAE

    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", spatial_dims=2, in_channels=2, img_size=16, patch_size=4, embed_dim=32,
                        depth=1, num_heads=2)
    mae = MAE(enc, decoder_dim=16, decoder_depth=1).eval()
    x = torch.rand(2, 2, 16, 16)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask.view(2, -1)[:, ::2] = True
    out = mae(x, mask=mask)
    pred = out["pred"]  # (B, N, P) normalised units, zero at visible patches
    hidden = mask.view(2, -1)
    want = []
    for b in range(2):
        tgt = hand_normalised(x[b].double().numpy(), 4)  # (N, 16, 2)
        p = pred[b].double().numpy().reshape(tgt.shape)
        want.append(((p - tgt) ** 2).mean(axis=(1, 2))[hidden[b].numpy()])
    np.testing.assert_allclose(float(out["recon_loss"]), np.concatenate(want).mean(), rtol=1e-4)
    assert out["recon"].shape == (2, 2, 16, 16)
    big = _rescaled(x, 1000.0, 40.0)
    np.testing.assert_allclose(normalise_patches(patchify(big, 4), 2)[0].numpy()[..., 0::2],
                               normalise_patches(patchify(x, 4), 2)[0].numpy()[..., 0::2], rtol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_spark_outputs_every_channel_with_per_channel_targets(dims):
    from medmim.models.spark import SparK

    torch.manual_seed(0)
    enc = build_encoder("resnet18", spatial_dims=dims, in_channels=3, base_channels=8, small_input=True,
                        num_stages=2)
    spark = SparK(enc, mask_ratio=0.5, backend="dense", decoder_width=16).eval()
    size = 16
    x = torch.rand(2, 3, *(size,) * dims)
    grid = (size // enc.downsample_ratio,) * dims
    mask = torch.zeros(2, *grid, dtype=torch.bool)
    mask.view(2, -1)[:, 1::2] = True
    out = spark(x, mask=mask)
    assert spark.head.out_channels == 3 and out["recon"].shape == x.shape
    # visible cells pasted back exactly, per channel
    from medmim.models.patches import upsample_mask

    vis = ~upsample_mask(mask, enc.downsample_ratio).unsqueeze(1).expand_as(x)
    torch.testing.assert_close(out["recon"][vis], x[vis])
    # decoded prediction, re-normalised per channel by hand, reproduces the loss
    with torch.no_grad():
        feats = enc(x, mask, backend="dense")
        pred = spark.decode(spark.densify(feats, mask))
    p = enc.downsample_ratio
    tgt = normalise_patches(patchify(x, p), channels=3)[0]
    per_cell = ((patchify(pred, p) - tgt) ** 2).mean(-1)
    hidden = mask.flatten(1).float()
    torch.testing.assert_close(out["loss"], (per_cell * hidden).sum() / hidden.sum())
    # the sparse backend (sparse stem over the C channels) gives the masked-dense numbers
    spark.backend = "sparse"
    torch.testing.assert_close(spark(x, mask=mask)["loss"], out["loss"], rtol=1e-4, atol=1e-5)


def test_simclr_views_jitter_each_channel_on_its_own_geometry_shared():
    from medmim.models.simclr import MedicalViews, SimCLR

    views = MedicalViews(2, crop_scale=(1.0, 1.0), max_rotation=0.0, noise_prob=0.0, blur_prob=0.0)
    base = torch.rand(1, 1, 16, 16)
    x = base.repeat(8, 4, 1, 1)  # the same picture on 4 channels
    out = views(x, torch.Generator().manual_seed(0))
    # geometry shared: every channel is an affine intensity map of channel 0
    for c in range(1, 4):
        a = out[:, 0].reshape(8, -1)
        b = out[:, c].reshape(8, -1)
        for i in range(8):
            r = np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1]
            assert r > 0.999
    # intensity jitter differs between channels
    assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-3)
    enc = build_encoder("resnet18", spatial_dims=2, in_channels=4, base_channels=8, small_input=True, num_stages=2)
    loss = SimCLR(enc)(torch.rand(4, 4, 16, 16), generator=torch.Generator().manual_seed(1))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and enc.conv1.weight.grad is not None


# ---- heads, segmenters ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,decoder", [("vit_tiny", "unetr"), ("resnet18", "unet")])
def test_classifier_and_segmenter_take_c_channels(name, decoder):
    from medmim.models.heads import Classifier
    from medmim.models.segmentation import Segmenter

    cfg = channels_cfg(["t2", "adc"], f"encoder.name={name}", "data.spatial_dims=3", "data.image_size=16",
                       "encoder.width=8", "encoder.num_stages=2", *TINY_VIT)
    x = torch.rand(2, 2, 16, 16, 16)
    assert Classifier(build_encoder_for(cfg), 3)(x).shape == (2, 3)
    seg = Segmenter(build_encoder_for(cfg), 3, decoder=decoder, feature_size=8)
    assert seg(x).shape == (2, 3, 16, 16, 16)


# ---- weight loaders: RGB -> C stems ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_rgb_weights_into_a_c_channel_encoder_see_a_repeated_image_as_rgb_sees_it(name, tmp_path):
    """An RGB stem loaded into a 4-channel encoder: the same gray image on all 4 channels gives the
    RGB network's response to that gray image shown as RGB."""
    from safetensors.torch import save_file

    from medmim.models.pretrained import load_pretrained

    kw = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2) if name == "vit_tiny" else \
        dict(base_channels=8, small_input=True, num_stages=2)
    torch.manual_seed(0)
    rgb = build_encoder(name, spatial_dims=2, in_channels=3, img_size=16, **kw).eval()
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    four = build_encoder(name, spatial_dims=2, in_channels=4, img_size=16, **kw).eval()
    load_pretrained(four, path, verbose=False)
    gray = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(four(gray.repeat(1, 4, 1, 1))[-1], rgb(gray.repeat(1, 3, 1, 1))[-1],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_a_medmim_export_for_other_channels_is_refused_in_one_line(name, tmp_path):
    """A medmim export is never adapted like public RGB weights: another channel count, or the same
    channels in another order, is refused naming the file; the export's own channels load exactly."""
    from medmim.errors import MedmimError
    from medmim.models.export import export_encoder
    from medmim.models.pretrained import load_pretrained

    kw = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2) if name == "vit_tiny" else \
        dict(base_channels=8, small_input=True, num_stages=2)

    def enc(c):
        return build_encoder(name, spatial_dims=2, in_channels=c, img_size=16, **kw)

    gray = export_encoder(enc(1), tmp_path / "gray", {"channels": [{"name": "image", "preset": "uint8"}]})
    with pytest.raises(MedmimError) as exc:
        load_pretrained(enc(4), gray, verbose=False, channels=["t1", "t2", "flair", "adc"])
    line = str(exc.value)
    assert "\n" not in line and line.startswith(str(gray)) and "1 input channel" in line and "takes 4" in line
    src = enc(2)
    two = export_encoder(src, tmp_path / "two", {"channels": [{"name": "t1", "preset": "uint8"},
                                                              {"name": "flair", "preset": "uint8"}]})
    with pytest.raises(MedmimError, match="2 input channel.*takes 3"):
        load_pretrained(enc(3), two, verbose=False)
    with pytest.raises(MedmimError, match="another order"):
        load_pretrained(enc(2), two, verbose=False, channels=["flair", "t1"])
    lines = []  # other names, same count: loaded, and the key report says which channel went where
    load_pretrained(enc(2), two, channels=["t2", "adc"], log=lines.append)
    assert "note: channels: the export's are t1, flair, this run's t2, adc" in lines[0]
    dst = enc(2)
    assert load_pretrained(dst, two, verbose=False, channels=["t1", "flair"]).ok
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))
    # without its sidecar the file still says it is a medmim export: the stem's channels are checked
    (tmp_path / "gray" / "encoder.json").unlink()
    with pytest.raises(MedmimError, match="1 input channel.*takes 2"):
        load_pretrained(enc(2), gray, verbose=False)


# ---- channel dropout ---------------------------------------------------------------------------------
def _pattern_law(c: int, q: float) -> dict[tuple, float]:
    """Exact law of the keep pattern: independent drops at rate q, given not all dropped."""
    law = {}
    for pat in itertools.product([0, 1], repeat=c):
        if any(pat):
            k = c - sum(pat)
            law[pat] = q**k * (1 - q) ** (c - k) / (1 - q**c)
    return law


def _check_patterns(keep: np.ndarray, p: float) -> None:
    n, c = keep.shape
    assert keep.any(1).all(), "an image lost every channel"
    sd = np.sqrt(p * (1 - p) / n)
    for ch in range(c):  # each channel dropped with probability p (binomial tolerance)
        assert abs((~keep[:, ch]).mean() - p) < 4 * sd, (ch, (~keep[:, ch]).mean(), p)
    law = _pattern_law(c, aug.independent_drop_rate(p, c))
    assert abs(sum((1 - pat[0]) * w for pat, w in law.items()) - p) < 1e-9  # the law's marginal is p
    counts = {pat: 0 for pat in law}
    for row in keep.astype(int):
        counts[tuple(row)] += 1
    obs = np.array([counts[k] for k in law])
    exp = np.array([law[k] * n for k in law])
    assert stats.chisquare(obs, exp).pvalue > 1e-3


@pytest.mark.parametrize("c,p", [(2, 0.3), (4, 0.25)])
def test_batched_channel_dropout_has_the_law_and_never_drops_all(c, p):
    ba = aug.BatchAugment(2, 4, seed=3, affine=False, intensity=False, channel_dropout=p)
    n = 4000
    out = ba({"image": torch.ones(n, c, 4, 4), aug.INDEX_KEY: torch.arange(n)}, epoch=1)["image"]
    keep = out.flatten(2).amax(2).numpy() > 0
    # zeroed channels are exactly zero, kept ones untouched
    assert set(np.unique(out.numpy()).tolist()) <= {0.0, 1.0}
    _check_patterns(keep, p)


@pytest.mark.parametrize("c,p", [(2, 0.3), (4, 0.25)])
def test_per_sample_channel_dropout_has_the_same_law(c, p):
    from monai.data import MetaTensor

    t = aug.RandChannelDropoutd(["image"], p)
    t.set_random_state(seed=7)
    keep = []
    for _ in range(4000):
        img = t({"image": MetaTensor(torch.ones(c, 4, 4))})["image"]
        keep.append(img.flatten(1).amax(1).numpy() > 0)
    _check_patterns(np.array(keep), p)


def test_channel_dropout_is_a_training_augmentation_only():
    from medmim.data.dataset import augment_transforms, deterministic_transforms, pretrain_transforms

    cfg = channels_cfg(["t1", "t2"], "data.channel_dropout=0.3", "data.augment=sample")
    chain = augment_transforms(cfg.data, False)
    assert any(isinstance(t, aug.RandChannelDropoutd) for t in chain.transforms)
    batched = augment_transforms(cfg.data.model_copy(update={"augment": "batch"}), False)
    assert batched.batch.channel_dropout == 0.3
    det = deterministic_transforms(cfg.data, "uint8", with_mask=False)
    assert not any(isinstance(t, aug.RandChannelDropoutd) for t in det.transforms)
    assert pretrain_transforms(cfg.data) is None  # masked pretexts regress the input: no dropout there
    with pytest.raises(ConfigError, match="channel_dropout"):
        augment_transforms(load_config(None, ["data.channel_dropout=0.3"]).data, False)
    with pytest.raises(ConfigError, match="at most 0.5"):  # two channels, one always kept: p < 1/2
        augment_transforms(channels_cfg(["t1", "t2"], "data.channel_dropout=0.6").data, False)


# ---- multi-sequence phantoms ---------------------------------------------------------------------------
def test_sequence_names_pick_contrasts():
    from medmim.data.phantoms import sequence_contrasts

    assert sequence_contrasts(["flair", "t1ce", "t2", "adc"]) == ["flair", "t1", "t2", "adc"]
    assert sequence_contrasts(["a", "b"]) == ["t1", "t2"]
    assert sequence_contrasts(["dwi", "FLAIR"]) == ["t1", "flair"]
    with pytest.raises(ValueError):
        sequence_contrasts(["t1"])
    # as a data source: a config error naming data.channels, not an internal error
    from medmim.data.phantoms import phantom_source

    for names in (["t1"], ["a", "b", "c", "d", "e"]):
        with pytest.raises(ConfigError, match=r"^data.channels with data.source=phantoms: .*take 2 to 4"):
            phantom_source(channels_cfg(names).data)


def test_each_lookalike_matches_the_lesion_in_exactly_one_sequence():
    from medmim.data.phantoms import MRI_MIMICS, MRI_TISSUES

    lesion = np.array(MRI_TISSUES["lesion"])
    for name, values in MRI_MIMICS.items():
        close = np.abs(np.array(values) - lesion) < 0.05
        assert close.sum() == 1, name
        assert np.abs(np.array(values) - lesion)[~close].min() > 0.2, name


def test_multi_sequence_phantoms_files_manifest_and_lesion_contrast(tmp_path):
    from medmim.data.phantoms import PhantomSpec, generate

    seqs = ("t1", "t2", "flair", "adc")
    spec = PhantomSpec(n_patients=8, images_per_patient=1, size_2d=64, sequences=seqs)
    manifest = generate(tmp_path, 2, spec)
    rows = list(csv.DictReader(open(manifest)))
    assert list(rows[0])[:4] == [f"image_{s}" for s in seqs]
    assert {r["label"] for r in rows} == {"0", "1"}
    lesion_seen = 0
    for r in rows:
        imgs = {s: np.asarray(Image.open(manifest.parent / r[f"image_{s}"]), np.float64) for s in seqs}
        mask = np.asarray(Image.open(manifest.parent / r["mask"]))
        assert all(im.shape == mask.shape for im in imgs.values())
        assert (3 in mask) == (r["label"] == "1")  # a lesion exactly in abnormal cases
        if r["label"] == "1":
            lesion_seen += 1
            les, brain = mask == 3, mask == 1
            m = {s: (imgs[s][les].mean(), imgs[s][brain].mean()) for s in seqs}
            assert m["t1"][0] < m["t1"][1] and m["adc"][0] < m["adc"][1]  # dark on T1 and ADC
            assert m["flair"][0] > m["flair"][1] + 40 and m["t2"][0] > m["t2"][1] + 40  # bright on FLAIR, T2
    assert lesion_seen == 4
    # deterministic: the same spec elsewhere gives byte-identical files
    again = generate(tmp_path / "again", 2, spec)
    for r in rows[:2]:
        for s in seqs:
            a = (manifest.parent / r[f"image_{s}"]).read_bytes()
            assert a == (again.parent / r[f"image_{s}"]).read_bytes()


def test_3d_phantom_sequences_are_float_nifti_on_their_own_scales(tmp_path):
    import nibabel as nib

    from medmim.data.phantoms import PhantomSpec, generate

    manifest = generate(tmp_path, 3, PhantomSpec(n_patients=6, images_per_patient=1, size_3d=16,
                                                 sequences=("t2", "adc")))
    row = next(csv.DictReader(open(manifest)))
    t2 = nib.load(str(manifest.parent / row["image_t2"]))
    adc = nib.load(str(manifest.parent / row["image_adc"]))
    assert t2.shape == adc.shape == (16, 16, 16) and np.allclose(t2.affine, adc.affine)
    assert t2.get_data_dtype() == np.float32
    assert adc.get_fdata().max() > 1.5 * t2.get_fdata().max()  # different scales: per-channel presets matter


# ---- export metadata -----------------------------------------------------------------------------------
def test_channel_metadata_and_model_card_row(tmp_path):
    from medmim.eval.model_card import _channels_text
    from medmim.models.export import channel_metadata, export_encoder

    cfg = load_config(None, ["data.channels=[{name: t1, preset: mri_zscore}, flair]"])
    meta = channel_metadata(cfg.data, "mri_percentile")
    assert meta == [{"name": "t1", "preset": "mri_zscore"}, {"name": "flair", "preset": "mri_percentile"}]
    assert channel_metadata(load_config(None, []).data, "uint8") == [{"name": "image", "preset": "uint8"}]
    enc = build_encoder("resnet18", spatial_dims=2, in_channels=2, base_channels=8, num_stages=2)
    export_encoder(enc, tmp_path, {"channels": meta})
    side = json.loads((tmp_path / "encoder.json").read_text())
    assert side["in_channels"] == 2 and side["channels"] == meta
    assert _channels_text(side["channels"]) == "t1 (mri_zscore), flair (mri_percentile)"


# ---- end to end: phantoms -> pretrain -> finetune -> evaluate / predict ------------------------------
def _probs(table, names):
    from pathlib import Path

    with open(table) as fh:
        rows = list(csv.DictReader(fh))
    return {str(Path(r["file"]).resolve()): np.array([float(r[f"prob_{n}"]) for n in names]) for r in rows}


def _pipeline(tmp_path, dims: int, channels: list[str], method: str, encoder: str, *extra: str):
    """pretrain -> finetune -> evaluate -> predict (on a channel manifest of the test cases) through the
    CLI on multi-sequence phantoms; returns (run dir, predict's and evaluate's probabilities, manifest)."""
    from medmim.cli import main

    common = [f"run.out_dir={tmp_path / 'runs'}", f"data.phantoms.out_dir={tmp_path / 'data'}", "run.name=mc",
              "run.device=cpu", "run.num_threads=1", f"data.spatial_dims={dims}",
              f"data.channels=[{','.join(channels)}]", "data.phantoms.n_patients=16", "data.phantoms.size_2d=32",
              "data.phantoms.size_3d=16", "data.image_size=16", "data.phantoms.pool_patients=0",
              f"pretrain.method={method}", f"encoder.name={encoder}", *TINY_VIT, "encoder.width=8",
              "encoder.num_stages=2", "pretrain.decoder_dim=16", "pretrain.decoder_depth=1", "pretrain.epochs=1",
              "pretrain.batch_size=8", "pretrain.recon_every=0", "finetune.epochs=1", "finetune.batch_size=8",
              "finetune.bootstrap=0", "run.tensorboard=false", *extra]
    assert main(["pretrain", *common]) == 0
    run = tmp_path / "runs" / "mc"
    side = json.loads((run / "encoder.json").read_text())
    assert side["in_channels"] == len(channels)
    assert [c["name"] for c in side["channels"]] == channels and all(c["preset"] for c in side["channels"])
    assert ", ".join(channels[:1]) in (run / "model_card.md").read_text()
    assert main(["finetune", *common]) == 0
    assert main(["evaluate", str(run / "finetune"), "--split", "test", "-o", str(tmp_path / "ev")]) == 0
    ev = _probs(tmp_path / "ev" / "predictions.csv", ["0", "1"])
    # the test cases as a manifest of channel files, as a user would hand them to predict
    manifest = next((tmp_path / "data").glob("*_mri_*/manifest.csv"))
    with open(manifest) as fh:
        rows = [r for r in csv.DictReader(fh)
                if str((manifest.parent / r[f"image_{channels[0]}"]).resolve()) in ev]
    assert len(rows) == len(ev) > 0
    cases = tmp_path / "cases.csv"
    with open(cases, "w", newline="") as fh:
        cols = [f"image_{c}" for c in channels]
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows({c: str(manifest.parent / r[c]) for c in cols} for r in rows)
    assert main(["predict", str(run / "finetune"), str(cases), "-o", str(tmp_path / "pr")]) == 0
    pr = _probs(tmp_path / "pr" / "predictions.csv", ["0", "1"])
    assert set(pr) == set(ev)
    for key in ev:
        np.testing.assert_allclose(pr[key], ev[key], atol=1e-5, err_msg=key)
    return run / "finetune", manifest, rows, pr


def test_2d_four_sequences_mae_pretrain_finetune_predict_equals_evaluate(tmp_path, capsys):
    from medmim.cli import main

    channels = ["t1", "t2", "flair", "adc"]
    run, manifest, rows, _ = _pipeline(tmp_path, 2, channels, "mae", "vit_tiny", "data.channel_dropout=0.25")
    # a wrong channel count is refused with one line naming the file: one PNG (1 channel) for a 4-channel model
    one = manifest.parent / rows[0]["image_t1"]
    capsys.readouterr()
    assert main(["predict", str(run), str(one), "-o", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "medmim predict:" in ln)
    assert one.name in line and "channel" in line
    # a manifest lacking a channel column: one line naming the manifest
    short = tmp_path / "short.csv"
    with open(short, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_t1", "image_t2"])
        w.writeheader()
        w.writerow({"image_t1": str(one), "image_t2": str(one)})
    assert main(["predict", str(run), str(short), "-o", str(tmp_path / "bad2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "short.csv" in err[0] and "image_flair" in err[0]


def test_3d_two_sequences_spark_on_a_cnn_and_a_4d_nifti_predicts_like_its_files(tmp_path):
    """...and the same case given as one 4D NIfTI (channels on the last axis, written with nibabel)
    gets the probabilities of its two files."""
    import nibabel as nib

    from medmim.cli import main

    run, manifest, rows, pr = _pipeline(tmp_path, 3, ["t2", "adc"], "spark", "resnet18", "pretrain.backend=dense")
    t2 = nib.load(str(manifest.parent / rows[0]["image_t2"]))
    adc = nib.load(str(manifest.parent / rows[0]["image_adc"]))
    both = np.stack([np.asarray(t2.dataobj), np.asarray(adc.dataobj)], -1)
    four_d = tmp_path / "case_4d.nii.gz"
    nib.save(nib.Nifti1Image(both, t2.affine, t2.header), str(four_d))
    assert main(["predict", str(run), str(four_d), "-o", str(tmp_path / "pr4d")]) == 0
    got = _probs(tmp_path / "pr4d" / "predictions.csv", ["0", "1"])[str(four_d.resolve())]
    np.testing.assert_allclose(got, pr[str((manifest.parent / rows[0]["image_t2"]).resolve())], atol=1e-5)


def test_3d_four_sequences_mae_and_2d_two_sequences_simclr(tmp_path):
    _pipeline(tmp_path / "mae3d", 3, ["t1", "t2", "flair", "adc"], "mae", "vit_tiny")
    _pipeline(tmp_path / "simclr2d", 2, ["t2", "flair"], "simclr", "resnet18", "data.channel_dropout=0.3",
              "data.augment=sample")  # the per-sample chain, channel dropout included


def test_3d_two_sequence_segmentation_predicts_masks_on_the_first_channels_grid(tmp_path):
    """UNet on a 2-channel CNN, trained on the phantom masks; predict on a channel manifest writes one
    mask per case with the first channel's grid and affine (nibabel)."""
    import nibabel as nib

    from medmim.cli import main

    common = [f"run.out_dir={tmp_path / 'runs'}", f"data.phantoms.out_dir={tmp_path / 'data'}", "run.name=seg",
              "run.device=cpu", "run.num_threads=1", "data.spatial_dims=3", "data.channels=[t2,flair]",
              "data.phantoms.n_patients=12", "data.phantoms.size_3d=16", "data.image_size=16",
              "data.phantoms.pool_patients=0", "data.task=segmentation", "finetune.head=segment",
              "finetune.num_seg_classes=4", "encoder.name=resnet18", "encoder.width=8", "encoder.num_stages=2",
              "finetune.epochs=1", "finetune.batch_size=4", "finetune.bootstrap=0", "run.tensorboard=false"]
    assert main(["finetune", "--init", "scratch", *common]) == 0
    manifest = next((tmp_path / "data").glob("3d_mri_*/manifest.csv"))
    rows = list(csv.DictReader(open(manifest)))[:2]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"image": [str(manifest.parent / r["image_t2"]),
                                                   str(manifest.parent / r["image_flair"])]}) + "\n" for r in rows))
    assert main(["predict", str(tmp_path / "runs" / "seg" / "segment"), str(cases), "-o", str(tmp_path / "pr")]) == 0
    for r in rows:
        src = nib.load(str(manifest.parent / r["image_t2"]))
        out = nib.load(str(tmp_path / "pr" / (r["image_t2"].split("/")[-1].replace(".nii", "") + "_seg.nii.gz")))
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
        assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2, 3}


# ---- anomaly scoring over C channels ----------------------------------------------------------------------
def test_error_maps_and_baseline_statistics_use_every_channel():
    from medmim.anomaly.baselines import image_statistics
    from medmim.anomaly.scoring import error_map

    rng = np.random.default_rng(0)
    x, r = rng.random((2, 3, 8, 8)), rng.random((2, 3, 8, 8))
    got = error_map(torch.as_tensor(x), torch.as_tensor(r), "l2").numpy()
    np.testing.assert_allclose(got, ((x - r) ** 2).mean(1), rtol=1e-6)  # one map: the channel mean
    st = image_statistics(torch.as_tensor(x))
    np.testing.assert_allclose(st["mean"].numpy(), x.reshape(2, -1).mean(1), rtol=1e-6)
    np.testing.assert_allclose(st["variance"].numpy(), x.reshape(2, -1).var(1), rtol=1e-5)


def test_anomaly_train_and_score_on_two_sequence_phantoms(tmp_path):
    from medmim.cli import main

    args = ["anomaly", "train", f"run.out_dir={tmp_path}", "run.name=an", "data.channels=[t2,flair]",
            f"data.phantoms.out_dir={tmp_path / 'ph'}", "data.phantoms.n_patients=16", "data.image_size=32",
            "data.phantoms.size_2d=32", "data.task=segmentation", "encoder.patch_size=8", "run.num_threads=1",
            *TINY_VIT[:3], "encoder.patch_size=8", "pretrain.decoder_dim=16", "pretrain.decoder_depth=1",
            "pretrain.epochs=1", "pretrain.warmup_epochs=0", "anomaly.max_heatmaps=2", "run.tensorboard=false"]
    assert main(args) == 0
    side = json.loads((tmp_path / "an" / "anomaly_model.json").read_text())
    assert side["in_channels"] == 2 and [c["name"] for c in side["channels"]] == ["t2", "flair"]
    assert main(["anomaly", "score", "--run-dir", str(tmp_path / "an")]) == 0
    metrics = json.loads((tmp_path / "an" / "scores_test" / "metrics.json").read_text())
    assert 0 <= metrics["l2"]["image_auroc"] <= 1 and 0 <= metrics["l2"]["pixel_auroc"] <= 1  # lesion label 3


def test_predict_takes_a_dicom_study_folder_as_one_case_and_equals_evaluate(tmp_path):
    """A 2-channel 3D run; a DICOM study whose series are picked by SeriesDescription: predict on the
    study folder gives one case, with evaluate's probabilities for a manifest row naming that folder."""
    import pydicom

    from medmim.cli import main
    from medmim.config import dump_config
    from medmim.data.synthetic import ct_like_volume, write_dicom_series
    from medmim.models.heads import Classifier
    from medmim.train.checkpoint import save_checkpoint

    def write_study(root, seed):
        for name, desc, k in (("a", "T1 AX", 0), ("b", "FLAIR AX", 1)):
            folder, _ = write_dicom_series(root / name, ct_like_volume((10, 12, 6), seed=2 * seed + k),
                                           spacing=(0.5, 0.8, 2.0))
            for f in folder.iterdir():
                ds = pydicom.dcmread(str(f))
                ds.SeriesDescription = desc
                ds.save_as(str(f))
        return root

    study = write_study(tmp_path / "study", 0)
    others = [write_study(tmp_path / f"other{i}", i + 1) for i in range(2)]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,label,patient_id,split\n{study},1,p1,test\n{others[0]},0,p2,train\n"
                        f"{others[1]},1,p3,val\n")
    cfg = load_config(None, ["data.source=manifest", f"data.path={manifest}", "data.spatial_dims=3",
                             "data.image_size=16", "data.modality=mri", "data.channels=[t1,flair]",
                             "encoder.name=resnet18", "encoder.width=8", "encoder.num_stages=2", "data.num_classes=2",
                             "run.num_threads=1", "finetune.bootstrap=0"])
    run = tmp_path / "run"
    (run / "finetune" / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "environment.json").write_text('{"data": {"preset": "mri_percentile"}}')
    torch.manual_seed(0)
    model = Classifier(build_encoder_for(cfg), 2, mode="full")
    save_checkpoint({"model": model.state_dict(), "epoch": 0}, run / "finetune" / "checkpoints" / "best.pt")
    assert main(["evaluate", str(run), "--split", "test", "-o", str(tmp_path / "ev")]) == 0
    assert main(["predict", str(run), str(study), "-o", str(tmp_path / "pr")]) == 0
    ev = _probs(tmp_path / "ev" / "predictions.csv", ["0", "1"])
    pr = _probs(tmp_path / "pr" / "predictions.csv", ["0", "1"])
    assert list(pr) == list(ev) == [str(study.resolve())]
    np.testing.assert_allclose(pr[str(study.resolve())], ev[str(study.resolve())], atol=1e-5)
