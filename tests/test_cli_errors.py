"""Every user error in every verb: one line on stderr naming the file/key/row, exit status 2, no
traceback without -v; overrides may stand anywhere on the command line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmim import cli
from medmim.cli import build_parser, main, parse_args

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_overrides_anywhere_on_the_line():
    p = build_parser()
    a = parse_args(p, ["finetune", "-c", "demo", "--init", "w.safetensors", "finetune.epochs=3", "run.name=x"])
    assert a.init == "w.safetensors" and a.overrides == ["finetune.epochs=3", "run.name=x"]
    a = parse_args(p, ["finetune", "finetune.lr=1", "-c", "demo", "--resume", "finetune.epochs=3"])
    assert a.resume and a.config == "demo" and a.overrides == ["finetune.lr=1", "finetune.epochs=3"]
    a = parse_args(p, ["pretrain", "-c", "demo", "--resume", "pretrain.epochs=2", "-v"])
    assert a.resume and a.overrides == ["pretrain.epochs=2"] and a.verbose
    a = parse_args(p, ["data", "check", "-c", "demo", "--out", "s.csv", "data.image_size=16"])
    assert a.out == "s.csv" and a.overrides == ["data.image_size=16"]


def test_config_after_flag_applies(capsys):
    assert main(["config", "-c", "demo", "run.name=late"]) == 0
    assert "name: late" in capsys.readouterr().out


def test_unknown_argument_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "-c", "demo", "--bogus"])
    assert e.value.code == 2
    _one_line_error(capsys, "unrecognized arguments: --bogus", "medmim finetune")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--epochs", "3"])
    assert e.value.code == 2
    _one_line_error(capsys, "--epochs")


def test_config_errors_name_the_key(capsys, tmp_path):
    assert main(["config", "-c", "demo", "data.image_size=30"]) == 2
    _one_line_error(capsys, "data.image_size=30 is not divisible by encoder.patch_size=4")
    assert main(["config", "-c", "demo", "data.imagesize=30"]) == 2
    _one_line_error(capsys, "unknown key 'data.imagesize'", "did you mean 'image_size'")
    assert main(["config", "-c", str(tmp_path / "nope.yaml")]) == 2
    _one_line_error(capsys, "nope.yaml: config file not found")
    (tmp_path / "bad.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert main(["config", "-c", str(tmp_path / "bad.yaml")]) == 2
    _one_line_error(capsys, "bad.yaml")


def _manifest_cfg(tmp_path, path):
    return ["data.source=manifest", f"data.path={path}", f"run.out_dir={tmp_path / 'runs'}", "run.num_threads=1"]


def test_data_path_errors(capsys, tmp_path):
    (tmp_path / "folder").mkdir()
    assert main(["data", "check", *_manifest_cfg(tmp_path, tmp_path / "folder")]) == 2
    _one_line_error(capsys, "folder: is a folder, not a manifest file", "medmim data manifest --from folder")
    (tmp_path / "m.csv").write_bytes(bytes(range(256)) * 8)
    assert main(["data", "check", *_manifest_cfg(tmp_path, tmp_path / "m.csv")]) == 2
    _one_line_error(capsys, "m.csv: not a text manifest (binary content)")
    (tmp_path / "n.csv").write_text("file,label\na.png,0\n")
    assert main(["data", "check", *_manifest_cfg(tmp_path, tmp_path / "n.csv")]) == 2
    _one_line_error(capsys, "n.csv: manifest needs an 'image' column (found: file, label)")
    (tmp_path / "s.csv").write_text("image,label,split\na.png,0,training\n")
    assert main(["data", "check", *_manifest_cfg(tmp_path, tmp_path / "s.csv")]) == 2
    _one_line_error(capsys, "s.csv: row 2: split 'training' is not train, val or test")
    assert main(["data", "check", "data.source=medmnist", f"data.path={tmp_path / 'folder'}"]) == 2
    _one_line_error(capsys, "folder")
    assert main(["finetune", *_manifest_cfg(tmp_path, tmp_path / "m.csv"), "--init", "scratch"]) == 2
    _one_line_error(capsys, "m.csv: not a text manifest")
    assert not list((tmp_path / "runs").rglob("*.pt"))


def test_card_and_manifest_errors(capsys, tmp_path):
    (tmp_path / "m.csv").write_bytes(b"\x00\x01\x02")
    assert main(["data", "card", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "m.csv: not a text manifest")
    assert main(["data", "manifest", "--from", "folder", str(tmp_path / "none"), "--out", str(tmp_path / "o.csv")]) == 2
    _one_line_error(capsys, "none: folder not found")
    assert main(["data", "manifest", "--from", "folder", str(tmp_path), "--out", str(tmp_path / "o.txt")]) == 2
    _one_line_error(capsys, "o.txt: --out must end in .csv or .jsonl")
    assert main(["data", "manifest", "--from", "folder", str(tmp_path), "--out", str(tmp_path / "o.csv"),
                 "--split-dirs", "Training=training"]) == 2
    _one_line_error(capsys, "--split-dirs: 'Training=training'")


def test_unexpected_failure_is_one_line_and_v_shows_traceback(capsys, monkeypatch):
    def boom(args):
        raise TypeError("something broke")

    monkeypatch.setitem(cli.COMMANDS, "config", boom)
    assert main(["config"]) == 1
    _one_line_error(capsys, "internal error: TypeError: something broke", "-v")
    assert main(["-v", "config"]) == 1
    assert "Traceback" in capsys.readouterr().err

    def missing(args):
        raise FileNotFoundError(2, "No such file or directory", "/x/weights.safetensors")

    monkeypatch.setitem(cli.COMMANDS, "config", missing)
    assert main(["config"]) == 2
    _one_line_error(capsys, "/x/weights.safetensors: No such file or directory")


def test_no_traceback_in_a_real_process(tmp_path):
    """The installed entry point, as a user runs it: a bad manifest, a label out of range."""
    img = tmp_path / "a.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(img)
    Image.fromarray(np.eye(8, dtype=np.uint8) * 200).save(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text("image,label,split\na.png,0,train\nb.png,5,test\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "medmim.cli", "data", "check", "data.source=manifest",
                           f"data.path={tmp_path / 'm.csv'}", "data.num_classes=2", "run.num_threads=1",
                           f"run.out_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "m.csv row 3 (" in proc.stderr and "b.png): label 5 is out of range; expected 0..1" in proc.stderr
