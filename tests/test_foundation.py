"""Foundation: configs, CLI errors, seeding, phantoms, and the main job end to end."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medmim.cli import main
from medmim.config import ConfigError, load_config
from medmim.data.phantoms import PhantomSpec, generate

from conftest import REPO, TINY, require_shared


# ---------------------------------------------------------------- configs

def test_defaults_and_overrides_are_typed():
    cfg = load_config("demo", ["pretrain.epochs=3", "pretrain.mask_ratio=0.9", "study.seeds=[0,1]"])
    assert cfg.pretrain.epochs == 3 and cfg.pretrain.mask_ratio == 0.9 and cfg.study.seeds == [0, 1]
    assert cfg.run.name == "demo"  # from the file


@pytest.mark.parametrize("overrides, expected", [
    (["pretrain.epoch=3"], "unknown key 'pretrain.epoch' (did you mean 'epochs'?)"),
    (["pretrain.epochs=three"], "bad value for 'pretrain.epochs'"),
    (["pretrain.mask_ratio=1.5"], "bad value for 'pretrain.mask_ratio'"),
    (["encoder.name=vgg16"], "bad value for 'encoder.name'"),
    (["nosuch.key=1"], "unknown key 'nosuch'"),
    (["data.source=medmnist"], "data.path is required"),
    (["pretrain.epochs"], "must look like key.sub=value"),
])
def test_config_errors_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  epochs: 3\n  mask_ratoi: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'pretrain.mask_ratoi' \(did you mean 'mask_ratio'\?\)"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_every_bundled_config_validates():
    names = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert "demo" in names
    for name in names:
        load_config(name)


# ---------------------------------------------------------------- CLI errors

def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "medmim.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, expected", [
    (["pretrain", "-c", "nope.yaml"], "nope.yaml: config file not found"),
    (["pretrain", "-c", "demo", "pretrain.epochz=1"], "unknown key 'pretrain.epochz'"),
    (["finetune", "-c", "demo", "--init", "missing.safetensors"], "missing.safetensors: weights file not found"),
    (["pretrain", "-c", "demo", "data.source=medmnist", "data.path=/no/such.npz"], "/no/such.npz: MedMNIST npz file not found"),
])
def test_cli_user_errors_are_one_line(args, expected, tmp_path):
    res = _cli(args + [f"run.out_dir={tmp_path}", "data.phantoms.n_patients=12",
                       f"data.phantoms.out_dir={tmp_path}/ph"], cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[0].startswith("medmim: error: ")
    assert expected in res.stderr


def test_cli_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for verb in ("demo", "pretrain", "finetune", "evaluate", "study"):
        assert verb in out


def test_bad_npz_is_a_clear_error(tmp_path):
    bad = tmp_path / "junk.npz"
    bad.write_bytes(b"this is not a zip file")
    assert main(["pretrain", "data.source=medmnist", f"data.path={bad}", f"run.out_dir={tmp_path}"]) == 2


# ---------------------------------------------------------------- phantoms

def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dims", [2, 3])
def test_phantoms_are_deterministic_real_files(tmp_path, dims):
    spec = PhantomSpec(n_patients=6, images_per_patient=2, size_2d=32, size_3d=16, seed=7)
    m1 = generate(tmp_path / "a", dims, spec)
    m2 = generate(tmp_path / "b", dims, spec)
    assert _hash_tree(m1.parent) == _hash_tree(m2.parent)
    other = generate(tmp_path / "c", dims, PhantomSpec(n_patients=6, images_per_patient=2, size_2d=32,
                                                       size_3d=16, seed=8))
    assert _hash_tree(other.parent) != _hash_tree(m1.parent)
    rows = list(csv.DictReader(open(m1)))
    assert len(rows) == 12 and {r["label"] for r in rows} == {"0", "1"}
    # read back through the same reader path as user data
    from monai.transforms import LoadImage
    img = LoadImage(image_only=True)(str(m1.parent / rows[0]["image"]))
    assert img.ndim == dims
    if dims == 3:
        assert float(img.min()) < -900 and float(img.max()) > 500  # air and bone in HU
        spacing = np.abs(np.diag(img.affine.numpy())[:3])
        assert np.allclose(spacing, [1.5, 1.5, 2.5])


def test_abnormal_phantoms_carry_a_lesion_mask(tmp_path):
    from PIL import Image
    m = generate(tmp_path, 2, PhantomSpec(n_patients=8, images_per_patient=1, size_2d=48, seed=3))
    rows = list(csv.DictReader(open(m)))
    for r in rows:
        mask = np.array(Image.open(m.parent / r["mask"]))
        assert (3 in mask) == (r["label"] == "1")


# ---------------------------------------------------------------- seeding and the main job

def _demo(tmp_path, name, extra=()):
    args = ["demo", *TINY, f"run.out_dir={tmp_path}/runs", f"run.name={name}",
            f"data.phantoms.out_dir={tmp_path}/ph", *extra]
    assert main(args) == 0
    return tmp_path / "runs" / name


def test_main_job_end_to_end_and_seeded(tmp_path):
    run = _demo(tmp_path, "a")
    for name in ("config.yaml", "environment.json", "results.csv", "summary.md",
                 "pretrain-mae/encoder.safetensors", "pretrain-mae/encoder.json", "pretrain-mae/metrics.jsonl",
                 "pretrain-mae/checkpoints/last.pt", "pretrain-mae/checkpoints/last.pt.sha256"):
        assert (run / name).exists(), name
    env = json.loads((run / "environment.json").read_text())
    assert env["seed"] == 0 and env["data_fingerprint"] and "torch" in env["packages"]
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {r["init"] for r in rows} == {"mae", "scratch"}
    metrics = [json.loads(l) for l in (run / "pretrain-mae/metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]
    # same seed -> identical metrics; another seed -> different ones
    again = _demo(tmp_path, "b")
    assert (again / "results.csv").read_text() == (run / "results.csv").read_text().replace("/a/", "/b/")
    assert (again / "pretrain-mae/metrics.jsonl").read_text().count("train_loss") == 2
    m_a = [json.loads(l)["train_loss"] for l in (run / "pretrain-mae/metrics.jsonl").read_text().splitlines()]
    m_b = [json.loads(l)["train_loss"] for l in (again / "pretrain-mae/metrics.jsonl").read_text().splitlines()]
    assert m_a == m_b
    other = _demo(tmp_path, "c", ["run.seed=1"])
    m_c = [json.loads(l)["train_loss"] for l in (other / "pretrain-mae/metrics.jsonl").read_text().splitlines()]
    assert m_c != m_a


def test_main_job_on_real_pneumoniamnist(tmp_path):
    npz = require_shared("pneumoniamnist", "pneumoniamnist_28.npz")
    args = ["demo", *TINY, f"run.out_dir={tmp_path}", "run.name=pneu", "data.source=medmnist",
            f"data.path={npz}", "data.image_size=28", "data.max_train_images=256", "study.fractions=[1.0]"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "pneu" / "results.csv")))
    assert all(r["status"] == "ok" for r in rows)
    # the real test split: 624 images
    for r in rows:
        assert 0.0 <= float(r["test_auroc"]) <= 1.0
    env = json.loads((tmp_path / "pneu" / "environment.json").read_text())
    assert env["data"]["counts"] == {"train": 256, "val": 524, "test": 624}


def test_unreadable_file_is_skipped_and_listed(tmp_path):
    """A corrupt image in a manifest is skipped with its reason; the run goes on and lists it."""
    manifest = generate(tmp_path / "ph", 2, PhantomSpec(n_patients=12, images_per_patient=1, size_2d=32, seed=5))
    (manifest.parent / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with open(manifest, "a") as fh:
        fh.write("images/broken.png,,1,PX,S0,xray\n")
    args = ["pretrain", *TINY, "data.source=manifest", f"data.path={manifest}", "data.val_fraction=0.2",
            f"run.out_dir={tmp_path}/runs", "run.name=skip", "pretrain.epochs=1"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "runs" / "skip" / "skipped.csv")))
    assert len(rows) == 1 and rows[0]["file"].endswith("broken.png") and rows[0]["reason"]
    assert (tmp_path / "runs" / "skip" / "encoder.safetensors").exists()
