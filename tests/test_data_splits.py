"""Patient-level splits, split files, leakage check, test images kept out of pretraining, and
nested stratified label fractions."""

import json
from collections import Counter

import pytest

from medmim.config import load_config
from medmim.data.dataset import DataBundle, prepare_data
from medmim.data.splits import (check_leakage, label_fraction, load_split_file, patient_split,
                                save_split_file)
from medmim.errors import DataError


def _records(n_patients=100, per_patient=3, pos_every=4):
    return [{"image": f"/x/p{p}_{i}.png", "patient_id": f"p{p}", "label": int(p % pos_every == 0), "split": ""}
            for p in range(n_patients) for i in range(per_patient)]


def test_patient_split_grouped_and_stratified():
    recs = _records()
    patient_split(recs, 0.2, 0.2, seed=3)
    check_leakage(recs)
    by_patient = {}
    for r in recs:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    counts = Counter((r["split"], r["label"]) for r in recs if r["image"].endswith("_0.png"))
    # 25 positive and 75 negative patients, each split 20/20/60 % per class
    assert counts[("test", 1)] == 5 and counts[("val", 1)] == 5 and counts[("train", 1)] == 15
    assert counts[("test", 0)] == 15 and counts[("train", 0)] == 45
    again = _records()
    patient_split(again, 0.2, 0.2, seed=3)
    assert [r["split"] for r in again] == [r["split"] for r in recs]


def test_existing_split_kept_and_patient_follows_it():
    recs = _records(10, 2)
    recs[0]["split"] = "test"  # p0 image 0 comes with a split; its other image must follow
    patient_split(recs, 0.2, 0.2, seed=0)
    assert recs[1]["split"] == "test"
    check_leakage(recs)


def test_leakage_check_fails_loudly():
    recs = _records(4, 2)
    for r in recs:
        r["split"] = "train"
    check_leakage(recs)
    recs[1]["split"] = "test"
    with pytest.raises(DataError, match="patient-level leakage: 1 patient"):
        check_leakage(recs)
    recs = [{"image": "/x/a.png", "patient_id": "a", "split": "train"},
            {"image": "/x/a.png", "patient_id": "b", "split": "test"}]
    with pytest.raises(DataError, match="image file"):
        check_leakage(recs)


def test_split_file_written_and_reused(tmp_path):
    split_file = tmp_path / "splits.json"
    over = [f"data.phantoms.out_dir={tmp_path}", "data.phantoms.n_patients=20", f"data.split_file={split_file}"]
    b1 = prepare_data(load_config(None, over))
    mapping = load_split_file(split_file)
    assert len(mapping) == 20
    # another seed would give another split; the file wins
    b2 = prepare_data(load_config(None, over + ["run.seed=99"]))
    for s in ("train", "val", "test"):
        assert [r["image"] for r in b1.split(s)] == [r["image"] for r in b2.split(s)]
    # a hand-edited file is honoured
    data = json.loads(split_file.read_text())
    pid = next(p for p, s in data["patients"].items() if s == "train")
    data["patients"][pid] = "test"
    split_file.write_text(json.dumps(data))
    b3 = prepare_data(load_config(None, over))
    assert all(r["split"] == "test" for s in b3.records.values() for r in s if r["patient_id"] == pid)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"patients": {"P0000": "holdout"}}))
    with pytest.raises(DataError, match="unknown split"):
        load_split_file(bad)
    save_split_file([{"patient_id": "a", "split": "train"}], tmp_path / "s2.json", seed=1)
    assert load_split_file(tmp_path / "s2.json") == {"a": "train"}


def test_test_images_never_reach_pretraining_unless_asked():
    recs = {"train": [{"image": "t1"}], "val": [{"image": "v1"}], "test": [{"image": "x1"}, {"image": "x2"}]}
    b = DataBundle(records=recs, spatial_dims=2, preset="uint8", fingerprint="f", source="s", num_classes=2)
    assert [r["image"] for r in b.pretrain_records()] == ["t1", "v1"]
    assert [r["image"] for r in b.pretrain_records(include_test=False)] == ["t1", "v1"]
    assert [r["image"] for r in b.pretrain_records(include_test=True)] == ["t1", "v1", "x1", "x2"]
    assert load_config(None).data.pretrain_on_test is False  # the default keeps test out


@pytest.mark.parametrize("per_patient", [1, 3])
def test_label_fractions_nested_stratified_seeded(per_patient):
    recs = _records(400, per_patient, pos_every=10)  # 40 positive, 360 negative patients
    fracs = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
    subsets = [label_fraction(recs, f, seed=7) for f in fracs]
    ids = [{r["image"] for r in s} for s in subsets]
    for small, big in zip(ids, ids[1:]):
        assert small <= big  # 1% ⊂ 5% ⊂ 10% ⊂ ...
    assert ids[-1] == {r["image"] for r in recs}
    for f, s in zip(fracs, subsets):
        c = Counter(r["label"] for r in s)
        assert c[1] >= 1 and c[0] >= 1  # at least one per class
        n_pos, n_neg = 40 * per_patient, 360 * per_patient
        assert c[1] >= f * n_pos - 1e-9 and c[1] < f * n_pos + per_patient  # stratified
        assert c[0] >= f * n_neg - 1e-9 and c[0] < f * n_neg + per_patient
        patients = Counter(r["patient_id"] for r in s)
        assert set(patients.values()) == {per_patient}  # whole patients only
    assert label_fraction(recs, 0.1, seed=7) == subsets[2]  # fixed by seed
    assert {r["image"] for r in label_fraction(recs, 0.1, seed=8)} != ids[2]
    with pytest.raises(DataError):
        label_fraction(recs, 0.0, seed=0)


def test_label_fraction_tiny_class_and_multilabel():
    recs = [{"image": str(i), "patient_id": str(i), "label": 0} for i in range(200)]
    recs.append({"image": "rare", "patient_id": "rare", "label": 1})
    s = label_fraction(recs, 0.01, seed=0)
    assert Counter(r["label"] for r in s) == {0: 2, 1: 1}
    ml = [{"image": str(i), "patient_id": str(i), "label": [i % 2, (i // 2) % 2]} for i in range(40)]
    s = label_fraction(ml, 0.1, seed=0)
    assert {tuple(r["label"]) for r in s} == {(0, 0), (0, 1), (1, 0), (1, 1)}
