"""The training loop: gradient accumulation, clipping, the NaN/Inf guard, precision, samplers.

The toy task here (a small MLP classifier on random 8x8 images with MONAI augmentation) is shared
by test_resume.py and test_ddp.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai import transforms as mt
from torch import nn

from medmim.config import FinetuneConfig, RunConfig
from medmim.data.dataset import make_loader, set_loader_epoch
from medmim.errors import MedmimError
from medmim.train.checkpoint import safe_torch_load
from medmim.data.samplers import GlobalBatchSampler, ShardBatchSampler
from medmim.train.distributed import all_gather_cat, all_reduce_sum
from medmim.train.loop import Runtime, Task, TrainingDiverged, eval_epochs, fit, resolve_precision
from medmim.train.rundir import RunDir, seed_everything

# ---------------------------------------------------------------------------------------------
# a toy task, deterministic up to the seeds the loop controls


def toy_items(n: int = 22, seed: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 2
        img = torch.randn(1, 8, 8, generator=g) + (0.8 if label else -0.8)
        out.append({"image": img, "label": torch.tensor(label)})
    return out


def toy_augment() -> mt.Compose:
    return mt.Compose([mt.RandGaussianNoised(["image"], prob=0.8, std=0.3),
                       mt.RandFlipd(["image"], prob=0.5, spatial_axis=1)])


class ToyNet(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 2))

    def forward(self, x):
        return self.body(x)


class ToyTask(Task):
    """Classification with a mean loss; evaluation gathers predictions across ranks."""

    def __init__(self, model: nn.Module, fail_at: int | None = None, nan_at: int | None = None):
        self.model = model
        self.calls = 0
        self.fail_at = fail_at  # raise (a simulated kill) on this training_step call
        self.nan_at = nan_at  # return a NaN loss on this call

    def training_step(self, model, batch):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        loss = F.cross_entropy(model(batch["image"]), batch["label"])
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss}

    @torch.no_grad()
    def evaluate(self, model, loader, runtime):
        model.eval()
        logits, labels = [], []
        for batch in loader:
            logits.append(model(batch["image"]))
            labels.append(batch["label"])
        model.train()
        lg = all_gather_cat(torch.cat(logits))
        y = all_gather_cat(torch.cat(labels))
        return {"loss": float(F.cross_entropy(lg, y, reduction="sum").double() / len(y)),
                "acc": float((lg.argmax(1) == y).double().mean()), "n": int(len(y)),
                "checksum": float((lg.double() * torch.arange(1, len(y) + 1)[:, None]).sum())}


def toy_settings(**kw) -> FinetuneConfig:
    base = dict(epochs=3, batch_size=8, lr=3e-2, warmup_epochs=1, weight_decay=0.01)
    base.update(kw)
    return FinetuneConfig(**base)


def run_toy(out: Path, *, settings: FinetuneConfig | None = None, n: int = 22, n_val: int = 9, dropout: float = 0.0,
            augment: bool = True, resume: bool = False, fail_at: int | None = None, nan_at: int | None = None,
            seed: int = 3, rank: int = 0, world_size: int = 1) -> tuple[dict, ToyTask]:
    """One toy fit (seeded as a stage is); returns (fit result, task)."""
    settings = settings or toy_settings()
    seed_everything(seed, 1)
    model = ToyNet(dropout)
    task = ToyTask(model, fail_at=fail_at, nan_at=nan_at)
    train = make_loader(toy_items(n), settings.batch_size, shuffle=True, seed=seed,
                        augment=toy_augment() if augment else None, drop_last=False, rank=rank,
                        world_size=world_size)
    val = make_loader(toy_items(n_val, seed=11), 4, shuffle=False, seed=seed, rank=rank, world_size=world_size)
    result = fit(task, train, settings, RunDir.create(out), Runtime(torch.device("cpu"), None), val_loader=val,
                 monitor="val_acc", resume=resume, stage="toy", max_evals=settings.max_evals, log=lambda m: None)
    return result, task


def metrics_of(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in RunDir(run).read_metrics()]


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# gradient accumulation and clipping


@pytest.mark.parametrize("clip", [None, 0.05])
def test_grad_accum_half_batch_equals_full_batch(tmp_path, clip):
    """batch 8 x accum 1 == batch 4 x accum 2 (22 samples: the last optimizer step holds 6, split 4 + 2,
    so the per-sample weighting is exercised too). Tolerance: 1e-6 absolute on every parameter."""
    full, t_full = run_toy(tmp_path / "full", settings=toy_settings(batch_size=8, grad_accum=1, clip_grad=clip))
    half, t_half = run_toy(tmp_path / "half", settings=toy_settings(batch_size=4, grad_accum=2, clip_grad=clip))
    a, b = params_of(t_full.model), params_of(t_half.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert full["step"] == half["step"] == 3 * 3
    for ra, rb in zip(metrics_of(tmp_path / "full"), metrics_of(tmp_path / "half")):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], abs=1e-6)


def test_clipping_bounds_the_update(tmp_path):
    """With a tiny clip_grad, the first AdamW-free check: the clipped gradient norm is <= clip."""
    from medmim.train import loop as loop_mod

    seen = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        norm = orig(params, max_norm, *a, **kw)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        seen.append((float(norm), float(after)))
        return norm

    loop_mod.torch.nn.utils.clip_grad_norm_ = spy
    try:
        run_toy(tmp_path, settings=toy_settings(clip_grad=1e-3, epochs=1))
    finally:
        loop_mod.torch.nn.utils.clip_grad_norm_ = orig
    assert seen and all(after <= 1e-3 * (1 + 1e-4) for _, after in seen)
    assert any(before > 1e-3 for before, _ in seen)


# ---------------------------------------------------------------------------------------------
# the NaN/Inf guard


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    settings = toy_settings(checkpoint_every_steps=1)
    # 22 samples / batch 8 = 3 batches per epoch; call 5 is epoch 2, batch 2
    with pytest.raises(TrainingDiverged) as err:
        run_toy(tmp_path, settings=settings, nan_at=5)
    msg = str(err.value)
    assert isinstance(err.value, MedmimError)  # the CLI prints it as one line, exit status 2
    assert "loss became nan" in msg and "epoch 2, batch 2" in msg and "last good checkpoint" in msg
    assert str(tmp_path / "checkpoints" / "last.pt") in msg
    ckpt = safe_torch_load(tmp_path / "checkpoints" / "last.pt")  # checksum verified
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["batch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "done.json").exists()
    # the kept checkpoint is the state just before the bad step: resuming without the NaN finishes
    # exactly like a run that never saw it
    run_toy(tmp_path / "ref", settings=settings)
    _, resumed = run_toy(tmp_path, settings=settings, resume=True)
    _, ref = run_toy(tmp_path / "ref", settings=settings, resume=True)  # done: returns the final weights
    for k, v in params_of(ref.model).items():
        assert torch.equal(v, params_of(resumed.model)[k])


def test_non_finite_gradient_stops_the_run(tmp_path):
    class InfGrad(ToyTask):
        def training_step(self, model, batch):
            out = super().training_step(model, batch)
            w = model.body[1].weight if not hasattr(model, "module") else model.module.body[1].weight
            return {"loss": out["loss"] + torch.sqrt((w - w.detach()).abs().sum())}  # 0 value, NaN grad

    seed_everything(0, 1)
    task = InfGrad(ToyNet())
    loader = make_loader(toy_items(), 8, shuffle=True, seed=0)
    with pytest.raises(TrainingDiverged, match="gradient norm became nan"):
        fit(task, loader, toy_settings(clip_grad=1.0), RunDir.create(tmp_path), Runtime(torch.device("cpu"), None),
            stage="toy", log=lambda m: None)


# ---------------------------------------------------------------------------------------------
# precision


def test_precision_bf16_on_cuda_fp32_on_cpu():
    assert resolve_precision("auto", "cuda") is torch.bfloat16
    assert resolve_precision("auto", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    assert resolve_precision("fp32", "cuda") is None
    rt = Runtime.from_config(RunConfig(device="cpu"))
    assert rt.device.type == "cpu" and rt.amp_dtype is None
    if not torch.cuda.is_available():
        assert Runtime.from_config(RunConfig()).amp_dtype is None  # auto on a CPU machine: fp32
        with pytest.raises(MedmimError, match="no CUDA device"):
            Runtime.from_config(RunConfig(device="cuda"))
    x = torch.randn(4, 4)
    with rt.autocast():
        assert (x @ x).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# samplers: one global order, exact shards


@pytest.mark.parametrize("n, bs, world, drop_last", [(22, 8, 2, False), (22, 8, 3, False), (23, 5, 2, True),
                                                     (5, 4, 3, False), (10, 3, 4, False)])
def test_global_batches_are_the_one_process_batches(n, bs, world, drop_last):
    one = GlobalBatchSampler(n, bs, shuffle=True, seed=4, drop_last=drop_last)
    ranks = [GlobalBatchSampler(n, bs, shuffle=True, seed=4, drop_last=drop_last, rank=r, world_size=world)
             for r in range(world)]
    for epoch in (0, 1):
        for s in [one, *ranks]:
            s.set_epoch(epoch)
        single = list(one)
        per_rank = [list(s) for s in ranks]
        plans = [s.plan() for s in ranks]
        assert all(len(p) == len(single) == len(s) for p, s in zip(per_rank, ranks))  # DDP lines up
        for k, batch in enumerate(single):
            real = [per_rank[r][k][: plans[r][k][0]] for r in range(world)]
            assert sum(real, []) == batch  # the same samples, in the same order
            assert all(plans[r][k][1] == len(batch) for r in range(world))
        used = sum(single, [])
        assert len(used) == len(set(used))  # no sample twice (no padding)
        assert len(used) == (n - n % bs if drop_last and n >= bs else n)
    one.set_epoch(1)
    one.skip(2)
    assert list(one) == single[2:] and list(one) == single  # skipping applies to one iteration only


@pytest.mark.parametrize("n, world", [(9, 2), (9, 4), (3, 2), (10, 3)])
def test_eval_shards_are_exact_and_in_order(n, world):
    got = []
    for r in range(world):
        for batch in ShardBatchSampler(n, 2, rank=r, world_size=world):
            got += batch
    assert got == list(range(n))


def test_augmentation_depends_only_on_seed_epoch_and_index():
    items = toy_items(10)
    a = make_loader(items, 4, shuffle=True, seed=1, augment=toy_augment())
    b = make_loader(items, 2, shuffle=True, seed=1, augment=toy_augment(), rank=1, world_size=2)
    set_loader_epoch(a, 3)
    set_loader_epoch(b, 3)
    imgs_a = torch.cat([x["image"] for x in a])
    imgs_b = torch.cat([x["image"] for x in b])
    # rank 1 of 2 holds the second half of every global batch of 2: one image of each pair
    order = b.batch_sampler.global_batches()
    ref = {idx: img for idx, img in zip(sum(a.batch_sampler.global_batches(), []), imgs_a)}
    mine = [chunk[1] for chunk in order]
    for idx, img in zip(mine, imgs_b):
        assert torch.equal(ref[idx], img)
    set_loader_epoch(a, 4)
    assert not torch.equal(torch.cat([x["image"] for x in a]), imgs_a)  # a new epoch, new draws


def test_iterating_a_loader_leaves_the_global_rngs_alone():
    loader = make_loader(toy_items(10), 4, shuffle=True, seed=1, augment=toy_augment())
    seed_everything(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    for epoch in range(2):
        set_loader_epoch(loader, epoch)
        for _ in loader:
            pass
    assert torch.equal(before[0], torch.get_rng_state())
    assert (before[1] == np.random.get_state()[1]).all() and before[2] == random.getstate()


def test_single_process_reductions_are_identity():
    t = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(all_reduce_sum(t), t) and torch.equal(all_gather_cat(t), t)


def test_metrics_jsonl_survives_a_line_cut_short(tmp_path):
    run = RunDir.create(tmp_path)
    run.log_metrics({"stage": "s", "epoch": 0, "x": 1})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "s", "epo')  # a process killed mid-append
    assert run.read_metrics() == [{"stage": "s", "epoch": 0, "x": 1}]
    run.keep_metrics(lambda r: True)
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"stage": "s", "epoch": 0, "x": 1}


def test_append_after_a_line_cut_short_keeps_the_new_record(tmp_path):
    from medmim.io import append_jsonl

    f = tmp_path / "m.jsonl"
    append_jsonl(f, {"a": 1})
    with open(f, "a") as fh:
        fh.write('{"a": 2, "b')  # killed mid-append
    append_jsonl(f, {"a": 3})
    lines = f.read_text().splitlines()
    assert json.loads(lines[0]) == {"a": 1} and json.loads(lines[-1]) == {"a": 3}


# ---------------------------------------------------------------------------------------------
# evaluation scheduled by optimizer steps


@pytest.mark.parametrize("spe,epochs,max_evals", [(1, 150, 20), (3, 7, 3), (5, 4, 20), (2, 10, 0), (1, 21, 20)])
def test_eval_epochs_are_at_most_max_evals_evenly_spread_and_include_the_last(spe, epochs, max_evals):
    got = sorted(eval_epochs(spe, epochs, max_evals))
    if max_evals == 0 or max_evals >= epochs:
        assert got == list(range(epochs))
        return
    assert len(got) == max_evals and got[-1] == epochs - 1
    # evaluation k runs at the end of the epoch holding optimizer step ceil(k * total / max_evals)
    total = spe * epochs
    gaps = np.diff([-1] + got) * spe
    assert gaps.max() - gaps.min() <= spe + 1 and abs(gaps.mean() - total / max_evals) < spe


def test_fit_validates_only_on_the_scheduled_epochs_and_splits_its_time(tmp_path):
    settings = toy_settings(epochs=6, max_evals=2)  # 22 samples, batch 8: 3 steps per epoch, 18 in all
    result, _ = run_toy(tmp_path, settings=settings)
    rows = metrics_of(tmp_path)
    assert [r["epoch"] for r in rows if "val_acc" in r] == [2, 5]  # steps 9 and 18
    best_epoch = int(safe_torch_load(tmp_path / "checkpoints" / "best.pt")["epoch"])
    assert best_epoch in (2, 5)
    assert result["best"] == max(r["val_acc"] for r in rows if "val_acc" in r)
    assert set(result["time_s"]) == {"train", "val", "data"} and min(result["time_s"].values()) >= 0
    assert result["time_s"]["val"] > 0 and result["time_s"]["data"] > 0
