"""Bring your own data: folder trees with split folders, explicit splits honoured, class names kept,
num_classes inferred, byte-identical images across splits, label checks, odd file names."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmim.cli import main
from medmim.config import load_config
from medmim.data.builders import from_folder, parse_split_dirs
from medmim.data.dataset import materialize, prepare_data
from medmim.data.manifest import read_manifest, write_manifest
from medmim.data.splits import cross_split_duplicates, handle_duplicates, patient_split
from medmim.errors import DataError

RNG = np.random.default_rng(0)


def _img(path: Path, h=20, w=24, seed=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed) if seed is not None else RNG
    Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(path)
    return path


def _tree(root: Path, splits=("Training", "Testing"), classes=("glioma", "meningioma", "no_tumor"), n=4):
    for s in splits:
        for c in classes:
            for i in range(n):
                _img(root / s / c / f"{i}.png")  # same stems in every class and split, like real exports
    return root


# ---- folder trees ------------------------------------------------------------------------------

def test_split_folders_detected_and_classes_kept(tmp_path):
    _tree(tmp_path)
    rows = from_folder(tmp_path)
    assert len(rows) == 24
    assert {r["split"] for r in rows} == {"train", "test"}
    # classes are the sub-folders below the split folders, named, in sorted order -- not "Training"
    assert {(r["label"], r["label_name"]) for r in rows} == {(0, "glioma"), (1, "meningioma"), (2, "no_tumor")}
    # same file name in two classes / splits = different patients (no false leakage)
    assert len({r["patient_id"] for r in rows}) == 24
    for r in rows:
        assert Path(r["image"]).parent.name == r["label_name"]
        assert Path(r["image"]).parent.parent.name == {"train": "Training", "test": "Testing"}[r["split"]]


def test_split_dirs_mapping_and_none(tmp_path):
    _tree(tmp_path, splits=("A_tr", "B_ts"), classes=("x", "y"), n=2)
    assert parse_split_dirs("A_tr=train, B_ts=test") == {"A_tr": "train", "B_ts": "test"}
    rows = from_folder(tmp_path, split_dirs=parse_split_dirs("A_tr=train,B_ts=test"))
    assert {r["split"] for r in rows} == {"train", "test"} and {r["label_name"] for r in rows} == {"x", "y"}
    # not mapped: the top-level folders are the classes (the old behaviour)
    rows = from_folder(tmp_path)
    assert {r["label_name"] for r in rows} == {"A_tr", "B_ts"} and {r["split"] for r in rows} == {""}
    with pytest.raises(DataError, match="should look like FOLDER=train"):
        parse_split_dirs("A_tr=training")
    with pytest.raises(DataError, match="split folder not found"):
        from_folder(tmp_path, split_dirs={"Nope": "train"})
    # detected split names can be switched off
    _tree(tmp_path / "t2", splits=("train", "test"), classes=("a", "b"), n=1)
    assert {r["label_name"] for r in from_folder(tmp_path / "t2", split_dirs=parse_split_dirs("none"))} == \
        {"train", "test"}


def test_cli_manifest_from_split_tree(tmp_path, capsys):
    _tree(tmp_path / "data")
    out = tmp_path / "m.csv"
    assert main(["data", "manifest", "--from", "folder", str(tmp_path / "data"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train 12, test 12" in text and "0=glioma" in text
    rows = read_manifest(out)
    assert {r["split"] for r in rows} == {"train", "test"}
    # an existing manifest is never overwritten without --force
    assert main(["data", "manifest", "--from", "folder", str(tmp_path / "data"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --force" in err
    assert main(["data", "manifest", "--from", "folder", str(tmp_path / "data"), "--out", str(out), "--force"]) == 0


# ---- explicit splits ---------------------------------------------------------------------------

def _recs(n, split=""):
    return [{"image": f"/x/{split or 'u'}{i}.png", "patient_id": f"{split or 'u'}{i}", "label": i % 2,
             "split": split} for i in range(n)]


def test_rows_without_split_never_go_to_test_when_source_names_one():
    recs = _recs(100) + _recs(20, "test")
    patient_split(recs, 0.15, 0.2, seed=0)
    unsplit = recs[:100]
    assert {r["split"] for r in unsplit} == {"train", "val"}
    assert sum(r["split"] == "val" for r in unsplit) == 16  # 15% of 50 per class, rounded: 8 + 8
    assert all(r["split"] == "test" for r in recs[100:])
    # no split named anywhere: the usual three-way patient split
    recs = _recs(100)
    patient_split(recs, 0.15, 0.2, seed=0)
    assert {r["split"] for r in recs} == {"train", "val", "test"}


def test_val_carved_from_named_train_and_val_kept():
    recs = _recs(40, "train") + _recs(10, "test")
    patient_split(recs, 0.25, 0.2, seed=0)
    assert sum(r["split"] == "val" for r in recs) == 10 and sum(r["split"] == "test" for r in recs) == 10
    recs = _recs(40, "train") + _recs(6, "val") + _recs(10, "test") + _recs(8)
    patient_split(recs, 0.25, 0.2, seed=0)
    assert [r["split"] for r in recs[:40]] == ["train"] * 40  # a named val split: train untouched
    assert {r["split"] for r in recs[-8:]} == {"train"}  # unsplit rows: train only (val named, test named)


def test_split_file_with_carved_val_is_stable(tmp_path):
    _tree(tmp_path / "d", classes=("a", "b"), n=10)
    write_manifest(from_folder(tmp_path / "d"), tmp_path / "m.csv", relative_to=tmp_path)
    ov = ["data.source=manifest", f"data.path={tmp_path / 'm.csv'}", f"data.split_file={tmp_path / 'split.json'}",
          "data.val_fraction=0.2"]
    first = prepare_data(load_config(None, ov))
    again = prepare_data(load_config(None, ov))
    for s in ("train", "val", "test"):
        assert sorted(r["image"] for r in first.split(s)) == sorted(r["image"] for r in again.split(s))
    assert len(first.split("val")) == 4 and len(first.split("test")) == 20
    assert all("Testing" in r["image"] for r in first.split("test"))


# ---- byte-identical images across splits -------------------------------------------------------

def test_duplicates_across_splits_dropped_from_evaluation_split(tmp_path):
    _tree(tmp_path / "d", classes=("a", "b"), n=6)
    src = tmp_path / "d" / "Training" / "a" / "0.png"
    shutil.copyfile(src, tmp_path / "d" / "Testing" / "b" / "copy.png")
    shutil.copyfile(tmp_path / "d" / "Training" / "b" / "1.png", tmp_path / "d" / "Training" / "b" / "dup.png")
    rows = from_folder(tmp_path / "d")
    # independent reference: sha1 of the bytes of every file, grouped
    by_sha: dict[str, set] = {}
    for r in rows:
        by_sha.setdefault(hashlib.sha1(Path(r["image"]).read_bytes()).hexdigest(), set()).add(r["split"])
    expected = sum(len(s) > 1 for s in by_sha.values())
    groups = cross_split_duplicates(rows)
    assert len(groups) == expected == 1
    kept, dropped = handle_duplicates(rows, "drop")
    assert len(dropped) == 1 and dropped[0]["file"].endswith("copy.png") and "train" in dropped[0]["reason"]
    assert len(kept) == len(rows) - 1
    assert any(r["image"].endswith("dup.png") for r in kept)  # duplicates inside one split are not leakage
    with pytest.raises(DataError, match="byte-identical"):
        handle_duplicates(rows, "error")
    assert handle_duplicates(rows, "ignore")[1] == []


def test_duplicates_in_prepare_data_card_and_npz_arrays(tmp_path):
    _tree(tmp_path / "d", classes=("a", "b"), n=6)
    shutil.copyfile(tmp_path / "d" / "Training" / "a" / "0.png", tmp_path / "d" / "Testing" / "a" / "c.png")
    write_manifest(from_folder(tmp_path / "d"), tmp_path / "m.csv", relative_to=tmp_path)
    bundle = prepare_data(load_config(None, ["data.source=manifest", f"data.path={tmp_path / 'm.csv'}"]))
    assert len(bundle.duplicates) == 1 and not any(r["image"].endswith("c.png") for r in bundle.split("test"))
    assert main(["data", "card", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "card")]) == 0
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["duplicates_across_splits"]["groups"] == 1
    assert "byte-identical" in (tmp_path / "card.md").read_text()
    # in-memory arrays (MedMNIST npz): found, but kept under auto; dropped when asked
    a = np.arange(16, dtype=np.uint8).reshape(4, 4)
    recs = [{"image": a.copy(), "split": "train", "patient_id": "1"},
            {"image": a.copy(), "split": "test", "patient_id": "2"},
            {"image": a.T.copy(), "split": "test", "patient_id": "3"}]
    assert len(cross_split_duplicates(recs)) == 1
    assert len(handle_duplicates(recs, "auto")[0]) == 3
    assert len(handle_duplicates(recs, "drop")[0]) == 2


# ---- labels ------------------------------------------------------------------------------------

def _manifest(tmp_path, rows, name="m.csv"):
    for r in rows:
        if not Path(r["image"]).exists():
            _img(Path(r["image"]))
    path = tmp_path / name
    write_manifest(rows, path)
    return path


def _labelled(tmp_path, n=12, label=lambda i: i % 2, split=lambda i: ""):
    return [{"image": str(tmp_path / "img" / f"{i}.png"), "label": label(i), "split": split(i),
             "patient_id": f"p{i}"} for i in range(n)]


def test_num_classes_and_class_names_inferred(tmp_path):
    _tree(tmp_path / "d", n=3)
    write_manifest(from_folder(tmp_path / "d"), tmp_path / "m.csv", relative_to=tmp_path)
    cfg = load_config(None, ["data.source=manifest", f"data.path={tmp_path / 'm.csv'}"])
    assert cfg.data.num_classes is None
    bundle = prepare_data(cfg)
    assert cfg.data.num_classes == 3 == bundle.num_classes
    assert cfg.data.class_names == ["glioma", "meningioma", "no_tumor"]
    from medmim.data.labels import class_names
    assert class_names(cfg) == ["glioma", "meningioma", "no_tumor"]


@pytest.mark.parametrize("label,msg", [(7, "label 7 is out of range; expected 0..1"), ("abc", "is not a number"),
                                       (-1, "out of range"), (1.5, "not a class index")])
def test_bad_label_is_one_line_naming_the_row(tmp_path, label, msg):
    rows = _labelled(tmp_path)
    rows[5]["label"] = label
    path = _manifest(tmp_path, rows)
    with pytest.raises(DataError, match=msg) as e:
        prepare_data(load_config(None, ["data.source=manifest", f"data.path={path}", "data.num_classes=2"]))
    assert "m.csv row 7" in str(e.value) and "5.png" in str(e.value)


def _finetune(tmp_path, path, *extra):
    return main(["finetune", "data.source=manifest", f"data.path={path}", f"run.out_dir={tmp_path / 'runs'}",
                 "run.name=t", "finetune.epochs=1", "data.image_size=16", "encoder.embed_dim=16", "encoder.depth=1",
                 "encoder.num_heads=2", "finetune.bootstrap=0", "run.num_threads=1", "--init", "scratch", *extra])


@pytest.mark.parametrize("case,msg", [
    ("one_class", "labelled training set (finetune.label_fraction=1) holds one class only ('0'"),
    ("val_one_class", "validation split (model selection by AUROC) holds one class only ('1'"),
    ("missing_one", "no label (train split)"),
    ("no_label_column", "no labels"),
])
def test_label_problems_stop_before_training(tmp_path, capsys, case, msg):
    split = lambda i: "train" if i < 24 else "val" if i < 30 else "test"  # noqa: E731
    rows = _labelled(tmp_path, 40, split=split)
    if case == "one_class":
        for r in rows[:24]:
            r["label"] = 0
    elif case == "val_one_class":
        for r in rows[24:30]:
            r["label"] = 1
    elif case == "missing_one":
        rows[3]["label"] = ""
    elif case == "no_label_column":
        for r in rows:
            del r["label"]
    path = _manifest(tmp_path, rows)
    assert _finetune(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err, err
    assert not list((tmp_path / "runs").rglob("*.pt"))  # nothing trained, no checkpoint
    if case == "missing_one":
        assert "m.csv row 5" in err and "3.png" in err


# ---- odd file names ----------------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="raw-byte file names are a POSIX thing")
def test_non_utf8_and_odd_names_end_to_end(tmp_path, capsys):
    root = tmp_path / "d"
    _tree(root, classes=("a", "b"), n=4)
    raw = os.path.join(os.fsencode(root / "Training" / "a"), b"r\xe9sum\xe9 1.png")
    os.rename(root / "Training" / "a" / "0.png", raw)
    (root / "Training" / "b" / "1.png").rename(root / "Training" / "b" / "Röntgen, \"x\" 1.png")
    out = tmp_path / "m.csv"
    assert main(["data", "manifest", "--from", "folder", str(root), "--out", str(out)]) == 0
    assert b"r\xe9sum\xe9 1.png" in out.read_bytes()  # the file's own bytes, not a replacement
    rows = read_manifest(out)
    assert all(Path(r["image"]).exists() for r in rows) and len(rows) == 16
    cfg = load_config(None, ["data.source=manifest", f"data.path={out}", "data.image_size=16"])
    bundle = prepare_data(cfg)
    items = materialize([r for s in ("train", "val", "test") for r in bundle.split(s)], cfg.data, bundle.preset)
    assert len(items) == 16
    jsonl = tmp_path / "m.jsonl"
    write_manifest(rows, jsonl)
    assert sorted(r["image"] for r in read_manifest(jsonl)) == sorted(r["image"] for r in rows)


def test_unlabelled_named_test_rows_do_not_fix_the_test_set():
    """Decathlon imagesTs rows (split 'test', no label, no mask) leave the labelled pairs a three-way split."""
    pairs = [{"image": f"/x/{i}.nii.gz", "mask": f"/x/{i}_seg.nii.gz", "label": "", "patient_id": f"p{i}", "split": ""}
             for i in range(40)]
    hidden = [{"image": f"/x/ts{i}.nii.gz", "mask": "", "label": "", "patient_id": f"t{i}", "split": "test"}
              for i in range(5)]
    patient_split(pairs + hidden, 0.2, 0.2, seed=0)
    assert {r["split"] for r in pairs} == {"train", "val", "test"}


def test_split_folders_of_unlabelled_images(tmp_path):
    for s in ("train", "test"):
        for i in range(2):
            _img(tmp_path / s / f"{i}.png")
    rows = from_folder(tmp_path)
    assert len(rows) == 4 and {r["split"] for r in rows} == {"train", "test"} and {r["label"] for r in rows} == {""}
