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
