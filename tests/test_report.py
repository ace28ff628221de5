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
