"""The fast 2D deterministic chain equals the MONAI chain that defines it (to 1e-6), on pictures of
several sizes and aspects, every preset, and every size mode; bad input fails the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medmim.config import load_config
from medmim.data.dataset import deterministic_transforms
from medmim.data.fastpath import torch_quantile
from medmim.data.presets import PRESETS
from medmim.errors import DataError


def _dc(image_size=64, resize="pad"):
    return load_config(None, [f"data.image_size={image_size}", f"data.resize={resize}"]).data


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    out = {}
    yy, xx = np.mgrid[0:1, 0:1]
    for name, (h, w) in {"square512": (512, 512), "wide": (200, 300), "tall": (130, 77), "native64": (64, 64),
                         "strip": (20, 500), "big": (1100, 1000)}.items():
        yy, xx = np.mgrid[0:h, 0:w]
        img = (120 + 80 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 20, (h, w))).clip(0, 255)
        img[: h // 8] = 0  # a dark band (zeros for the z-score preset, the low percentile)
        path = root / f"{name}.png"
        Image.fromarray(img.astype(np.uint8)).save(path)
        out[name] = str(path)
    rgb = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "rgb.png")
    out["rgb"] = str(root / "rgb.png")
    Image.fromarray(rgb).save(root / "photo.jpg", quality=90)
    out["jpeg"] = str(root / "photo.jpg")
    g16 = (rng.random((150, 110)) * 4000).astype(np.uint16)
    Image.fromarray(g16).save(root / "g16.png")
    out["png16"] = str(root / "g16.png")
    np.savez(root / "mnist.npz", train_images=(rng.random((3, 28, 28)) * 255).astype(np.uint8))
    out["npz"] = f"{root / 'mnist.npz'}#train_images/1"
    out["ct_array"] = (rng.normal(0, 300, (70, 90))).astype(np.float32)  # Hounsfield-like, negative values
    out["int16_array"] = (rng.normal(0, 300, (40, 40))).astype(np.int16)
    return out


@pytest.mark.parametrize("resize", ["pad", "stretch", "none"])
@pytest.mark.parametrize("preset", PRESETS)
def test_fast_chain_equals_monai_chain(pictures, preset, resize):
    det = deterministic_transforms(_dc(64, resize), preset, with_mask=False)
    assert det.fast is not None
    for name, ref in pictures.items():
        if resize == "none" and name == "big":
            continue
        fast = det.fast({"image": ref})
        assert fast is not None, f"{name}: the fast path declined"
        slow = det.reference({"image": ref})
        assert type(slow["image"]) is torch.Tensor and type(fast["image"]) is torch.Tensor
        assert fast["image"].dtype == slow["image"].dtype == torch.float32
        assert fast["image"].shape == slow["image"].shape, name
        torch.testing.assert_close(fast["image"], slow["image"], atol=1e-6, rtol=0, msg=f"{name} {preset} {resize}")
        # and the chain's own call takes the fast path with the same result
        torch.testing.assert_close(det({"image": ref})["image"], slow["image"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("size,resize", [(32, "pad"), (48, "stretch")])
def test_fast_chain_with_mask(tmp_path, size, resize):
    rng = np.random.default_rng(1)
    img = (rng.random((90, 140)) * 255).astype(np.uint8)
    mask = np.zeros((90, 140), np.uint8)
    mask[20:60, 30:100] = 1
    mask[70:80, 10:20] = 2
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    item = {"image": str(tmp_path / "i.png"), "mask": str(tmp_path / "m.png")}
    det = deterministic_transforms(_dc(size, resize), "xray", with_mask=True)
    fast, slow = det.fast(dict(item)), det.reference(dict(item))
    assert fast is not None
    for k in ("image", "mask"):
        torch.testing.assert_close(fast[k], slow[k], atol=1e-6, rtol=0)
    assert set(torch.unique(fast["mask"]).tolist()) <= {0.0, 1.0, 2.0}


def test_percentiles_match_torch_quantile():
    rng = np.random.default_rng(2)
    for arr in [(rng.random(1000) * 255).astype(np.uint8), rng.normal(size=777).astype(np.float32),
                rng.integers(-1000, 3000, 5000).astype(np.int16), np.array([5], np.uint8)]:
        for q in (0.0, 0.005, 0.01, 0.5, 0.99, 0.995, 1.0):
            want = torch.quantile(torch.as_tensor(arr, dtype=torch.float32), q)
            got = torch_quantile(arr, [q])[0]
            assert float(got) == pytest.approx(float(want), abs=1e-6 * max(1.0, abs(float(want))))


def test_bad_input_fails_the_same_way(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((30, 30), 7, np.uint8)).save(blank)
    good = tmp_path / "ok.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    nan = np.ones((20, 20), np.float32)
    nan[3, 4] = np.nan
    det = deterministic_transforms(_dc(), "xray", with_mask=False)
    for ref in (str(blank), str(trunc), nan):
        with pytest.raises(Exception) as fast_err:
            det({"image": ref})
        with pytest.raises(Exception) as slow_err:
            det.reference({"image": ref})
        msgs = []
        for err in (fast_err.value, slow_err.value):
            while err.__cause__ is not None and not isinstance(err, DataError):
                err = err.__cause__
            msgs.append(str(err))
        assert msgs[0] == msgs[1]
        assert isinstance(fast_err.value, DataError) or isinstance(fast_err.value.__cause__, DataError)


def test_3d_keeps_the_monai_chain():
    dc = load_config(None, ["data.spatial_dims=3", "data.image_size=16"]).data
    det = deterministic_transforms(dc, "ct_soft_tissue", with_mask=False)
    assert det.fast is None
    vol = np.random.default_rng(0).normal(0, 200, (20, 18, 12)).astype(np.float32)
    assert det({"image": vol})["image"].shape == (1, 16, 16, 16)


# ---- parallel materialisation and the shard cache ------------------------------------------------
def _png_records(root, n, size=(40, 50)):
    rng = np.random.default_rng(3)
    recs = []
    for i in range(n):
        p = root / f"p{i:03d}.png"
        Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(p)
        recs.append({"image": str(p), "label": i % 2, "patient_id": f"p{i}"})
    bad = root / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    recs.insert(5, {"image": str(bad), "label": 0, "patient_id": "bad"})
    return recs


def _materialize(recs, *over, skipped=None):
    from medmim.data.dataset import materialize

    cfg = load_config(None, ["data.image_size=16", *over]).data
    return materialize(recs, cfg, "xray", skipped=skipped)


def test_parallel_materialisation_equals_serial(tmp_path):
    recs = _png_records(tmp_path, 40)
    skip1, skip2 = [], []
    serial = _materialize(recs, "data.num_workers=0", skipped=skip1)
    parallel = _materialize(recs, "data.num_workers=2", skipped=skip2)
    assert len(serial) == len(parallel) == 40
    assert skip1 == skip2 and len(skip1) == 1 and skip1[0]["file"].endswith("broken.png")
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)
        assert int(a["label"]) == int(b["label"])


def test_shard_cache_is_shared_and_only_computes_what_is_missing(tmp_path, monkeypatch):
    import json

    from medmim.data import dataset as ds_mod

    recs = _png_records(tmp_path, 40)
    over = ["data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=2"]
    ref = _materialize(recs, "data.cache=memory")
    first = _materialize(recs, *over)
    assert type(first).__name__ == "CachedItems"
    for a, b in zip(ref, first):
        torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)
        assert int(a["label"]) == int(b["label"])
    shards = list((tmp_path / "cache").glob("*/shards/*.json"))
    assert len(shards) == 1 and len(json.loads(shards[0].read_text())["keys"]) == 40  # the broken file is not cached
    # a subset (another stage or study cell) is served from the same shards: nothing is computed
    def no_compute(*a, **k):
        raise AssertionError("the cache should have served every item")

    monkeypatch.setattr(ds_mod, "run_chain", no_compute)
    sub = _materialize(recs[10:30], *over)
    for a, b in zip(ref[9:29], sub):
        torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)
    monkeypatch.undo()
    # a half-written shard (array without index) is ignored; new records get a new shard
    (shards[0].parent / "junk.npy").write_bytes(b"partial")
    (tmp_path / "more").mkdir()
    more = _png_records(tmp_path / "more", 3)  # (its broken file comes last)
    got = _materialize(recs + more[:3], *over)
    assert len(got) == 43 and len(list((tmp_path / "cache").glob("*/shards/*.json"))) == 2
    # pickled into loader workers, the items still read (file handles are per process)
    import pickle

    again = pickle.loads(pickle.dumps(got))
    torch.testing.assert_close(again[3]["image"], ref[3]["image"], atol=0, rtol=0)


def test_disk_cache_with_masks(tmp_path):
    from medmim.data.dataset import materialize

    rng = np.random.default_rng(0)
    recs = []
    for i in range(3):
        Image.fromarray((rng.random((30, 20)) * 255).astype(np.uint8)).save(tmp_path / f"i{i}.png")
        Image.fromarray((rng.random((30, 20)) > 0.5).astype(np.uint8)).save(tmp_path / f"m{i}.png")
        recs.append({"image": str(tmp_path / f"i{i}.png"), "mask": str(tmp_path / f"m{i}.png")})
    cfg = load_config(None, ["data.image_size=16", "data.cache=disk", f"data.cache_dir={tmp_path / 'c'}"]).data
    mem = materialize(recs, cfg.model_copy(update={"cache": "memory"}), "xray", with_mask=True)
    disk = materialize(recs, cfg, "xray", with_mask=True)
    for a, b in zip(mem, disk):
        for k in ("image", "mask"):
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


# ---- threads -------------------------------------------------------------------------------------
def test_default_threads_never_exceed_cores_or_omp(monkeypatch):
    import os

    from medmim.config import default_num_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_num_threads() == cores
    assert load_config(None, []).run.num_threads == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_num_threads() == 1 and load_config(None, []).run.num_threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 7))
    assert default_num_threads() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert default_num_threads() == cores


def test_data_check_honours_num_threads_and_workers(tmp_path, capsys):
    import csv

    from medmim.cli import main

    recs = _png_records(tmp_path, 36)
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "patient_id"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("image", "label", "patient_id")} for r in recs)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code = main(["data", "check", "data.source=manifest", f"data.path={manifest}", "data.image_size=16",
                     "run.num_threads=1", "data.num_workers=2", "data.val_fraction=0.2", "data.test_fraction=0.2",
                     f"run.out_dir={tmp_path / 'runs'}"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert code == 0
    out = capsys.readouterr().out
    assert '"skipped": 1' in out and "broken.png" in (tmp_path / "runs" / "run" / "skipped.csv").read_text()


# ---- batched augmentation ------------------------------------------------------------------------
from scipy import stats  # noqa: E402

from medmim.data import augment as aug  # noqa: E402


def _blob(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    sl = tuple(slice(s // 5, s // 2 + 3) for s in shape)
    img[sl] = 1.0
    return torch.as_tensor(img + 0.2 * rng.random(shape).astype(np.float32))[None]


@pytest.mark.parametrize("dims", [2, 3])
def test_batch_affine_equals_monai_affine(dims):
    from monai import transforms as mt

    shape = (24, 20) if dims == 2 else (12, 10, 14)
    ba = aug.BatchAugment(dims, shape[0])
    imgs = torch.stack([_blob(shape, s) for s in range(3)])
    params = [(0.15, 1.08, [2.5, -1.0, 1.5][:dims]), (-0.1, 0.93, [-3.0, 0.4, 0.0][:dims]), (0.0, 1.0, [0.0] * dims)]
    p = {"angle": np.array([a for a, _, _ in params]), "scale0": np.array([s for _, s, _ in params]),
         "shift": np.array([t for _, _, t in params])}
    out = ba.apply_affine(imgs, torch.as_tensor(ba.affine_matrices(p)))
    for b, (angle, scale, shift) in enumerate(params):
        ref = mt.Affine(rotate_params=[angle] if dims == 2 else [angle, 0.0, 0.0], scale_params=[scale],
                        translate_params=shift, padding_mode="zeros", mode="bilinear", image_only=True)(imgs[b])
        torch.testing.assert_close(out[b], torch.as_tensor(ref), atol=1e-5, rtol=0)
    masks = (imgs > 0.9).float()
    out_m = ba.apply_affine(masks, torch.as_tensor(ba.affine_matrices(p)), mode="nearest")
    ref_m = mt.Affine(rotate_params=[0.15] if dims == 2 else [0.15, 0.0, 0.0], scale_params=[1.08],
                      translate_params=[2.5, -1.0, 1.5][:dims], padding_mode="zeros", mode="nearest",
                      image_only=True)(masks[0])
    assert float((out_m[0] != torch.as_tensor(ref_m)).float().mean()) < 0.01  # ties at exact half-voxels aside


@pytest.mark.parametrize("dims", [2, 3])
def test_batch_crop_equals_random_resized_crop(dims):
    from monai import transforms as mt

    shape = (30, 22) if dims == 2 else (14, 12, 16)
    size = 16 if dims == 2 else 10
    ba = aug.BatchAugment(dims, size, crop=True)
    imgs = torch.stack([_blob(shape, s) for s in range(2)])
    frac = np.array([[0.7, 0.9, 0.8][:dims], [1.0, 0.5, 0.6][:dims]])
    start = np.array([[0.3, 0.8, 0.1][:dims], [0.0, 1.0, 0.5][:dims]])
    out = ba.apply_crop(imgs, frac, start)
    for b in range(2):  # presets.RandResizedCropd.__call__ with these fractions and starts
        sl = [slice(None)]
        for n, f, st in zip(shape, frac[b], start[b]):
            k = max(1, int(round(n * f)))
            a = int(round(st * (n - k)))
            sl.append(slice(a, a + k))
        ref = mt.Resize((size,) * dims, mode="bilinear" if dims == 2 else "trilinear")(imgs[b][tuple(sl)])
        torch.testing.assert_close(out[b], torch.as_tensor(ref), atol=1e-5, rtol=0)


def _monai_params(n_draws, dims=2, size=32):
    from medmim.data.dataset import augment_transforms

    dc = load_config(None, [f"data.image_size={size}", f"data.spatial_dims={dims}"]).data
    chain = augment_transforms(dc, False)
    rd, ri = chain.transforms[0], chain.transforms[1]  # RandAffined (its prob), RandScaleIntensityd
    rd.set_random_state(0)
    ri.set_random_state(1)
    rows = []
    for _ in range(n_draws):
        rd.randomize(None)
        rd.rand_affine.randomize()  # as RandAffined.__call__ does
        g = rd.rand_affine.rand_affine_grid
        assert len(g.scale_params) == 1  # MONAI: a scalar scale_range jitters the first axis only
        ri.randomize(None)
        ri.scaler.randomize(None)
        rows.append((rd._do_transform, g.rotate_params[0], g.scale_params[0], *g.translate_params,
                     ri._do_transform, 1 + ri.scaler.factor))
    return np.array(rows, dtype=np.float64)


def test_batch_augment_parameters_follow_the_monai_distribution():
    n = 3000
    ref = _monai_params(n)
    ours = aug.BatchAugment(2, 32, seed=5).params(np.arange(n), epoch=3)
    got = np.column_stack([ours["affine_on"], ours["angle"], ours["scale0"], ours["shift"], ours["intensity_on"],
                           ours["factor"]])
    for col, prob in ((0, aug.AFFINE_PROB), (5, aug.INTENSITY_PROB)):  # the probabilities (binomial, 4.5 sigma)
        sigma = np.sqrt(prob * (1 - prob) / n)
        assert abs(ref[:, col].mean() - prob) < 4.5 * sigma and abs(got[:, col].mean() - prob) < 4.5 * sigma
    for col in (1, 2, 3, 4, 6):  # angle, scale, shift y, shift x, intensity factor
        assert stats.ks_2samp(ref[:, col], got[:, col]).pvalue > 1e-3, col
    # the test has power: a wider rotation range is told apart
    wide = aug.BatchAugment(2, 32, seed=5, rotate=0.25).params(np.arange(n), epoch=3)
    assert stats.ks_2samp(ref[:, 1], wide["angle"]).pvalue < 1e-6
    # parameters are a function of (seed, epoch, index) only
    again = aug.BatchAugment(2, 32, seed=5).params(np.arange(n)[::-1].copy(), epoch=3)
    np.testing.assert_array_equal(again["angle"][::-1], ours["angle"])
    assert not np.array_equal(aug.BatchAugment(2, 32, seed=5).params(np.arange(n), epoch=4)["angle"], ours["angle"])


def test_batch_crop_parameters_follow_random_resized_crop():
    from medmim.data.presets import RandResizedCropd

    n = 2000
    rrc = RandResizedCropd(["image"], (16, 16), scale=(0.5, 1.0))
    rrc.set_random_state(0)
    ref = []
    for _ in range(n):
        rrc.randomize(2)
        ref.append([*rrc._fracs, *rrc._starts])
    ref = np.array(ref)
    p = aug.BatchAugment(2, 16, crop=True, seed=1).params(np.arange(n), epoch=0)
    got = np.column_stack([p["crop_frac"], p["crop_start"]])
    for col in range(4):
        assert stats.ks_2samp(ref[:, col], got[:, col]).pvalue > 1e-3, col


def _image_stats(x):
    x = x[:, 0].double()
    h, w = x.shape[1:]
    yy, xx = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    mass = x.sum((1, 2))
    return np.column_stack([x.mean((1, 2)).numpy(), ((x * yy).sum((1, 2)) / mass).numpy(),
                            ((x * xx).sum((1, 2)) / mass).numpy(), x.std((1, 2)).numpy()])


def test_batched_and_per_sample_augmentation_give_the_same_image_statistics():
    from medmim.data.augment import augment_batch
    from medmim.data.dataset import augment_transforms, make_loader, set_loader_epoch

    n, size = 600, 24
    items = [{"image": _blob((size, size), 0)} for _ in range(n)]
    stats_of = {}
    for mode in ("sample", "batch"):
        dc = load_config(None, [f"data.image_size={size}", f"data.augment={mode}"]).data
        chain = augment_transforms(dc, False)
        assert (chain.batch is not None) == (mode == "batch")
        loader = make_loader(items, 100, shuffle=False, seed=0, augment=chain, for_eval=False)
        set_loader_epoch(loader, 1)
        out = [augment_batch(loader, b)["image"] for b in loader]
        stats_of[mode] = _image_stats(torch.cat(out))
    for col in range(4):  # mean, centroid row, centroid column, contrast
        assert stats.ks_2samp(stats_of["sample"][:, col], stats_of["batch"][:, col]).pvalue > 1e-3, col
    # power: a doubled translation range is told apart on the centroids
    wide = aug.BatchAugment(2, size, translate=2 * aug.TRANSLATE)
    x = torch.stack([it["image"] for it in items])
    moved = _image_stats(wide({"image": x, aug.INDEX_KEY: torch.arange(n)}, epoch=1)["image"])
    assert min(stats.ks_2samp(stats_of["sample"][:, c], moved[:, c]).pvalue for c in (1, 2)) < 1e-4
