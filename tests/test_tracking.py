"""TensorBoard tracking: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from medmim.config import load_config  # noqa: E402
from medmim.train import tracking  # noqa: E402
from medmim.train.rundir import RunDir  # noqa: E402
from medmim.train.tracking import Tracker, make_tracker  # noqa: E402


def _events(logdir: Path) -> EventAccumulator:
    tracking.close_all()  # flush what is open
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_scalars_images_text_round_trip(tmp_path):
    t = Tracker(tmp_path / "tb")
    recs = [{"stage": "finetune", "epoch": e, "step": 3 * (e + 1), "train_loss": 1.0 / (e + 1), "lr": 1e-3 * (e + 1),
             "epoch_time_s": 0.5, "val_auroc": 0.5 + 0.1 * e, "val_loss": float("nan"), "best": 0.5 + 0.1 * e}
            for e in range(3)]
    for r in recs:
        t.log_metrics(r, {"images_per_s": 64.0})
    img = (np.arange(12 * 20).reshape(12, 20) % 255).astype(np.uint8)
    t.log_image("recon", img)
    t.log_text("config", "run:\n  name: x\n")
    acc = _events(tmp_path / "tb")
    assert _scalars(acc, "train/loss") == [(3, pytest.approx(1.0)), (6, pytest.approx(0.5)),
                                           (9, pytest.approx(1 / 3))]
    assert [v for _, v in _scalars(acc, "train/lr")] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert [v for _, v in _scalars(acc, "val/auroc")] == pytest.approx([0.5, 0.6, 0.7])
    assert [v for _, v in _scalars(acc, "train/images_per_s")] == pytest.approx([64.0] * 3)
    assert "val/loss" not in acc.Tags()["scalars"]  # NaN is not logged
    im = acc.Images("recon")[0]
    assert im.step == 9 and (im.width, im.height) == (20, 12)  # at the last logged step
    from PIL import Image
    import io

    decoded = np.asarray(Image.open(io.BytesIO(im.encoded_image_string)).convert("L"))
    assert (decoded == img).all()
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: x" in text


def test_resumed_stage_purges_events_it_logs_again(tmp_path):
    first = Tracker(tmp_path / "tb")
    for step in range(1, 6):
        first.log_metrics({"epoch": step - 1, "step": step, "train_loss": float(step)})
    tracking.close_all()
    again = Tracker(tmp_path / "tb")  # a new process resumes at step 3
    for step in range(3, 6):
        again.log_metrics({"epoch": step - 1, "step": step, "train_loss": 10.0 * step})
    acc = _events(tmp_path / "tb")
    assert _scalars(acc, "train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_off_switch_and_rank0_only(tmp_path, monkeypatch):
    from medmim.config import Config

    cfg = Config.model_validate({"run": {"tensorboard": False}})
    assert make_tracker(cfg, tmp_path) is None and not (tmp_path / "tb").exists()
    on = Config()
    assert on.run.tensorboard is True
    import medmim.train.distributed as dist

    monkeypatch.setattr(dist, "current", lambda: dist.DistInfo(rank=1, world_size=2))
    assert make_tracker(on, tmp_path) is None
    monkeypatch.undo()
    tr = make_tracker(on, tmp_path)
    assert tr is not None and tr.logdir == tmp_path / "tb"
    run = RunDir(tmp_path, tr)
    child = run.child("cells/a")
    assert child.tracker.logdir == tmp_path / "tb" / "cells" / "a" and child.path == tmp_path / "cells" / "a"
    assert RunDir(tmp_path).child("x").tracker is None


def test_a_failing_writer_never_stops_the_run(tmp_path, monkeypatch, capsys):
    t = Tracker(tmp_path / "tb")
    monkeypatch.setattr(Tracker, "_writer", lambda self, step: (_ for _ in ()).throw(OSError("disk full")))
    t.log_metrics({"epoch": 0, "step": 1, "train_loss": 1.0})
    t.log_metrics({"epoch": 1, "step": 2, "train_loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("disk full") == 1 and t.failed


def _tiny(tmp: Path, **run) -> Path:
    raw = {
        "run": {"name": "tb", "out_dir": str(tmp / "runs"), "seed": 0, "num_threads": 1, **run},
        "data": {"source": "phantoms", "image_size": 16,
                 "phantoms": {"out_dir": str(tmp / "ph"), "n_patients": 24, "images_per_patient": 1, "size_2d": 32}},
        "encoder": {"name": "vit_tiny", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
        "pretrain": {"epochs": 2, "batch_size": 8, "decoder_dim": 16, "decoder_depth": 1, "recon_every": 1},
        "finetune": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0, "bootstrap": 0},
        "study": {"inits": ["mae"], "fractions": [1.0], "seeds": [0], "modes": ["full"], "report": False},
    }
    path = tmp / "tb.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_study_logs_every_stage_to_tensorboard(tmp_path):
    from pipelines.label_efficiency import run_study

    cfg = load_config(_tiny(tmp_path))
    run_study(cfg, log=lambda m: None, progress=False)
    out = Path(cfg.run.out_dir) / cfg.run.name
    pre = _events(out / "tb" / "pretrain-mae")
    want = [json.loads(line) for line in (out / "pretrain-mae" / "metrics.jsonl").read_text().splitlines()]
    got = _scalars(pre, "train/loss")
    assert [s for s, _ in got] == [r["step"] for r in want]
    assert [v for _, v in got] == pytest.approx([r["train_loss"] for r in want], rel=1e-6)
    assert len(pre.Images("pretrain/reconstructions")) == 2  # recon_every 1, 2 epochs: the recon/ PNGs
    assert all(v > 0 for _, v in _scalars(pre, "train/images_per_s"))
    cell = _events(out / "tb" / "cells" / "mae-full-f1-s0")
    want = [json.loads(line) for line in (out / "cells" / "mae-full-f1-s0" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_auroc"] for r in want if "val_auroc" in r]
    assert [v for _, v in _scalars(cell, "val/auroc")] == pytest.approx(vals, rel=1e-6)
    root = _events(out / "tb")
    assert "config/text_summary" in root.Tags()["tensors"]
    # the classification cell also wrote its test predictions for the report
    from medmim.eval.predictions import read_predictions

    probs, labels, _ = read_predictions(out / "cells" / "mae-full-f1-s0" / "predictions_test.csv")
    result = json.loads((out / "cells" / "mae-full-f1-s0" / "result.json").read_text())
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(labels, probs[:, 1]) == pytest.approx(result["test_auroc"], abs=1e-5)


def test_tensorboard_false_writes_no_events(tmp_path):
    from pipelines.label_efficiency import run_study

    cfg = load_config(_tiny(tmp_path, tensorboard=False), ["pretrain.epochs=1", "finetune.epochs=1"])
    run_study(cfg, log=lambda m: None, progress=False)
    out = Path(cfg.run.out_dir) / cfg.run.name
    assert (out / "cells" / "mae-full-f1-s0" / "result.json").exists() and not (out / "tb").exists()
