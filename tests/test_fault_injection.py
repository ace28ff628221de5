"""Fault injection: SIGKILL real training processes at random moments, resume them, and check that the
final results are exactly those of an uninterrupted run (CPU, same seed).

Processes are forked from a forkserver that has imported medmim, torch and MONAI once, so that a
trial costs training time rather than start-up time. Each child runs ``medmim.cli.main(argv)`` (the
real CLI), and is killed with SIGKILL: no handler, no cleanup, no flush.

Checked per kind (pretraining, fine-tuning, a study), over several seeded random trials each:
metrics.jsonl (minus wall-clock times), result/summary files, and the exported weights / best
checkpoint tensors are equal to the uninterrupted reference, bit for bit.
"""

from __future__ import annotations

import ast
import csv
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY

pytestmark = pytest.mark.slow

TRIALS = int(os.environ.get("MEDMIM_FAULT_TRIALS", "3"))
PRELOAD = ["torch", "monai", "monai.transforms", "medmim.cli", "medmim.train.stages", "medmim.models",
           "medmim.eval.recon_grid", "medmim.eval.plots", "medmim.eval.report", "pipelines.label_efficiency",
           "test_fault_injection"]


def _child(argv: list[str], log: str) -> None:
    """Runs in the forked child: the real CLI, output to a log file."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    import torch as _torch

    _torch.set_num_threads(1)
    from medmim.cli import main

    os._exit(main(argv))


def _writer(path: str, big: int) -> None:
    """Runs in the forked child: rewrite one checkpoint again and again (until killed)."""
    from medmim.train.checkpoint import save_checkpoint

    i = 0
    while True:
        i += 1
        save_checkpoint({"i": i, "data": torch.full((big,), float(i)), "model": {"w": torch.full((8,), float(i))}},
                        path)


def _noop() -> None:
    pass


@pytest.fixture(scope="module")
def ctx():
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(PRELOAD)
    warm = c.Process(target=_noop)  # starts the forkserver (the imports) before anything is timed
    warm.start()
    warm.join()
    return c


def _start(ctx, argv: list[str], log: Path):
    p = ctx.Process(target=_child, args=(argv, str(log)))
    p.start()
    return p


def _finish(ctx, argv: list[str], log: Path, timeout: float = 300) -> None:
    p = _start(ctx, argv, log)
    p.join(timeout)
    if p.is_alive():
        p.kill()
        pytest.fail(f"timed out: {argv}")
    assert p.exitcode == 0, log.read_text()[-3000:]


def _kill_after(ctx, argv: list[str], log: Path, delay: float) -> bool:
    """Start, SIGKILL after ``delay`` s. True when the kill landed (the process was still running)."""
    p = _start(ctx, argv, log)
    p.join(delay)
    alive = p.is_alive()
    if alive:
        os.kill(p.pid, signal.SIGKILL)
    p.join()
    if alive:
        assert p.exitcode == -signal.SIGKILL
    else:
        assert p.exitcode == 0, log.read_text()[-3000:]
    return alive


# ---------------------------------------------------------------------------------------------
# what must be equal


def _metrics(path: Path) -> list[dict]:
    from medmim.train.rundir import RunDir

    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in RunDir(path).read_metrics()]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from medmim.train.checkpoint import safe_torch_load

    return safe_torch_load(path)["model"]


def _json(path: Path, name: str):
    obj = json.loads(path.read_text().replace(name, "<RUN>"))
    return _untimed(obj)


def _untimed(obj):
    """``obj`` without its wall-clock fields (``epoch_time_s``, ``time_s``), at any depth."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not k.endswith("time_s")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _outcome(run: Path) -> dict:
    """Everything a run produced that must not depend on having been killed (the run's own name,
    which differs between trials, is masked; environment.json and the HTML report, which record
    versions and times, are left out, as are TensorBoard event files (named by time and process);
    the model card, which records times, is compared by presence)."""
    out: dict = {}
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run).as_posix()
        if not f.is_file() or rel.endswith(".sha256") or "/." in "/" + rel or rel.split("/")[0] == "tb":
            continue
        if f.name == "model_card.md":
            out[rel] = None
        elif f.name == "metrics.jsonl":
            out[rel] = _metrics(f.parent)
        elif f.suffix == ".safetensors" or (f.suffix == ".pt" and f.name == "best.pt"):
            out[rel] = {k: v.numpy().tobytes() for k, v in _tensors(f).items()}
        elif f.suffix == ".json" and f.name != "environment.json":
            out[rel] = _json(f, run.name)
        elif f.suffix == ".csv":
            # rows as dicts: compared by value, whatever the column order
            rows = list(csv.DictReader(f.read_text().replace(run.name, "<RUN>").splitlines()))
            out[rel] = [{k: _literal(v) for k, v in r.items()} for r in rows]
        elif f.suffix == ".md":
            out[rel] = f.read_text().replace(run.name, "<RUN>")
        elif f.suffix == ".png":
            out[rel] = f.read_bytes()
        else:
            out[rel] = None  # present, content not compared
    return out


def _assert_same(ref: dict, got: dict, label: str) -> None:
    assert sorted(got) == sorted(ref), f"{label}: files differ: {sorted(set(got) ^ set(ref))}"
    for k in ref:
        assert got[k] == ref[k], f"{label}: {k} differs from the uninterrupted run"


# ---------------------------------------------------------------------------------------------
# the trials


def _argv(kind: str, tmp: Path, name: str, data: Path, init: Path | None = None) -> list[str]:
    common = [f"run.out_dir={tmp / 'runs'}", f"run.name={name}", f"data.phantoms.out_dir={data}",
              "run.device=cpu", "run.num_threads=1", "finetune.bootstrap=50", *TINY]
    if kind == "pretrain":
        return ["pretrain", *common, "pretrain.epochs=3", "pretrain.batch_size=8",
                "pretrain.checkpoint_every_steps=2", "pretrain.recon_every=0"]
    if kind == "finetune":
        return ["finetune", "--init", str(init), *common, "finetune.epochs=3", "finetune.batch_size=4",
                "finetune.checkpoint_every_steps=3"]
    return ["study", *common, "pretrain.epochs=2", "finetune.epochs=2", "finetune.checkpoint_every_steps=2",
            "pretrain.checkpoint_every_steps=2", "study.fractions=[0.5]"]


def _resume_argv(argv: list[str]) -> list[str]:
    return argv if argv[0] == "study" else [argv[0], "--resume", *argv[1:]]


def _run_root(argv: list[str]) -> Path:
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("run.out_dir="))
    name = next(a.split("=", 1)[1] for a in argv if a.startswith("run.name="))
    return Path(out) / name


def _trials(ctx, tmp_path: Path, kind: str, init: Path | None = None) -> dict:
    data = tmp_path / "data"
    ref_argv = _argv(kind, tmp_path, f"{kind}-ref", data, init)
    t0 = time.time()
    _finish(ctx, ref_argv, tmp_path / f"{kind}-ref.log")
    t_ref = time.time() - t0
    ref_root = _run_root(ref_argv)
    ref = _outcome(ref_root)
    rng = random.Random(f"medmim-fault-{kind}")
    landed = []
    for trial in range(TRIALS):
        argv = _argv(kind, tmp_path, f"{kind}-t{trial}", data, init)
        log = tmp_path / f"{kind}-t{trial}.log"
        # first run: killed at a random moment; then one resumed run killed again; then to the end
        hit = _kill_after(ctx, argv, log, rng.uniform(0.1, 0.9) * t_ref)
        landed.append(hit)
        if hit:
            hit2 = _kill_after(ctx, _resume_argv(argv), log, rng.uniform(0.2, 0.8) * t_ref)
            landed.append(hit2)
        _finish(ctx, _resume_argv(argv), log)
        _assert_same(ref, _outcome(_run_root(argv)), f"{kind} trial {trial}")
    print(f"[fault] {kind}: reference {t_ref:.1f}s, {TRIALS} trials, {sum(landed)}/{len(landed)} kills landed, "
          f"{time.time() - t0:.1f}s in all", file=sys.stderr)
    return {"t_ref": t_ref, "kills_landed": sum(landed), "kills": len(landed), "ref": ref_root}


def test_sigkill_anywhere_then_resume_gives_the_same_results(ctx, tmp_path):
    """Pretraining, fine-tuning (from the pretrained export) and a study, each killed at random points."""
    from medmim.config import load_config
    from medmim.data.phantoms import PhantomSpec, generate

    p = load_config(None, TINY).data.phantoms  # written once, up front: the trials time training
    generate(tmp_path / "data", 2, PhantomSpec(n_patients=p.n_patients, images_per_patient=p.images_per_patient,
                                               size_2d=p.size_2d, size_3d=p.size_3d,
                                               abnormal_fraction=p.abnormal_fraction, seed=p.seed))
    pre = _trials(ctx, tmp_path, "pretrain")
    assert pre["kills_landed"] >= 1
    fine = _trials(ctx, tmp_path, "finetune", init=pre["ref"] / "encoder.safetensors")
    assert fine["kills_landed"] >= 1
    study = _trials(ctx, tmp_path, "study")
    assert study["kills_landed"] >= 1
    print({k: {kk: vv for kk, vv in v.items() if kk != "ref"} for k, v in
           {"pretrain": pre, "finetune": fine, "study": study}.items()})


def test_kill_during_checkpoint_write_never_breaks_last_pt(ctx, tmp_path):
    """A process rewriting last.pt in a loop (about 4 MB each) is SIGKILLed at random moments; the file
    left behind always loads, passes its checksum and is internally consistent."""
    from medmim.train.checkpoint import safe_torch_load, save_checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"i": 0, "data": torch.zeros(4), "model": {"w": torch.zeros(8)}}, path)
    rng = random.Random(7)
    seen = set()
    for _ in range(10):
        p = ctx.Process(target=_writer, args=(str(path), 1_000_000))
        p.start()
        time.sleep(rng.uniform(0.2, 1.0))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        ckpt = safe_torch_load(path)
        i = int(ckpt["i"])
        assert torch.all(ckpt["model"]["w"] == float(i))
        assert torch.all(ckpt["data"] == float(i))
        seen.add(i)
    assert len(seen) > 1  # the writer did get somewhere between kills
    # the next save cleans up temp files a killed writer left behind
    save_checkpoint({"i": -1}, path)
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]
