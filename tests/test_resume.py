"""Exact resume: a run cut off anywhere (epoch end or mid-epoch) finishes with the same weights and
metrics, bit for bit on CPU, as a run that was never interrupted.

The toy run uses dropout (global torch RNG), MONAI augmentation, shuffling, warm-up + cosine, AdamW
and gradient accumulation, so that every piece of state a resume must restore is exercised.
"""

from __future__ import annotations

import json

import pytest
import torch

from medmim.train.checkpoint import safe_torch_load
from test_loop import metrics_of, params_of, run_toy, toy_settings

# 22 samples, batch 4 -> 6 batches per epoch, grad_accum 2 -> 3 optimizer steps per epoch, 3 epochs
SETTINGS = dict(batch_size=4, grad_accum=2, epochs=3)


def _reference(tmp_path, **kw):
    result, task = run_toy(tmp_path / "ref", settings=toy_settings(**SETTINGS, **kw), dropout=0.2)
    return result, params_of(task.model), metrics_of(tmp_path / "ref")


def _interrupted(tmp_path, fail_at: int, **kw):
    out = tmp_path / f"cut{fail_at}"
    settings = toy_settings(**SETTINGS, **kw)
    with pytest.raises(KeyboardInterrupt):
        run_toy(out, settings=settings, dropout=0.2, fail_at=fail_at)
    ckpt = safe_torch_load(out / "checkpoints" / "last.pt") if (out / "checkpoints" / "last.pt").exists() else None
    result, task = run_toy(out, settings=settings, dropout=0.2, resume=True)
    return result, params_of(task.model), metrics_of(out), ckpt, task


def _assert_same(ref, got):
    r_res, r_params, r_metrics = ref
    g_res, g_params, g_metrics = got[:3]
    assert r_params.keys() == g_params.keys()
    for k in r_params:
        assert torch.equal(r_params[k], g_params[k]), k
    assert g_metrics == r_metrics  # each epoch logged exactly once, same numbers
    strip = lambda d: {k: v for k, v in d.items() if not k.endswith("time_s")}  # noqa: E731
    assert strip(g_res) == strip(r_res)


@pytest.mark.parametrize("fail_at", [1, 3, 6, 8, 11, 17, 18])
def test_resume_from_mid_epoch_checkpoints_is_exact(tmp_path, fail_at):
    """Checkpoint every optimizer step; cut off at micro-batch ``fail_at`` (1-based over the run)."""
    ref = _reference(tmp_path, checkpoint_every_steps=1)
    got = _interrupted(tmp_path, fail_at, checkpoint_every_steps=1)
    _assert_same(ref, got)
    ckpt, task = got[3], got[4]
    done_micro = fail_at - 1
    if done_micro >= 2:
        # the checkpoint the resumed run started from: the last optimizer step before the cut
        assert ckpt is not None and ckpt["step"] == done_micro // 2
        # the resumed run only computed the batches that were left
        assert task.calls == 18 - 2 * ckpt["step"]


@pytest.mark.parametrize("fail_at", [2, 7, 13])
def test_resume_from_epoch_checkpoints_is_exact(tmp_path, fail_at):
    ref = _reference(tmp_path)
    got = _interrupted(tmp_path, fail_at)
    _assert_same(ref, got)
    ckpt = got[3]
    epochs_done = (fail_at - 1) // 6
    if epochs_done:
        assert ckpt["epoch"] == epochs_done - 1 and not ckpt["batch"]


def test_finished_run_returns_its_result_and_final_weights(tmp_path):
    ref = _reference(tmp_path)
    again, task = run_toy(tmp_path / "ref", settings=toy_settings(**SETTINGS), dropout=0.2, resume=True)
    assert task.calls == 0
    assert again == json.loads((tmp_path / "ref" / "done.json").read_text())
    for k, v in ref[1].items():
        assert torch.equal(v, params_of(task.model)[k])


def test_cut_between_last_checkpoint_and_done_file(tmp_path):
    """Killed after the final last.pt but before done.json: the resumed run trains nothing and still
    returns the full final metrics."""
    ref = _reference(tmp_path)
    (tmp_path / "ref" / "done.json").unlink()
    with open(tmp_path / "ref" / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "toy", "epo')  # and a metrics line cut short
    result, task = run_toy(tmp_path / "ref", settings=toy_settings(**SETTINGS), dropout=0.2, resume=True)
    assert task.calls == 0
    _assert_same(ref, (result, params_of(task.model), metrics_of(tmp_path / "ref")))


def test_cut_after_metrics_line_before_checkpoint(tmp_path):
    """An epoch's metrics line was written, then the process died before last.pt moved on: the
    resumed run redoes the epoch and the line appears once."""
    ref = _reference(tmp_path)
    out = tmp_path / "cut"
    settings = toy_settings(**SETTINGS)
    with pytest.raises(KeyboardInterrupt):
        run_toy(out, settings=settings, dropout=0.2, fail_at=13)  # epochs 1-2 done
    lines = (out / "metrics.jsonl").read_text().splitlines()
    ckpt = safe_torch_load(out / "checkpoints" / "last.pt")
    assert len(lines) == 2 and ckpt["epoch"] == 1
    # fake "epoch 3 logged, then killed": append a (wrong) epoch-2 record as if it had been logged
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"stage": "toy", "epoch": 2, "train_loss": -1.0}) + "\n")
    result, task = run_toy(out, settings=settings, dropout=0.2, resume=True)
    _assert_same(ref, (result, params_of(task.model), metrics_of(out)))


def test_fresh_start_ignores_and_replaces_old_state(tmp_path):
    """Without resume, an old run in the same folder is neither continued nor appended to."""
    ref = _reference(tmp_path)
    result, task = run_toy(tmp_path / "ref", settings=toy_settings(**SETTINGS), dropout=0.2, resume=False)
    assert task.calls == 18
    _assert_same(ref, (result, params_of(task.model), metrics_of(tmp_path / "ref")))
