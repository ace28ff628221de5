"""bench/gpu_check.py: the prepared GPU check, run at tiny sizes on CPU so that it cannot rot
between GPU runs (docs/gpu_server.md). The numbers are not asserted (speed is measured, never
tested); what is checked is that every section runs and that its correctness verdicts hold on CPU,
where they are known: sparse == masked-dense in float64, bf16 losses close, resume bit-identical."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def _results_listing() -> set[str]:
    folder = REPO / "bench" / "results" / "gpu"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.mark.slow
def test_quick_cpu_run_measures_every_section(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = _results_listing()
    rc = gpu_check.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-install"])
    assert rc == 0
    assert _results_listing() == before  # a CPU run never writes into the repository
    (md,), (js,) = list(tmp_path.glob("*.md")), list(tmp_path.glob("*.json"))
    report = json.loads(js.read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == ["setup", *gpu_check.SECTIONS]
    assert {n: s["status"] for n, s in sections.items()} == {n: "ok" for n in sections}, \
        {n: s.get("error") for n, s in sections.items()}
    text = md.read_text()
    assert all(f"## {n} — ok" in text for n in sections)

    variants = [r for r in sections["sparse"]["rows"] if "pass" in r]
    assert {r["setting"] for r in variants} == {f"{s['sd']}D {s['arch']} {s['batch']}x{s['img']}^{s['sd']}"
                                               for s in gpu_check.QUICK["sparse"]}
    for r in variants:  # the block kernel must equal masked-dense exactly (float64) and pass in float32
        assert r["pass"] is True, r
        assert r["fp64 vs dense fp64"] <= 1e-9, r

    bf16 = [r for r in sections["bf16"]["rows"] if "error" not in r]
    assert any(r["model"].startswith("MAE") for r in bf16) and any("masked-dense" in r["model"] for r in bf16)
    assert all(r["pass"] is True for r in bf16), bf16

    resume = sections["resume"]["rows"]
    assert len(resume) == 2 and all(r["bit-identical"] is True for r in resume), resume  # CPU: exact

    mae = {(r["setting"], r["model"]): r for r in sections["mae"]["rows"]}
    for setting in gpu_check.QUICK["mae"]:
        for model in ("medmim MAE fp32", "medmim MAE bf16", "MONAI MaskedAutoEncoderViT fp32"):
            assert mae[setting, model]["images/s"] > 0, mae[setting, model]

    spark = [r for r in sections["spark"]["rows"] if r.get("variant") == "sparse"]
    assert len(spark) == len(gpu_check.QUICK["spark"]) * len(gpu_check.QUICK["spark_steps"])
    assert all(r["/ masked-dense"] > 0 for r in spark), spark

    data = sections["data"]["rows"]
    assert [r["data.cache"] for r in data] == ["memory", "none"]
    assert all(0 < r["waiting share"] < 1 and r["timed batches"] >= 2 for r in data), data


def test_a_failing_section_is_one_line_and_the_budget_skips_with_a_note(tmp_path):
    def boom(out):
        out["rows"].append({"measured": "before the failure"})
        raise ValueError("the kernel broke\nsecond line")

    report = gpu_check.Report(tmp_path, "t", {"started": "now", "device": "cpu", "command": "x", "quick": True,
                                              "budget_s": 1})
    gpu_check.run_sections([("a", boom, 0), ("b", lambda out: {"rows": [{"k": 1.5}], "notes": ["fine"]}, 0),
                            ("c", lambda out: {}, 1e9)], report, time.monotonic() + 100)
    got = {s["name"]: s for s in json.loads((tmp_path / "t.json").read_text())["sections"]}
    assert got["a"]["status"] == "error" and got["a"]["error"] == "ValueError: the kernel broke"
    assert got["a"]["rows"] == [{"measured": "before the failure"}]  # kept
    assert got["b"]["status"] == "ok" and got["b"]["rows"] == [{"k": 1.5}]
    assert got["c"]["status"] == "skipped" and "time budget" in got["c"]["notes"][0]
    text = (tmp_path / "t.md").read_text()
    assert "## a — error" in text and "## c — skipped" in text and "| 1.5 |" in text


def test_a_package_that_cannot_be_installed_is_one_line():
    ok, line = gpu_check.pip_install("spconv-cu126", timeout_s=0.01, wheelhouse=None)
    assert not ok and "no result within" in line
    assert gpu_check.spconv_wheel() == ("spconv-cu126" if sys.version_info >= (3, 12) else "spconv-cu120")


def test_a_hung_section_is_stopped_by_its_alarm():
    with pytest.raises(gpu_check.SectionTimeout):
        with gpu_check._alarm(0.2):
            time.sleep(5)
