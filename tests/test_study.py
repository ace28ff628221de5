"""The label-efficiency study: init parsing, results/aggregation files, an injected cell failure,
and a SIGKILL mid-grid that resumes without redoing a finished cell."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medmim.config import load_config, with_overrides
from medmim.errors import ConfigError
from pipelines import label_efficiency as le

ROOT = Path(__file__).resolve().parents[1]


def tiny_raw(tmp: Path, phantoms: Path, name: str = "s", **study) -> dict:
    return {
        "run": {"name": name, "out_dir": str(tmp / "runs"), "seed": 0, "num_threads": 1},
        "data": {"source": "phantoms", "image_size": 16,
                 "phantoms": {"out_dir": str(phantoms), "n_patients": 24, "images_per_patient": 1, "size_2d": 32}},
        "encoder": {"name": "vit_tiny", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
        "pretrain": {"epochs": 1, "batch_size": 8, "decoder_dim": 16, "decoder_depth": 1, "recon_every": 0},
        "finetune": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0},
        "study": {"inits": ["scratch"], "fractions": [0.5, 1.0], "seeds": [0], "modes": ["full"], **study},
    }


def tiny_cfg(tmp: Path, phantoms: Path, name: str = "s", **study):
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tmp, phantoms, name, **study)))
    return load_config(path), path


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return tmp_path_factory.mktemp("phantoms")


# ---- config and init entries ----------------------------------------------------------------------
def test_parse_init_entries():
    assert le.parse_init("mae") == le.Init("mae", "mae", None, None)
    sp = le.parse_init("spark:resnet18")
    assert (sp.method, sp.encoder, sp.key) == ("spark", "resnet18", "spark_resnet18")
    sc = le.parse_init("scratch:resnet18")
    assert sc.method == "scratch" and not sc.pretrains and sc.key == "scratch_resnet18"
    assert le.parse_init("none").method == "scratch"
    w = le.parse_init("runs/x/encoder.safetensors")
    assert w.method == "weights" and w.key == "encoder"
    with pytest.raises(ConfigError, match="unknown initialisation"):
        le.parse_init("byol")
    assert le.cell_name("mae", "full", 0.1, 2) == "mae-full-f0.1-s2"  # plain names keep today's folders
    assert le.cell_name("spark:resnet18", "linear", 1.0, 0) == "spark_resnet18-linear-f1-s0"
    assert le.cell_name("mae", "full", 0.1, 2, fold=3) == "mae-full-f0.1-s2-fold3"  # cross-validation cells


def test_study_folds_selection():
    assert le.study_folds(load_config(None)) == [None]  # no cross-validation: one split
    assert le.study_folds(load_config(None, ["data.folds=4"])) == [0, 1, 2, 3]
    assert le.study_folds(load_config(None, ["data.folds=4", "finetune.fold=2"])) == [2]  # --fold 2
    assert le.study_folds(load_config(None, ["data.folds=4", "study.folds=[3, 1]"])) == [1, 3]
    with pytest.raises(ConfigError, match="study.folds=.*needs data.folds > 5"):
        load_config(None, ["data.folds=4", "study.folds=[5]"])
    # without folds a non-CV study's fingerprint is unchanged by the new (default) keys
    cfg = load_config(None)
    assert le.stage_fingerprint(cfg, ("data", "finetune")) == \
        le.stage_fingerprint(with_overrides(cfg, ["data.folds=0"]), ("data", "finetune"))


def test_init_config_carries_encoder_and_overrides(tmp_path):
    cfg = load_config(None, ["study.inits=[mae, 'spark:resnet18', 'scratch:resnet18']",
                             "study.overrides={'spark:resnet18': ['pretrain.lr=0.002']}"])
    spark = le.init_config(cfg, le.parse_init("spark:resnet18"))
    assert spark.encoder.name == "resnet18" and spark.pretrain.method == "spark" and spark.pretrain.lr == 0.002
    mae = le.init_config(cfg, le.parse_init("mae"))
    assert mae.encoder.name == cfg.encoder.name and mae.pretrain.method == "mae"
    scratch = le.init_config(cfg, le.parse_init("scratch:resnet18"))
    assert scratch.encoder.name == "resnet18" and scratch.finetune.layer_decay == 1.0
    bad = with_overrides(cfg, ["study.overrides={'mae': ['data.image_size=64']}"])
    with pytest.raises(ConfigError, match="shared"):
        le.init_config(bad, le.parse_init("mae"))
    with pytest.raises(ConfigError, match="not in study.inits"):
        load_config(None, ["study.overrides={'simclr': ['pretrain.lr=0.1']}"])
    with pytest.raises(ConfigError):
        load_config(None, ["study.inits=[mae, mae]"])


def test_summary_mean_std_ci():
    rows = [{"init": "a", "mode": "full", "fraction": 0.1, "seed": s, "status": "ok", "n_labelled": 10,
             "test_auroc": v} for s, v in enumerate([0.6, 0.7, 0.8])]
    rows.append({"init": "a", "mode": "full", "fraction": 0.1, "seed": 3, "status": "failed", "error": "x"})
    (s,) = le.summarize_rows(rows, "auroc")
    assert s["n_seeds"] == 3 and s["n_cells"] == 3 and s["n_folds"] == 0 and s["failed"] == 1
    assert s["auroc_mean"] == pytest.approx(0.7) and s["auroc_std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, df=2)
    assert s["ci95_low"] == pytest.approx(0.7 - half) and s["ci95_high"] == pytest.approx(0.7 + half)
    assert "0.700 ± 0.100" in le.format_table([s], "auroc")
    # near the ceiling the t-interval passes 1.0: clipped for AUROC, not for an unbounded metric
    high = [{**r, "test_auroc": v, "test_hd95": 10 * v} for r, v in zip(rows, [0.9, 0.95, 1.0])]
    (s,) = le.summarize_rows(high, "auroc")
    half = 4.302652729911275 * 0.05 / math.sqrt(3)
    assert s["ci95_low"] == pytest.approx(0.95 - half) and s["ci95_high"] == 1.0
    (h,) = le.summarize_rows(high, "hd95")
    assert h["ci95_high"] == pytest.approx(9.5 + 10 * half)


# ---- running studies ------------------------------------------------------------------------------
def test_failed_cell_is_reported_and_others_go_on_then_retried(tmp_path, phantoms, monkeypatch):
    cfg, _ = tiny_cfg(tmp_path, phantoms, "fail", min_steps=6)
    real = le.finetune_stage
    calls = []

    def flaky(cell_cfg, data, run, runtime, **kw):
        calls.append(run.path.name)
        if run.path.name == "scratch-full-f0.5-s0":
            raise RuntimeError("injected failure")
        return real(cell_cfg, data, run, runtime, **kw)

    monkeypatch.setattr(le, "finetune_stage", flaky)
    logs = []
    rows = le.run_study(cfg, log=logs.append, progress=False)
    by = {r["cell"]: r for r in rows}
    assert by["scratch-full-f0.5-s0"]["status"] == "failed"
    assert "injected failure" in by["scratch-full-f0.5-s0"]["error"]
    assert by["scratch-full-f1-s0"]["status"] == "ok" and isinstance(by["scratch-full-f1-s0"]["test_auroc"], float)
    out = Path(cfg.run.out_dir) / cfg.run.name
    assert "injected failure" in (out / "cells/scratch-full-f0.5-s0/error.txt").read_text()
    assert any("1 of 2 cell(s) failed" in m for m in logs)
    for f in ("results.csv", "results.json", "summary.csv", "summary.json", "summary.md", "label_efficiency.png",
              "data_card.json", "report/index.html", "environment.json", "config.yaml"):
        assert (out / f).exists(), f
    assert json.loads((out / "results.json").read_text())[0]["status"] == "failed"
    # min_steps: 16 labelled images at bs 8 -> 2 steps per epoch -> 3 epochs, not 2
    assert by["scratch-full-f1-s0"]["n_labelled"] == 16
    assert len((out / "cells/scratch-full-f1-s0/metrics.jsonl").read_text().splitlines()) == 3

    # the rerun retries only the failed cell
    calls.clear()
    monkeypatch.setattr(le, "finetune_stage", lambda *a, **kw: (calls.append(a[2].path.name), real(*a, **kw))[1])
    rows2 = le.run_study(cfg, log=logs.append, progress=False)
    assert all(r["status"] == "ok" for r in rows2)
    assert not (out / "cells/scratch-full-f0.5-s0/error.txt").exists()
    ok_before = by["scratch-full-f1-s0"]
    ok_after = {r["cell"]: r for r in rows2}["scratch-full-f1-s0"]
    assert ok_after["test_auroc"] == ok_before["test_auroc"]


def test_python_api_returns_dataframe(tmp_path, phantoms):
    import medmim.study

    cfg, path = tiny_cfg(tmp_path, phantoms, "api")
    df = medmim.study.run(path, verbose=False, **{"finetune.epochs": 1}, study__fractions=[1.0])
    assert list(df["cell"]) == ["scratch-full-f1-s0"] and df["status"].tolist() == ["ok"]
    assert Path(df.attrs["run_dir"]).name == "api"
    again = medmim.study.load(df.attrs["run_dir"])
    assert again["test_auroc"].tolist() == df["test_auroc"].tolist()
    summ = medmim.study.summary(df)
    assert summ.loc[0, "n_seeds"] == 1


def _finished_cells(out: Path) -> dict[str, tuple[str, str]]:
    """cell -> (result.json text, metrics.jsonl text) for every finished cell."""
    res = {}
    for d in sorted((out / "cells").glob("*")):
        if (d / "result.json").exists():
            res[d.name] = ((d / "result.json").read_text(), (d / "metrics.jsonl").read_text())
    return res


@pytest.mark.slow
def test_sigkill_mid_grid_resumes_without_redoing_cells(tmp_path, phantoms):
    """Kill `medmim study` with SIGKILL during the grid; the rerun redoes no finished cell and ends
    with exactly the results of an uninterrupted run."""
    study = {"inits": ["mae", "scratch"], "fractions": [0.5, 1.0], "seeds": [0]}
    raw = tiny_raw(tmp_path, phantoms, "killed", **study)
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "runs" / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medmim.cli", "study", "-c", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(_finished_cells(out)) >= 1:
                # kill inside the next cell once it has a checkpoint, or right away if that takes long
                t_first = time.time()
                while time.time() - t_first < 10 and proc.poll() is None:
                    running = [d for d in (out / "cells").glob("*") if not (d / "result.json").exists()
                               and (d / "checkpoints" / "last.pt").exists()]
                    if running:
                        break
                    time.sleep(0.05)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the study finished before it could be killed"
    before = _finished_cells(out)
    assert 1 <= len(before) < 4
    pre_metrics = (out / "pretrain-mae" / "metrics.jsonl").read_text()

    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "(done before)" in resumed.stdout
    after = _finished_cells(out)
    assert len(after) == 4
    for name, (result, metrics) in before.items():  # finished cells untouched: not redone
        assert after[name] == (result, metrics), name
    assert (out / "pretrain-mae" / "metrics.jsonl").read_text() == pre_metrics  # pretraining not redone

    # an uninterrupted run of the same study (in this process) ends with the same results
    ref_raw = dict(raw, run=dict(raw["run"], name="straight"))
    ref_cfg = load_config(None, [])
    ref_cfg = ref_cfg.model_validate(ref_raw)
    ref_rows = le.run_study(ref_cfg, log=lambda m: None, progress=False)
    got = json.loads((out / "results.json").read_text())
    key = lambda r: {k: v for k, v in r.items() if k not in ("weights_report", "time_s")}  # noqa: E731
    assert [key(r) for r in got] == [key(json.loads(json.dumps(r))) for r in ref_rows]


def test_progress_eta_counts_only_computed_cells():
    logs = []
    prog = le.Progress(4, logs.append, fancy=False)
    with prog:
        prog.advance("a: auroc 0.9", 100.0, cached=True)   # resumed: costs nothing, says so
        prog.advance("b: auroc 0.8", 10.0, cached=False)
        prog.advance("c: FAILED: x", 20.0, cached=False)
    assert logs[0] == "[study] cell 1/4 a: auroc 0.9 (done before) (ETA ?)"
    assert logs[1].endswith("(ETA 0m20s)") and logs[2].endswith("(ETA 0m15s)")


def test_progress_rich_bar_runs(capsys):
    with le.Progress(2, print, fancy=True) as prog:
        prog.status("cell x")
        prog.advance("x: auroc 0.5", 1.0, cached=False)
        prog.log("a log line")
    out = capsys.readouterr().out
    assert "a log line" in out and "cell 1/2" in out


def test_stage_fingerprint_guards_against_a_changed_config(tmp_path):
    from medmim.train.rundir import RunDir

    cfg = load_config(None, [])
    fp = le.stage_fingerprint(cfg, ("data", "encoder", "finetune"))
    assert fp == le.stage_fingerprint(with_overrides(cfg, ["run.name=other", "study.seeds=[0,1,2]"]),
                                      ("data", "encoder", "finetune"))  # names and the grid do not matter
    changed = le.stage_fingerprint(with_overrides(cfg, ["finetune.lr=0.01"]), ("data", "encoder", "finetune"))
    assert changed != fp
    run = RunDir.create(tmp_path / "cell")
    le.check_stage(run, fp)  # a fresh folder records its fingerprint
    le.check_stage(run, fp)  # the same config resumes
    with pytest.raises(le.MedmimError, match="different config"):
        le.check_stage(run, changed)


def test_val_labels_fraction_reduces_model_selection_labels(tmp_path, phantoms, monkeypatch):
    # finetune.val_labels=fraction: the val split used for checkpoint selection shrinks with the
    # label fraction (nested, stratified, both classes kept); "all" keeps the whole val split.
    from medmim.data.dataset import prepare_data
    from medmim.train import stages

    monkeypatch.setattr(stages, "materialize", lambda records, *a, **k: list(records))
    cfg, _ = tiny_cfg(tmp_path, phantoms, "vl")
    cfg = with_overrides(cfg, ["data.phantoms.n_patients=60", "data.val_fraction=0.4"])
    data = prepare_data(cfg)
    full_val = data.split("val")
    ids = lambda recs: {r["image"] for r in recs}  # noqa: E731
    by_frac = {}
    for frac in (0.25, 0.5, 1.0):
        c = with_overrides(cfg, [f"finetune.label_fraction={frac}", "finetune.val_labels=fraction"])
        train, val, test = stages.labelled_items(c, data, seed=0)
        by_frac[frac] = ids(val)
        assert {r["label"] for r in val} == {r["label"] for r in full_val}
        everything = stages.labelled_items(with_overrides(c, ["finetune.val_labels=all"]), data, seed=0)
        assert ids(everything[1]) == ids(full_val) and ids(everything[0]) == ids(train)
    assert len(by_frac[0.25]) < len(by_frac[0.5]) < len(by_frac[1.0]) == len(full_val)
    assert by_frac[0.25] <= by_frac[0.5] <= by_frac[1.0]
