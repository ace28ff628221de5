"""Cross-validation: patient-grouped stratified folds (against scikit-learn's StratifiedGroupKFold),
folds written once into the split file and stable when patients are added, ``--fold`` picking the
validation patients, sources with their own val split, folds × seeds studies, and the paired
Wilcoxon test over matched (fold, seed) cells (against scipy and exact small-sample values)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medmim.cli import _cfg, build_parser, parse_args
from medmim.config import load_config
from medmim.data.dataset import prepare_data, select_fold
from medmim.data.manifest import write_manifest
from medmim.data.splits import assign_folds, check_leakage, handle_duplicates, label_fraction, load_fold_file
from medmim.errors import ConfigError, DataError
from medmim.eval.report import MIN_PAIRS, add_paired, paired_test
from pipelines import label_efficiency as le


# ---- fold assignment against scikit-learn ----------------------------------------------------------
def _records(n_patients: int, seed: int, pos_rate: float = 0.3, max_images: int = 4) -> list[dict]:
    """Patients with 1..max_images images; a patient's images mostly share its label."""
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n_patients):
        base = int(rng.random() < pos_rate)
        for i in range(int(rng.integers(1, max_images + 1))):
            label = base if rng.random() < 0.9 else 1 - base
            recs.append({"image": f"/x/p{p}_{i}.png", "patient_id": f"p{p}", "label": label, "split": "train"})
    return recs


def _fold_stats(labels: np.ndarray, fold: np.ndarray, k: int) -> tuple[float, float]:
    """(largest deviation of a fold's positive share from the overall share, largest relative
    deviation of a fold's size from n/k)."""
    overall = labels.mean()
    share = max(abs(labels[fold == f].mean() - overall) for f in range(k))
    size = max(abs((fold == f).sum() - len(labels) / k) / (len(labels) / k) for f in range(k))
    return float(share), float(size)


@pytest.mark.parametrize("k", [3, 5])
def test_folds_grouped_and_as_stratified_as_sklearn(k):
    from sklearn.model_selection import StratifiedGroupKFold

    ours_share, sk_share, ours_size, sk_size = [], [], [], []
    for seed in range(8):
        recs = _records(80, seed)
        mapping = assign_folds(recs, k, seed=seed)
        # every patient in exactly one fold; every image carries its patient's fold
        assert set(mapping) == {r["patient_id"] for r in recs} and set(mapping.values()) == set(range(k))
        assert all(r["fold"] == mapping[r["patient_id"]] for r in recs)
        check_leakage(recs)  # one split, and no patient in two folds
        y = np.array([r["label"] for r in recs])
        fold = np.array([r["fold"] for r in recs])
        s, z = _fold_stats(y, fold, k)
        ours_share.append(s)
        ours_size.append(z)
        groups = [r["patient_id"] for r in recs]
        sk_fold = np.empty(len(recs), int)
        for f, (_tr, te) in enumerate(StratifiedGroupKFold(k, shuffle=True, random_state=seed)
                                      .split(np.zeros(len(recs)), y, groups)):
            sk_fold[te] = f
        s, z = _fold_stats(y, sk_fold, k)
        sk_share.append(s)
        sk_size.append(z)
    # stated tolerance: the positive share of every fold within 0.01 of scikit-learn's typical
    # (median and worst) deviation, and fold sizes within 5 points of its relative size deviation
    assert np.median(ours_share) <= np.median(sk_share) + 0.01, (ours_share, sk_share)
    assert max(ours_share) <= max(sk_share) + 0.01
    assert np.median(ours_size) <= np.median(sk_size) + 0.05, (ours_size, sk_size)
    # and genuinely stratified: a random patient-grouped assignment is much worse
    rng = np.random.default_rng(0)
    rand = []
    for seed in range(8):
        recs = _records(80, seed)
        pf = {p: int(rng.integers(k)) for p in {r["patient_id"] for r in recs}}
        rand.append(_fold_stats(np.array([r["label"] for r in recs]),
                                np.array([pf[r["patient_id"]] for r in recs]), k)[0])
    assert np.median(ours_share) < np.median(rand) / 2


def test_assign_folds_refuses_too_few_patients_and_keeps_known():
    recs = _records(4, 0)
    with pytest.raises(DataError, match="data.folds=5 needs at least 5 patients"):
        assign_folds(recs, 5, seed=0)
    recs = _records(30, 1)
    first = assign_folds(recs, 3, seed=0)
    again = assign_folds([dict(r) for r in recs], 3, seed=99, known=first)  # another seed: known folds win
    assert again == first
    bad = [dict(r) for r in recs]
    bad[0]["fold"], bad[1]["fold"] = 0, 1
    bad[1]["patient_id"] = bad[0]["patient_id"]
    with pytest.raises(DataError, match="more than one cross-validation fold"):
        check_leakage(bad)


# ---- folds through prepare_data, the split file and --fold ----------------------------------------
def _img(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
    return str(path)


def _manifest(tmp: Path, n_patients: int, *, start: int = 0, split=lambda p: "", name="m.csv", old=()) -> Path:
    rows = list(old)
    for p in range(start, start + n_patients):
        for i in range(1 + p % 3):
            rows.append({"image": _img(tmp / "img" / f"p{p}_{i}.png", seed=1000 * p + i), "patient_id": f"p{p}",
                         "label": int(p % 4 == 0), "split": split(p)})
    write_manifest(rows, tmp / name)
    return tmp / name


def _ov(tmp: Path, manifest: Path, *extra: str) -> list[str]:
    return ["data.source=manifest", f"data.path={manifest}", f"data.split_file={tmp / 'split.json'}",
            "data.folds=4", "data.test_fraction=0.2", *extra]


def _patients(records) -> set[str]:
    return {r["patient_id"] for r in records}


def test_folds_written_once_and_stable_when_patients_are_added(tmp_path):
    m = _manifest(tmp_path, 40)
    first = prepare_data(load_config(None, _ov(tmp_path, m)))
    k, folds1 = load_fold_file(tmp_path / "split.json")
    test1 = _patients(first.split("test"))
    assert k == 4 and set(folds1) == _patients(first.fold_records) and not set(folds1) & test1
    assert _patients(first.fold_records) | test1 == {f"p{p}" for p in range(40)}
    # another run seed would give other folds: the file wins
    again = prepare_data(load_config(None, _ov(tmp_path, m, "run.seed=7")))
    assert {r["patient_id"]: r["fold"] for r in again.fold_records} == folds1

    # 20 new patients: the old ones keep their split and fold, the new ones join the folds
    old_rows = [dict(r) for r in __import__("medmim.data.manifest", fromlist=["read_manifest"]).read_manifest(m)]
    m2 = _manifest(tmp_path, 20, start=40, name="m2.csv", old=[{k2: r[k2] for k2 in ("image", "patient_id", "label",
                                                                                      "split")} for r in old_rows])
    grown = prepare_data(load_config(None, _ov(tmp_path, m2)))
    k, folds2 = load_fold_file(tmp_path / "split.json")
    assert {p: folds2[p] for p in folds1} == folds1
    assert _patients(grown.split("test")) >= test1
    new = set(folds2) - set(folds1)
    assert new and new <= {f"p{p}" for p in range(40, 60)}
    # still balanced: per fold, positives and images within a patient's worth of an even share
    by_fold = defaultdict(list)
    for r in grown.fold_records:
        by_fold[r["fold"]].append(r)
    n_img = [len(v) for v in by_fold.values()]
    n_pos = [sum(r["label"] for r in v) for v in by_fold.values()]
    assert max(n_img) - min(n_img) <= 3 and max(n_pos) - min(n_pos) <= 3, (n_img, n_pos)

    # the file's K is kept: another data.folds is refused in one line
    with pytest.raises(DataError, match="holds 4 cross-validation folds but data.folds is 3"):
        prepare_data(load_config(None, _ov(tmp_path, m2) + ["data.folds=3"]))


def test_fold_option_picks_the_validation_patients(tmp_path):
    m = _manifest(tmp_path, 40)
    base = prepare_data(load_config(None, _ov(tmp_path, m)))
    fold_of = {r["patient_id"]: r["fold"] for r in base.fold_records}
    vals = []
    for i in range(4):
        args = parse_args(build_parser(), ["finetune", *_ov(tmp_path, m), "--fold", str(i)])
        cfg = _cfg(args)
        assert cfg.finetune.fold == i
        b = prepare_data(cfg)
        assert b.fold == i
        assert _patients(b.split("val")) == {p for p, f in fold_of.items() if f == i}
        assert _patients(b.split("train")) == {p for p, f in fold_of.items() if f != i}
        assert [r["image"] for r in b.split("test")] == [r["image"] for r in base.split("test")]
        # nested label fractions are drawn inside the fold's training patients
        small = label_fraction(b.split("train"), 0.3, seed=0)
        assert _patients(small) <= _patients(b.split("train")) and not _patients(small) & _patients(b.split("val"))
        assert {r["image"] for r in small} <= {r["image"] for r in label_fraction(b.split("train"), 0.6, seed=0)}
        vals.append(_patients(b.split("val")))
    assert set().union(*vals) == set(fold_of) and sum(map(len, vals)) == len(fold_of)  # a partition
    # views never share records: selecting fold 1 does not move fold 0's
    v0, v1 = select_fold(base, 0, load_config(None, _ov(tmp_path, m))), select_fold(base, 1, load_config(None, _ov(tmp_path, m)))
    assert _patients(v0.split("val")) == vals[0] and _patients(v1.split("val")) == vals[1]
    with pytest.raises(ConfigError, match="finetune.fold=4 needs data.folds > 4"):
        _cfg(parse_args(build_parser(), ["finetune", *_ov(tmp_path, m), "--fold", "4"]))
    with pytest.raises(ConfigError, match="data.folds must be 0"):
        load_config(None, ["data.folds=1"])
    from medmim.cli import main

    # finetune with folds but no --fold: one line, exit 2
    assert main(["finetune", *_ov(tmp_path, m), "run.num_threads=1", f"run.out_dir={tmp_path / 'runs'}"]) == 2


def test_source_with_its_own_val_split_folds_over_train_and_val(tmp_path):
    split = lambda p: "test" if p % 5 == 0 else "val" if p % 5 == 1 else "train"  # noqa: E731
    m = _manifest(tmp_path, 40, split=split)
    b = prepare_data(load_config(None, _ov(tmp_path, m)))
    named_test = {f"p{p}" for p in range(40) if p % 5 == 0}
    assert _patients(b.split("test")) == named_test  # the source's test kept as is
    assert _patients(b.fold_records) == {f"p{p}" for p in range(40)} - named_test  # folds over train + val
    v = select_fold(b, 2, load_config(None, _ov(tmp_path, m)))
    assert _patients(v.split("test")) == named_test
    # a second run with the written split file (source val vs file train) is accepted
    prepare_data(load_config(None, _ov(tmp_path, m, "finetune.fold=1")))


def test_byte_identical_images_in_two_folds_are_dropped(tmp_path):
    recs = _records(20, 3, max_images=1)
    for i, r in enumerate(recs):
        r["image"] = _img(tmp_path / f"{i}.png", seed=i)
    recs[1]["image"] = _img(tmp_path / "copy.png", seed=0)  # same bytes as patient 0's image
    assign_folds(recs, 4, seed=0)
    if recs[0]["fold"] == recs[1]["fold"]:
        recs[1]["fold"] = (recs[0]["fold"] + 1) % 4
    kept, dropped = handle_duplicates(recs, "drop", by_fold=False)
    assert not dropped  # one split: no cross-split copy
    kept, dropped = handle_duplicates(recs, "drop", by_fold=True)
    assert len(dropped) == 1 and "fold" in dropped[0]["reason"] and len(kept) == len(recs) - 1


# ---- paired tests over (fold, seed) ----------------------------------------------------------------
def _cv_rows(diffs, scratch, folds=3, seeds=2, init="mae") -> list[dict]:
    rows, i = [], 0
    for f in range(folds):
        for s in range(seeds):
            rows.append({"init": "scratch", "mode": "full", "fraction": 0.5, "seed": s, "fold": f, "status": "ok",
                         "test_auroc": scratch[i], "n_labelled": 10})
            rows.append({"init": init, "mode": "full", "fraction": 0.5, "seed": s, "fold": f, "status": "ok",
                         "test_auroc": scratch[i] + diffs[i], "n_labelled": 10})
            i += 1
    return rows


def test_paired_wilcoxon_matches_folds_and_seeds_against_scipy():
    from scipy.stats import wilcoxon

    scratch = [0.70, 0.62, 0.75, 0.66, 0.71, 0.69]
    diffs = [0.05, 0.01, 0.03, 0.06, 0.02, 0.04]  # all positive, distinct: exact p = 2 / 2**6
    rows = _cv_rows(diffs, scratch)
    t = paired_test(rows, "mae", "scratch", "full", 0.5, "auroc")
    assert t["n_pairs"] == 6 == MIN_PAIRS and t["folds"] == 3  # seeds 0/1 repeat in every fold: pairs are (fold, seed)
    assert t["mean_diff"] == pytest.approx(np.mean(diffs))
    assert t["p"] == pytest.approx(2 / 64) and t["p"] == pytest.approx(wilcoxon(diffs).pvalue)
    mixed = [0.05, -0.01, 0.03, -0.06, 0.02, 0.04]
    t = paired_test(_cv_rows(mixed, scratch), "mae", "scratch", "full", 0.5, "auroc")
    assert t["p"] == pytest.approx(wilcoxon(mixed).pvalue) and t["wins"] == 4 and t["losses"] == 2
    tied = [0.05, 0.0, 0.03, 0.0, 0.02, -0.01, 0.04]  # zero differences: left out of the test, as scipy does
    trows = _cv_rows(tied, scratch + [0.7], folds=7, seeds=1)
    t = paired_test(trows, "mae", "scratch", "full", 0.5, "auroc")
    assert t["ties"] == 2 and t["p"] == pytest.approx(wilcoxon(tied).pvalue)
    assert "n=7, 2 tied)" in le.format_table(add_paired(le.summarize_rows(trows, "auroc"), trows, "auroc"), "auroc")
    # pairing is by (fold, seed), not by seed: dropping fold 2's scratch cells leaves 4 pairs
    part = [r for r in rows if not (r["init"] == "scratch" and r["fold"] == 2)]
    assert paired_test(part, "mae", "scratch", "full", 0.5, "auroc")["n_pairs"] == 4

    summary = add_paired(le.summarize_rows(rows, "auroc"), rows, "auroc")
    by = {s["init"]: s for s in summary}
    assert by["mae"]["n_cells"] == 6 and by["mae"]["n_folds"] == 3 and by["mae"]["n_seeds"] == 2
    vals = np.array(scratch) + np.array(diffs)
    assert by["mae"]["auroc_mean"] == pytest.approx(vals.mean()) and by["mae"]["auroc_std"] == pytest.approx(vals.std(ddof=1))
    assert by["mae"]["p_wilcoxon"] == pytest.approx(2 / 64) and by["mae"]["vs_scratch"] == "scratch"
    assert by["scratch"]["p_wilcoxon"] is None and by["scratch"]["vs_scratch"] is None
    table = le.format_table(summary, "auroc")
    assert "cells (folds × seeds)" in table and "6 (3 × 2)" in table
    assert f"{np.mean(diffs):+.3f} (p = 0.031, n=6)" in table


# ---- a tiny cross-validated study ------------------------------------------------------------------
def test_tiny_cv_study_runs_folds_and_reports_wilcoxon(tmp_path):
    from scipy.stats import wilcoxon

    raw = {
        "run": {"name": "cv", "out_dir": str(tmp_path / "runs"), "seed": 0, "num_threads": 1},
        "data": {"source": "phantoms", "image_size": 16, "folds": 3, "split_file": str(tmp_path / "split.json"),
                 "phantoms": {"out_dir": str(tmp_path / "ph"), "n_patients": 30, "images_per_patient": 1,
                              "size_2d": 32, "pool_patients": 0}},
        "encoder": {"name": "vit_tiny", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
        "pretrain": {"epochs": 1, "batch_size": 16, "decoder_dim": 16, "decoder_depth": 1, "recon_every": 0},
        "finetune": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0, "bootstrap": 0},
        "study": {"inits": ["mae", "scratch"], "fractions": [1.0], "seeds": [0, 1], "modes": ["full"]},
    }
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    rows = le.run_study(cfg, log=lambda m: None, progress=False)
    out = tmp_path / "runs" / "cv"
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert sorted(r["cell"] for r in rows if r["init"] == "mae") == \
        sorted(f"mae-full-f1-s{s}-fold{f}" for s in (0, 1) for f in range(3))
    # each cell's own config records its fold; its val split is that fold's patients
    k, folds = load_fold_file(tmp_path / "split.json")
    cell = yaml.safe_load((out / "cells" / "scratch-full-f1-s1-fold2" / "config.yaml").read_text())
    assert cell["finetune"]["fold"] == 2 and k == 3
    v = prepare_data(load_config(out / "cells" / "scratch-full-f1-s1-fold2" / "config.yaml"))
    assert _patients(v.split("val")) == {p for p, f in folds.items() if f == 2}
    # the summary: one row per init, over 3 folds x 2 seeds, Wilcoxon p beside the difference
    summ = {s["init"]: s for s in json.loads((out / "summary.json").read_text())["groups"]}
    assert summ["mae"]["n_cells"] == 6 and summ["mae"]["n_folds"] == 3
    a = {(r["fold"], r["seed"]): r["test_auroc"] for r in rows if r["init"] == "mae"}
    b = {(r["fold"], r["seed"]): r["test_auroc"] for r in rows if r["init"] == "scratch"}
    d = [a[key] - b[key] for key in sorted(a)]
    assert summ["mae"]["delta_vs_scratch"] == pytest.approx(np.mean(d))
    want = 1.0 if not any(d) else wilcoxon(d).pvalue
    assert summ["mae"]["p_wilcoxon"] == pytest.approx(want)
    md = (out / "summary.md").read_text()
    assert "cells (folds × seeds)" in md and "n=6" in md and "6 (3 × 2)" in md
    html = (out / "report" / "index.html").read_text()
    assert "Δ vs scratch (Wilcoxon)" in html and "(fold, seed)" in html and 'id="folds"' in html
    card = json.loads((out / "data_card.json").read_text())
    assert set(card["splits"]) == {"cv folds", "test"}
    assert card["splits"]["cv folds"]["images"] == sum(f["images"] for f in card["cross_validation"]["per_fold"])
    assert [f["patients"] for f in card["cross_validation"]["per_fold"]] == \
        [sum(1 for f2 in folds.values() if f2 == f) for f in range(3)]
    # resumable: a rerun finds every cell done
    logs: list[str] = []
    again = le.run_study(cfg, log=logs.append, progress=False)
    assert sum("(done before)" in m for m in logs) == 12
    assert [r["test_auroc"] for r in again] == [r["test_auroc"] for r in rows]
    # study.folds (or --fold) runs a subset of the folds, reusing its finished cells
    logs.clear()
    sub = le.run_study(load_config(path, ["study.folds=[1]"]), log=logs.append, progress=False)
    assert {r["fold"] for r in sub} == {1} and sum("(done before)" in m for m in logs) == 4


def test_finetune_fold_cli_run_has_its_own_folder_and_evaluate_replays_its_fold(tmp_path):
    from medmim.cli import main
    from medmim.evaluate import evaluate_run

    ov = ["run.name=f", f"run.out_dir={tmp_path / 'runs'}", "run.num_threads=1", "data.folds=3",
          f"data.split_file={tmp_path / 'split.json'}", f"data.phantoms.out_dir={tmp_path / 'ph'}",
          "data.phantoms.n_patients=24", "data.phantoms.images_per_patient=1", "data.phantoms.size_2d=32",
          "data.image_size=16", "encoder.embed_dim=16", "encoder.depth=1", "encoder.num_heads=2",
          "finetune.epochs=1", "finetune.batch_size=16", "finetune.bootstrap=0"]
    assert main(["finetune", "--init", "scratch", "--fold", "1", *ov]) == 0
    stage = tmp_path / "runs" / "f" / "finetune-fold1"
    assert (stage / "result.json").exists() and yaml.safe_load((stage / "config.yaml").read_text())["finetune"]["fold"] == 1
    _k, folds = load_fold_file(tmp_path / "split.json")
    out = evaluate_run(stage, split="val", out_dir=tmp_path / "ev", progress=False, log=lambda m: None)
    n_val = sum(1 for f in folds.values() if f == 1)  # one image per patient
    rows = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert len(rows) - 1 == n_val, (out, n_val)
