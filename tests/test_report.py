"""The static HTML report: built from a study folder, rendered in headless Chromium (images load,
tables present), no patient identifiers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medmim.eval.plots import plot_label_efficiency
from medmim.eval.report import comparison, write_report
from pipelines.label_efficiency import summarize_rows, write_results

SECRET = "DOE^JANE-PID-424242"


def fake_study(root: Path) -> Path:
    """A study folder as run_study writes it, without training anything."""
    rng = np.random.default_rng(0)
    rows = []
    for init, base in (("mae", 0.8), ("scratch", 0.7)):
        for frac, n in ((0.1, 26), (1.0, 260)):
            for seed in range(3):
                rows.append({"cell": f"{init}-full-f{frac:g}-s{seed}", "init": init, "mode": "full", "fraction": frac,
                             "seed": seed, "status": "ok", "n_labelled": n,
                             "test_auroc": float(base + 0.1 * frac + rng.normal(0, 0.02))})
    rows.append({"cell": "scratch-linear-f1-s0", "init": "scratch", "mode": "linear", "fraction": 1.0, "seed": 0,
                 "status": "failed", "error": "RuntimeError: <boom> & co"})
    study = root / "study"
    study.mkdir(parents=True)
    summary = write_results(rows, study, "auroc")
    plot_label_efficiency(summary, "auroc", study / "label_efficiency.png")
    recon = study / "pretrain-mae" / "recon"
    recon.mkdir(parents=True)
    import matplotlib.pyplot as plt

    for ep in (1, 5):
        plt.imsave(recon / f"epoch{ep:03d}.png", rng.random((24, 64)), cmap="gray")
    (study / "pretrain-mae" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"epoch": e, "train_loss": 1.0 - 0.1 * e, "epoch_time_s": 2.0}) for e in range(5)) + "\n")
    (study / "pretrain-mae" / "done.json").write_text("{}")
    (study / "pretrain-mae" / "encoder.json").write_text(json.dumps({"pretext": "mae", "architecture": "vit_tiny"}))
    (study / "config.yaml").write_text("run:\n  name: study\nstudy:\n  inits: [mae, scratch]\n")
    (study / "environment.json").write_text(json.dumps({"python": "3.x", "packages": {"torch": "2"},
                                                        "PatientName": SECRET, "seed": 0}))
    (study / "data_card.json").write_text(json.dumps({
        "name": "phantoms", "source": "medmim phantoms 2D", "n_images": 400, "n_patients": 200,
        "splits": {"train": {"images": 260, "patients": 130, "classes": {"0": 130, "1": 130}},
                   "test": {"images": 80, "patients": 40, "classes": {"0": 40, "1": 40}}},
        "patient_ids": [SECRET], "label_names": {"0": "normal", "1": "abnormal"}}))
    return study


def test_report_contents_and_no_phi(tmp_path):
    study = fake_study(tmp_path)
    index = write_report(study)
    assert index == study / "report" / "index.html"
    text = index.read_text()
    assert SECRET not in text and "PatientName" not in text
    assert 'id="summary"' in text and "id='cells'" in text and 'id="data-card"' in text
    assert "&lt;boom&gt; &amp; co" in text  # escaped
    imgs = re.findall(r"<img src='([^']+)'", text)
    assert "img/label_efficiency.png" in imgs and len(imgs) == 3
    for src in imgs:
        assert (index.parent / src).is_file()  # copied: the folder stands alone
        assert not src.startswith(("/", "http"))
    # a second render replaces the folder as a whole
    write_report(study)
    assert sorted(p.name for p in (study / "report").iterdir()) == ["img", "index.html"]


def test_comparison_scratch_vs_best_pretrained(tmp_path):
    rows = json.loads((fake_study(tmp_path) / "results.json").read_text())
    comp = comparison(summarize_rows(rows, "auroc"), "auroc")
    assert [c["fraction"] for c in comp] == [0.1, 1.0]
    assert all(c["best_init"] == "mae" and c["delta"] > 0.05 for c in comp)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install -y "
                    "chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    study = fake_study(tmp_path)
    index = write_report(study)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
           "--dump-dom", index.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert "<table" in dom, out.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images="ok:3"' in body, body  # all three images decoded with a non-zero width
    assert 'id="summary"' in dom and "scratch" in dom
    # a broken image is detected by the same check
    (index.parent / "img" / "label_efficiency.png").write_bytes(b"not a png")
    dom2 = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-images="broken:1"' in re.search(r"<body[^>]*>", dom2).group(0)
    # the full report (per-fraction ROC/PR, confusion, learning curves) renders with every image
    rich = write_report(rich_study(tmp_path))
    n_imgs = len(re.findall(r"<img src=", rich.read_text()))
    dom3 = subprocess.run(cmd[:-1] + [rich.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f'data-images="ok:{n_imgs}"' in re.search(r"<body[^>]*>", dom3).group(0) and n_imgs == 7
    assert 'id="per-class"' in dom3 and 'id="paired"' in dom3


# ---- per-cell outputs: predictions, learning curves, paired tests, flags ---------------------------
from itertools import product  # noqa: E402

from PIL import Image  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from medmim.eval.plots import curve_points  # noqa: E402
from medmim.eval.predictions import read_predictions, resolve_class_names, write_predictions  # noqa: E402
from medmim.eval.report import (MIN_PAIRS, confusion_by_init, degenerate_flags, paired_test,  # noqa: E402
                                study_context)


def _cell_outputs(study: Path, row: dict, rng, n_test: int = 40, k: int = 2, strength: float = 1.0,
                  constant: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """predictions_test.csv and metrics.jsonl for one cell; the result row gets its test metrics."""
    from medmim.eval.metrics import bootstrap_cis

    y = np.arange(n_test) % k
    logits = rng.normal(0, 1, (n_test, k))
    logits[np.arange(n_test), y] += strength
    if constant:
        logits[:, 0] += 8.0  # class 0 always wins, the outputs still vary
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cell = study / "cells" / row["cell"]
    write_predictions(cell / "predictions_test.csv", probs, y, ["normal", "abnormal", "other"][:k])
    recs = [{"stage": "finetune", "epoch": e, "train_loss": 0.7 - 0.05 * e, "val_loss": 0.72 - 0.03 * e,
             "val_auroc": 0.6 + 0.05 * e, "lr": 1e-3} for e in range(4)]
    (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for c in range(k):
        ci = bootstrap_cis(y, probs, [f"auroc_class{c}"], n=200, seed=0)[f"auroc_class{c}"]
        row[f"test_auroc_class{c}"], row[f"test_auroc_class{c}_ci_low"] = ci["value"], ci["low"]
        row[f"test_auroc_class{c}_ci_high"] = ci["high"]
    return probs, y


def rich_study(root: Path, seeds=range(3), k: int = 2, card_names: bool = True) -> Path:
    """A study whose cells carry predictions and learning curves (two inits, two fractions)."""
    rng = np.random.default_rng(1)
    study = root / "rich"
    rows = []
    for init, frac, seed in product(("mae", "scratch"), (0.1, 1.0), seeds):
        row = {"cell": f"{init}-full-f{frac:g}-s{seed}", "init": init, "mode": "full", "fraction": frac,
               "seed": seed, "status": "ok", "n_labelled": int(260 * frac), "best_epoch": 3}
        probs, y = _cell_outputs(study, row, rng, k=k, strength=2.0 if init == "mae" else 0.5,
                                 constant=(init == "scratch" and frac == 0.1 and seed == 0))
        row["test_auroc"] = float(skm.roc_auc_score(y, probs[:, 1])) if k == 2 else \
            float(skm.roc_auc_score(y, probs, multi_class="ovr"))
        row["test_balanced_accuracy"] = float(skm.balanced_accuracy_score(y, probs.argmax(1)))
        rows.append(row)
    rows[-1]["best_epoch"] = 0
    summary = write_results(rows, study, "auroc")
    plot_label_efficiency(summary, "auroc", study / "label_efficiency.png")
    (study / "config.yaml").write_text(f"run:\n  name: rich\ndata:\n  num_classes: {k}\n")
    card = {"name": "phantoms", "n_images": 400, "splits": {"test": {"images": 40, "classes": {"0": 20, "1": 20}}}}
    if card_names:
        card["label_names"] = {"0": "normal", "1": "abnormal"}
    (study / "data_card.json").write_text(json.dumps(card))
    return study


def test_predictions_round_trip_single_and_multilabel(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), 17)
    y = rng.integers(0, 3, 17)
    f = write_predictions(tmp_path / "p.csv", p, y, ["a", "b,c", "d"])
    probs, labels, names = read_predictions(f)
    np.testing.assert_allclose(probs, p, rtol=1e-5)
    assert labels.tolist() == y.tolist()
    import csv as _csv

    with open(f, newline="") as fh:
        rows = list(_csv.DictReader(fh))
    assert [int(r["predicted"]) for r in rows] == p.argmax(1).tolist()
    assert rows[0]["label_name"] == ["a", "b,c", "d"][y[0]]  # quoted, not split on the comma
    if len(set(y.tolist()) | set(p.argmax(1).tolist())) == 3:
        assert names == ["a", "b,c", "d"]
    ym = rng.integers(0, 2, (9, 4))
    pm = rng.random((9, 4))
    probs, labels, names = read_predictions(write_predictions(tmp_path / "m.csv", pm, ym))
    assert labels.shape == (9, 4) and (labels == ym).all() and names is None
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temp files left


def test_class_names_precedence():
    card = {"label_names": {"0": "normal", "1": "pneumonia"}}
    assert resolve_class_names(2, {"data": {"class_names": ["no", "yes"]}}, card) == ["no", "yes"]
    assert resolve_class_names(2, {"data": {}}, card) == ["normal", "pneumonia"]
    assert resolve_class_names(3, None, card) == ["normal", "pneumonia", "2"]
    assert resolve_class_names(2, None, None) == ["0", "1"]


def test_curve_points_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    s = rng.random(50) + 0.3 * y
    cp = curve_points(y, np.stack([1 - s, s], 1))
    assert cp["auroc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert cp["ap"] == pytest.approx(skm.average_precision_score(y, s))
    y3 = rng.integers(0, 3, 60)
    p3 = rng.dirichlet(np.ones(3), 60)
    cp3 = curve_points(y3, p3)
    assert cp3["average"] == "micro"
    assert cp3["auroc"] == pytest.approx(skm.roc_auc_score(np.eye(3)[y3], p3, average="micro"))
    assert curve_points(np.zeros(5, int), rng.random((5, 2)))["fpr"] is None  # one class: no curve


def _exact_wilcoxon_p(d) -> float:
    """Exact two-sided signed-rank p by enumerating all 2^n sign flips (no ties, no zeros)."""
    from scipy.stats import rankdata

    d = np.asarray(d, float)
    r = rankdata(np.abs(d))
    w_obs = min(r[d > 0].sum(), r[d < 0].sum())
    n = len(d)
    count = 0
    for mask in range(2 ** n):
        plus = sum(r[i] for i in range(n) if mask >> i & 1)
        count += min(plus, r.sum() - plus) <= w_obs + 1e-9
    return count / 2 ** n


def test_paired_test_matches_exact_enumeration_and_pairs_by_seed():
    rng = np.random.default_rng(7)
    rows = []
    n = 8
    scratch = rng.uniform(0.6, 0.8, n)
    diffs = rng.normal(0.03, 0.03, n)
    for seed in range(n):
        rows.append({"init": "scratch", "mode": "full", "fraction": 0.1, "seed": seed, "status": "ok",
                     "test_auroc": float(scratch[seed])})
        rows.append({"init": "mae", "mode": "full", "fraction": 0.1, "seed": seed, "status": "ok",
                     "test_auroc": float(scratch[seed] + diffs[seed])})
    rows.append({"init": "mae", "mode": "full", "fraction": 0.1, "seed": 99, "status": "ok", "test_auroc": 0.1})
    rng.shuffle(rows)  # pairing is by seed, not by row order; seed 99 has no scratch partner
    t = paired_test(rows, "mae", "scratch", "full", 0.1, "auroc")
    assert t["n_pairs"] == n
    assert t["mean_diff"] == pytest.approx(diffs.mean())
    assert t["p"] == pytest.approx(_exact_wilcoxon_p(diffs))
    small = [r for r in rows if r["seed"] < MIN_PAIRS - 1]
    t2 = paired_test(small, "mae", "scratch", "full", 0.1, "auroc")
    assert t2["n_pairs"] == MIN_PAIRS - 1 and t2["p"] is None


def test_report_per_class_curves_flags(tmp_path):
    study = rich_study(tmp_path)
    ctx = study_context(study)
    assert ctx["class_names"] == ["normal", "abnormal"]
    # per-class sensitivity / precision: mean over seeds of scikit-learn's recall / precision
    for entry in ctx["per_class"]:
        cells = [f"{entry['init']}-full-f{entry['fraction']:g}-s{s}" for s in range(3)]
        sens, prec = [], []
        for cell in cells:
            probs, y, _ = read_predictions(study / "cells" / cell / "predictions_test.csv")
            pred = probs.argmax(1)
            sens.append(skm.recall_score(y, pred, labels=[entry["class"]], average=None, zero_division=np.nan)[0])
            prec.append(skm.precision_score(y, pred, labels=[entry["class"]], average=None,
                                            zero_division=np.nan)[0])
        sens = np.array(sens)[~np.isnan(sens)]
        assert entry["sensitivity"]["mean"] == pytest.approx(sens.mean())
        assert entry["sensitivity"]["n"] == len(sens) and entry["sensitivity"]["ci"] == "seeds"
        if len(sens) >= 2:
            from scipy import stats

            half = stats.t.ppf(0.975, len(sens) - 1) * sens.std(ddof=1) / np.sqrt(len(sens))
            assert entry["sensitivity"]["low"] == pytest.approx(max(0.0, sens.mean() - half))
        prec = np.array(prec)[~np.isnan(prec)]
        if len(prec):
            assert entry["precision"]["mean"] == pytest.approx(prec.mean())
    # confusion matrices: summed over the seeds, equal to counting by hand
    group = [r for r in json.loads((study / "results.json").read_text()) if r["fraction"] == 1.0]
    mats = confusion_by_init(group, ctx["preds"])
    want = np.zeros((2, 2), int)
    for s in range(3):
        probs, y, _ = read_predictions(study / "cells" / f"mae-full-f1-s{s}" / "predictions_test.csv")
        for a, b in zip(y, probs.argmax(1)):
            want[a, b] += 1
    assert mats["mae"][1] == 3 and (mats["mae"][0] == want).all()
    # degenerate: the constant-prediction cell and the best-epoch-0 cell
    assert any("one class predicted" in f for f in ctx["flags"]["scratch-full-f0.1-s0"])
    assert ctx["flags"]["scratch-full-f1-s2"] == ["best epoch 0"]
    assert "mae-full-f1-s0" not in ctx["flags"]

    index = write_report(study)
    text = index.read_text()
    for tid in ("per-class", "paired", "degenerate", "summary"):
        assert f'id="{tid}"' in text
    assert "n too small (n=3" in text  # 3 seeds: no p-value
    assert "abnormal" in text and "anomaly" not in text.lower().replace("abnormal", "")
    imgs = re.findall(r"<img src='([^']+)'", text)
    for kind in ("roc_pr", "confusion", "learning"):
        for frac in ("0_1", "1_0"):
            assert f"img/{kind}-full-{frac}.png" in imgs
    for src in imgs:
        with Image.open(index.parent / src) as im:
            im.verify()


def test_single_seed_shows_no_fake_spread(tmp_path):
    study = rich_study(tmp_path, seeds=[0], card_names=False)
    text = write_report(study).read_text()
    summary = re.search(r'<table id="summary">.*?</table>', text, re.S).group(0)
    assert "0.000" not in summary.replace("1.000", "") and "(n=1)" in summary
    assert "– – –" not in text and "nan" not in summary.lower()
    ctx = study_context(study)
    entry = next(e for e in ctx["per_class"] if e["init"] == "mae" and e["fraction"] == 1.0 and e["class"] == 1)
    assert entry["auroc"]["ci"] == "bootstrap" and entry["auroc"]["low"] < entry["auroc"]["mean"] < entry["auroc"]["high"]
    assert entry["sensitivity"]["ci"] == "bootstrap"
    assert ctx["class_names"] == ["normal", "abnormal"]  # from the names written beside the predictions
    s = summarize_rows(json.loads((study / "results.json").read_text()), "auroc")
    from pipelines.label_efficiency import format_table

    assert "± 0.000" not in format_table(s, "auroc") and "(n=1)" in format_table(s, "auroc")


def test_anomaly_section_only_when_scored(tmp_path):
    study = fake_study(tmp_path)
    assert "Anomaly detection" not in write_report(study).read_text()
    scores = study / "scores_test"
    scores.mkdir()
    (scores / "metrics.json").write_text(json.dumps({
        "primary_error": "ssim", "n_anomalous": 10, "n_normal": 30,
        "ssim": {"image_auroc": 0.91, "image_ap": 0.8, "operating_point": {"sensitivity": 0.7, "specificity": 0.95}},
        "l2": {"image_auroc": 0.85, "image_ap": 0.7}}))
    text = write_report(study).read_text()
    assert "Anomaly detection" in text and 'id="anomaly"' in text and "0.910" in text


def test_degenerate_flags_constant_output_and_without_predictions():
    row = {"status": "ok", "test_balanced_accuracy": 0.5, "best_epoch": 2, "_num_classes": 2}
    probs = np.tile([[0.3, 0.7]], (6, 1))
    assert degenerate_flags(row, (probs, np.array([0, 1] * 3), None)) == ["constant output"]
    assert degenerate_flags(row) and not degenerate_flags({**row, "test_balanced_accuracy": 0.62})
    assert degenerate_flags({**row, "test_balanced_accuracy": 0.7, "best_epoch": 0}, val_epochs=[0]) == []
    # validation every few epochs (finetune.max_evals): the first validated epoch is the one to flag
    assert degenerate_flags({**row, "test_balanced_accuracy": 0.7, "best_epoch": 4}, val_epochs=[4, 9, 14]) == \
        ["best epoch 4 = first validation"]
    assert degenerate_flags({**row, "test_balanced_accuracy": 0.7, "best_epoch": 9}, val_epochs=[4, 9, 14]) == []
