"""The unlabelled pretraining pool (data.unlabelled): sources, per-source presets, the leakage guard."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medmim.config import load_config
from medmim.data.dataset import deterministic_transforms, materialize, prepare_data
from medmim.data.manifest import read_manifest
from medmim.data.phantoms import PhantomSpec, generate, generate_pool
from medmim.data.pool import content_hash, detect_kind, record_hash
from medmim.data.synthetic import write_png
from medmim.errors import ConfigError, DataError

from conftest import require_shared

RNG = np.random.default_rng(7)
NPZ = "../shared/datasets/pneumoniamnist/pneumoniamnist_28.npz"


def _cfg(tmp_path, *extra):
    base = [f"data.phantoms.out_dir={tmp_path / 'ph'}", "data.phantoms.n_patients=12",
            "data.phantoms.images_per_patient=1", "data.phantoms.size_2d=32", "data.image_size=16",
            "data.val_fraction=0.25", "data.test_fraction=0.25"]
    return load_config(None, base + list(extra))


def _pool_cfg(tmp_path, sources: str, *extra):
    return _cfg(tmp_path, f"data.unlabelled={sources}", *extra)


def _pngs(folder: Path, n: int, size=(24, 20)) -> list[Path]:
    return [write_png(folder / f"sub{i % 2}" / f"img{i}.png", RNG.integers(0, 255, size)) for i in range(n)]


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_folder_pool_recursive_images_only(tmp_path, capsys):
    _pngs(tmp_path / "pacs", 5)
    (tmp_path / "pacs" / "sub0" / "notes.txt").write_text("not an image")
    assert detect_kind(tmp_path / "pacs") == "folder"
    data = prepare_data(_pool_cfg(tmp_path, f"[{tmp_path / 'pacs'}]"))
    assert len(data.pool) == 5
    assert all(r["split"] == "pool" and "label" not in r for r in data.pool)
    n_lab = len(data.split("train")) + len(data.split("val"))
    assert len(data.pretrain_records()) == n_lab + 5
    src = data.pool_info["sources"][0]
    assert src["kind"] == "folder" and src["images"] == 5 and src["not_images"] == 1
    assert any("notes.txt" in s["file"] for s in data.skipped)
    assert "5 unlabelled" in capsys.readouterr().out


def test_npz_pool_medmnist_layout_and_plain_array(tmp_path):
    arrs = RNG.integers(0, 255, (7, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arrs)  # stored as arr_0
    np.savez(tmp_path / "mm.npz", train_images=arrs[:4], train_labels=np.zeros(4), val_images=arrs[4:6],
             val_labels=np.ones(2), test_images=arrs[6:], test_labels=np.ones(1))
    data = prepare_data(_pool_cfg(tmp_path, f"[{tmp_path / 'plain.npz'}, {{path: {tmp_path / 'mm.npz'}, "
                                            "keys: [train_images, val_images]}]"))
    info = {s["name"]: s for s in data.pool_info["sources"]}
    assert info["plain.npz"]["images"] == 7 and info["plain.npz"]["kind"] == "npz"
    # the mm.npz images are the same pixels as the plain ones: dropped as repeats, counted
    assert info["mm.npz"]["found"] == 6 and info["mm.npz"]["duplicates_in_pool"] == 6
    items = materialize(data.pool, data_cfg := _pool_cfg(tmp_path, "[]").data, data.preset)
    want = torch.as_tensor(arrs[0].astype(np.float32) / 255.0)
    got = items[0]["image"][0]
    assert got.shape == (16, 16)
    ref = torch.nn.functional.interpolate(want[None, None], size=(16, 16), mode="area")[0, 0]
    assert torch.allclose(got, ref, atol=1e-5)
    assert data_cfg.image_size == 16


def test_npz_entry_hash_is_its_pixel_bytes(tmp_path):
    a = RNG.integers(0, 255, (3, 10, 12), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", imgs=a)
    assert content_hash(f"{tmp_path / 'x.npz'}#imgs/1") == content_hash(a[1].copy())
    assert content_hash(f"{tmp_path / 'x.npz'}#imgs/1") != content_hash(f"{tmp_path / 'x.npz'}#imgs/2")
    b = a[1].copy()
    b[0, 0] ^= 1  # one pixel differs
    assert content_hash(b) != content_hash(a[1])
    p = write_png(tmp_path / "f.png", a[0])
    assert content_hash(p) == hashlib.blake2b(p.read_bytes(), digest_size=20).hexdigest()  # a file's bytes
    from medmim.data.splits import content_hash as split_hash  # one hash shared with the split check

    assert content_hash(f"{tmp_path / 'x.npz'}#imgs/1") == split_hash({"image": a[1].copy()})


def test_manifest_pool_ignores_labels_masks_splits(tmp_path):
    files = _pngs(tmp_path / "m", 4)
    rows = ["image,label,split,mask,patient_id"] + [f"{f},1,test,{f},U{i}" for i, f in enumerate(files)]
    (tmp_path / "pool.csv").write_text("\n".join(rows) + "\n")
    cfg = _pool_cfg(tmp_path, f"[{tmp_path / 'pool.csv'}]")
    data = prepare_data(cfg)
    assert len(data.pool) == 4 and data.pool_info["sources"][0]["kind"] == "manifest"
    assert all(r["split"] == "pool" and "label" not in r and "mask" not in r for r in data.pool)
    assert data.pool_info["sources"][0]["patients"] == 4
    items = materialize(data.pretrain_records(), cfg.data, data.preset)
    assert len(items) == len(data.pretrain_records())
    assert all("label" not in it for it in items[-4:])


def test_dicom_folder_pool_pacs_export(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    export = tmp_path / "pacs_export"
    for i, name in enumerate(("CT_small.dcm", "MR_small.dcm")):
        dst = export / f"study{i}" / "series1" / "IM0001"  # PACS exports often have no suffix
        dst.parent.mkdir(parents=True)
        shutil.copy(get_testdata_file(name), dst)
    (export / "DICOMDIR.txt").write_text("index")
    assert detect_kind(export) == "dicom"
    cfg = _pool_cfg(tmp_path, f"[{{path: {export}, modality: ct}}]")
    data = prepare_data(cfg)
    assert len(data.pool) == 2 and data.pool_info["sources"][0]["kind"] == "dicom"
    assert data.pool_info["sources"][0]["preset"] == "ct_soft_tissue"
    items = materialize(data.pool, cfg.data, "uint8")
    assert len(items) == 2 and items[0]["image"].shape == (1, 16, 16)
    # the CT slice through the chain equals pydicom's pixels in HU, windowed and resized by hand
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    win = np.clip((hu - (40 - 200)) / 400.0, 0, 1)
    ref = torch.nn.functional.interpolate(torch.as_tensor(win)[None, None], size=(16, 16), mode="area")[0, 0]
    ct_item = next(it for it, r in zip(items, data.pool) if "study0" in r["image"])
    assert torch.allclose(ct_item["image"][0], ref, atol=1e-4)


def test_dicom_series_pool_real_epi(tmp_path):
    series = require_shared("dicom_mr_ge_epi", "series")
    data = prepare_data(_pool_cfg(tmp_path, f"[{{path: {series}, modality: mri}}]"))
    # one 4D series: 15 slices x 10 time points -> one pool image per time point
    assert len(data.pool) == 10 and {r["frame"] for r in data.pool} == set(range(10))
    assert data.pool_info["sources"][0]["preset"] == "mri_percentile"


def test_test_split_never_in_pretraining(tmp_path):
    cfg = _cfg(tmp_path)
    data = prepare_data(cfg)
    pool_dir = tmp_path / "pool"
    for r in data.split("test") + data.split("train")[:2]:
        dst = pool_dir / ("copy_" + Path(r["image"]).name)
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(r["image"], dst)
    _pngs(pool_dir, 3)
    for extra in ([], ["data.pretrain_on_labelled=false"]):
        data = prepare_data(_pool_cfg(tmp_path, f"[{pool_dir}]", *extra))
        test_hashes = {_sha(r["image"]) for r in data.split("test")}
        pre = data.pretrain_records()
        assert not {r["image"] for r in pre} & {r["image"] for r in data.split("test")}
        assert not {_sha(r["image"]) for r in pre} & test_hashes
        assert data.pool_info["dropped"]["test"] == len(data.split("test"))
        assert len(data.pool) == 3 + 2  # new images and train copies stay


def test_duplicates_of_val_and_test_dropped_and_counted(tmp_path, capsys):
    data = prepare_data(_cfg(tmp_path))
    val, test = data.split("val"), data.split("test")
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    for i, r in enumerate(val[:2] + test[:3]):
        shutil.copyfile(r["image"], pool_dir / f"anon_{i}.png")  # byte-identical, renamed
    _pngs(pool_dir, 4)
    capsys.readouterr()
    data = prepare_data(_pool_cfg(tmp_path, f"[{pool_dir}]"))
    d = data.pool_info["dropped"]
    assert (d["val"], d["test"]) == (2, 3)
    assert len(data.pool) == 4
    src = data.pool_info["sources"][0]
    assert (src["found"], src["dropped_val"], src["dropped_test"], src["images"]) == (9, 2, 3, 4)
    out = capsys.readouterr().out
    assert "dropped 2 duplicate(s) of val and 3 of test" in out


def test_patient_id_overlap_dropped(tmp_path):
    data = prepare_data(_cfg(tmp_path))
    test_pid = data.split("test")[0]["patient_id"]
    val_pid = data.split("val")[0]["patient_id"]
    files = _pngs(tmp_path / "new", 4)  # new pixels: only the patient id can tell
    pids = [test_pid, val_pid, "X1", "X2"]
    (tmp_path / "pool.csv").write_text("image,patient_id\n" + "".join(f"{f},{p}\n" for f, p in zip(files, pids)))
    data = prepare_data(_pool_cfg(tmp_path, f"[{tmp_path / 'pool.csv'}]"))
    d = data.pool_info["dropped"]
    assert (d["id_test"], d["id_val"], d["val"], d["test"]) == (1, 1, 0, 0)
    assert sorted(r["patient_id"] for r in data.pool) == ["X1", "X2"]
    # a folder source has no patient ids: file names are never taken for them
    (tmp_path / "f").mkdir()
    shutil.copy(files[0], tmp_path / "f" / f"{test_pid}.png")
    data = prepare_data(_pool_cfg(tmp_path, f"[{tmp_path / 'f'}]"))
    assert len(data.pool) == 1 and data.pool_info["dropped"]["id_test"] == 0


def test_per_source_preset_applied(tmp_path):
    pool_dir = tmp_path / "xr"
    # a low-contrast X-ray-like image: percentile scaling ("xray") and /255 ("uint8") differ clearly
    write_png(pool_dir / "a.png", (60 + 40 * RNG.random((30, 30))).astype(np.uint8))
    cfg = _pool_cfg(tmp_path, f"[{{path: {pool_dir}, preset: xray}}]")
    data = prepare_data(cfg)
    assert data.preset == "uint8" and data.pool_info["sources"][0]["preset"] == "xray"
    pre = data.pretrain_records()
    items = materialize(pre, cfg.data, data.preset)
    assert len(items) == len(pre)
    pool_item = items[-1]  # groups keep first-seen order: labelled (uint8) first, then the pool
    chain = deterministic_transforms(cfg.data, "xray", False)
    direct = chain({"image": str(pool_dir / "a.png")})
    assert torch.equal(pool_item["image"], direct["image"])
    monai = chain.reference({"image": str(pool_dir / "a.png")})  # the MONAI chain itself
    assert torch.allclose(pool_item["image"], monai["image"], atol=1e-6)
    default = deterministic_transforms(cfg.data, "uint8", False)({"image": str(pool_dir / "a.png")})
    assert not torch.allclose(pool_item["image"], default["image"], atol=0.05)
    # the labelled images keep the data's preset
    lab = deterministic_transforms(cfg.data, "uint8", False)({"image": pre[0]["image"]})
    assert torch.equal(items[0]["image"], lab["image"])
    # also without a cache (items re-read lazily)
    lazy = materialize(pre, cfg.data.model_copy(update={"cache": "none"}), data.preset)
    assert len(lazy) == len(pre) and torch.equal(lazy[len(pre) - 1]["image"], direct["image"])


def test_fraction_is_nested_and_seeded(tmp_path):
    _pngs(tmp_path / "p", 20)
    pools = {}
    for f in (0.1, 0.3, 1.0):
        data = prepare_data(_pool_cfg(tmp_path, f"[{{path: {tmp_path / 'p'}, fraction: {f}}}]"))
        pools[f] = {r["image"] for r in data.pool}
    assert [len(pools[f]) for f in (0.1, 0.3, 1.0)] == [2, 6, 20]
    assert pools[0.1] <= pools[0.3] <= pools[1.0]


def test_phantom_pool_is_disjoint_and_unlabelled(tmp_path):
    spec = PhantomSpec(n_patients=8, images_per_patient=2, size_2d=32, seed=11)
    lab = read_manifest(generate(tmp_path, 2, spec))
    pool = read_manifest(generate_pool(tmp_path, 2, spec, n_patients=10, seed=12))
    assert len(pool) == 20 and all(r["label"] is None and not r.get("mask") for r in pool)
    assert not {r["patient_id"] for r in pool} & {r["patient_id"] for r in lab}
    assert not {_sha(r["image"]) for r in pool} & {_sha(r["image"]) for r in lab}
    with pytest.raises(ValueError, match="pool_seed"):
        generate_pool(tmp_path, 2, spec, n_patients=10, seed=11)
    # through prepare_data: generated beside the labelled set, nothing dropped
    data = prepare_data(_cfg(tmp_path, "data.phantoms.pool_patients=10"))
    assert len(data.pool) == 10 and data.pool_info["sources"][0]["patients"] == 10
    assert data.pool_info["dropped"] == {"val": 0, "test": 0, "id_val": 0, "id_test": 0, "in_pool": 0}


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.unlabelled\.0\.preset.*unknown preset 'ct_lungs'"):
        _pool_cfg(tmp_path, f"[{{path: {tmp_path}, preset: ct_lungs}}]")
    with pytest.raises(ConfigError, match=r"data\.unlabelled\.0\.path"):
        _pool_cfg(tmp_path, "[{kind: npz}]")
    with pytest.raises(ConfigError, match="pretrain_on_labelled"):
        _cfg(tmp_path, "data.pretrain_on_labelled=false")
    with pytest.raises(DataError, match="not found"):
        prepare_data(_pool_cfg(tmp_path, f"[{tmp_path / 'missing'}]"))


def test_external_npz_pool_pneumonia(tmp_path):
    require_shared("pneumoniamnist", "pneumoniamnist_28.npz")
    cfg = load_config("pneumonia_pool", [f"data.unlabelled=[{{path: {NPZ}, keys: [train_images, val_images], "
                                         "fraction: 0.1}]"])
    data = prepare_data(cfg)
    info = data.pool_info
    assert info["labelled_images"] == 0 and info["sources"][0]["sampled"] == 524
    # val images in the pool are dropped by content hash; an independent count with numpy:
    with np.load(NPZ) as z:
        val = {hashlib.sha256(v.tobytes()).digest() for v in z["val_images"]}
    assert info["dropped"]["val"] >= 1
    pre = data.pretrain_records()
    assert len(pre) == info["images"] and not any(str(r["image"]).split("#")[1].startswith("test") for r in pre)
    from medmim.data.readers import npz_entry

    assert not any(hashlib.sha256(npz_entry(r["image"]).tobytes()).digest() in val for r in pre)
    assert record_hash(pre[0]) == content_hash(npz_entry(pre[0]["image"]))


def test_study_records_the_pool(tmp_path):
    """The study's data card and report state what pretraining saw, beside the labelled fractions."""
    import json

    from conftest import TINY
    from medmim.data.card import render_markdown
    from pipelines.label_efficiency import run_study

    cfg = load_config(None, TINY + [f"run.out_dir={tmp_path}", "run.name=s", "run.num_threads=1",
                                    f"data.phantoms.out_dir={tmp_path / 'ph'}", "data.phantoms.pool_patients=30",
                                    "pretrain.epochs=1", "finetune.epochs=1", "study.fractions=[0.5, 1.0]",
                                    "study.inits=[mae, scratch]"])
    rows = run_study(cfg, log=lambda m: None, progress=False)
    assert all(r["status"] == "ok" for r in rows)
    card = json.loads((tmp_path / "s" / "data_card.json").read_text())
    pool = card["pretraining_pool"]
    n_lab = card["splits"]["train"]["images"] + card["splits"]["val"]["images"]
    assert pool["images"] == 60 and pool["labelled_images"] == n_lab and pool["pretraining_images"] == n_lab + 60
    assert "## Pretraining pool" in render_markdown(card) and "| phantom pool (seed 4321) |" in render_markdown(card)
    html = (tmp_path / "s" / "report" / "index.html").read_text()
    assert f"Pretraining saw <b>{n_lab + 60}</b> images" in html and "<b>60</b> unlabelled" in html
    n_half = next(r["n_labelled"] for r in rows if r["fraction"] == 0.5)
    assert f"0.5 = {n_half}" in html
    env = json.loads((tmp_path / "s" / "environment.json").read_text())
    assert "pretraining_pool" in json.dumps(env)
