"""Safe loading: a checkpoint whose pickle would run code is refused on every public load path, and
the code never runs; corrupted and truncated checkpoints are refused with a clear error."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from medmim.cli import main
from medmim.errors import MedmimError, UnsafeCheckpointError
from medmim.io import sha256_file
from medmim.models.export import export_encoder, load_encoder_weights, load_state
from medmim.io import safe_torch_load, save_checkpoint

from conftest import REPO, TINY


class OpensAFile:
    """Unpickling this calls open(path, "w"): it would create the marker file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsAShellCommand:
    """Unpickling this calls os.system("touch path")."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _malicious(tmp_path: Path, kind: str, name: str = "evil.pt") -> tuple[Path, Path]:
    marker = tmp_path / f"PWNED-{kind}"
    payload = OpensAFile(marker) if kind == "open" else RunsAShellCommand(marker)
    # it looks like a real checkpoint: a state dict plus the payload
    obj = {"model": {"weight": torch.zeros(2, 2)}, "optimizer": {}, "epoch": 0, "extra": payload}
    path = tmp_path / name
    torch.save(obj, path)
    assert not marker.exists()
    return path, marker


@pytest.fixture(params=["open", "system"])
def evil(tmp_path, request):
    return _malicious(tmp_path, request.param)


def test_the_payload_is_real(tmp_path):
    """Guard against a vacuous test: an unsafe torch.load really would run the payload."""
    path, marker = _malicious(tmp_path, "open")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_safe_torch_load_refuses(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match="refused to load: it carries a pickle payload"):
        safe_torch_load(path)
    assert not marker.exists()


def test_sidecar_does_not_whitelist_a_payload(evil):
    """An attacker who also writes a matching .sha256 gains nothing: the checksum is about
    corruption, weights_only is about code."""
    path, marker = evil
    path.with_name(path.name + ".sha256").write_text(sha256_file(path) + "\n")
    with pytest.raises(UnsafeCheckpointError, match="pickle payload"):
        safe_torch_load(path)
    assert not marker.exists()


def test_load_encoder_weights_refuses(evil):
    path, marker = evil
    from medmim.models import build_encoder

    enc = build_encoder("vit_tiny", spatial_dims=2, in_channels=1, img_size=16, patch_size=4, embed_dim=32,
                        depth=1, num_heads=2)
    with pytest.raises(MedmimError, match="pickle payload"):
        load_encoder_weights(enc, path)
    with pytest.raises(MedmimError, match="pickle payload"):
        load_state(path)
    try:
        from medmim.models.monai_compat import load_init_weights
    except ImportError:
        load_init_weights = None
    if load_init_weights is not None:
        with pytest.raises(MedmimError, match="pickle payload"):
            load_init_weights(enc, path)
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_refused(tmp_path):
    path, marker = _malicious(tmp_path, "open", name="encoder.safetensors")
    with pytest.raises(MedmimError, match="not a readable safetensors file"):
        load_state(path)
    assert not marker.exists()


def _tiny(tmp_path: Path, name: str = "t") -> list[str]:
    return [f"run.out_dir={tmp_path / 'runs'}", f"data.phantoms.out_dir={tmp_path / 'data'}", f"run.name={name}",
            "run.device=cpu", "finetune.bootstrap=0", *TINY]


def _cli_refuses(args: list[str], capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("medmim: error: ")
    return err


def test_cli_finetune_init_refuses(evil, tmp_path, capsys):
    path, marker = evil
    err = _cli_refuses(["finetune", "--init", str(path), *_tiny(tmp_path)], capsys)
    assert "pickle payload" in err and str(path) in err
    assert not marker.exists()


def test_cli_resume_refuses_a_malicious_last_checkpoint(evil, tmp_path, capsys):
    path, marker = evil
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(path, ckpts / "last.pt")
    err = _cli_refuses(["pretrain", "--resume", *_tiny(tmp_path)], capsys)
    assert "pickle payload" in err and "last.pt" in err
    ft = tmp_path / "runs" / "t" / "finetune" / "checkpoints"
    ft.mkdir(parents=True)
    shutil.copy(path, ft / "last.pt")
    err = _cli_refuses(["finetune", "--resume", "--init", "scratch", *_tiny(tmp_path)], capsys)
    assert "pickle payload" in err
    assert not marker.exists()


def test_cli_evaluate_refuses_a_malicious_best_checkpoint(evil, tmp_path, capsys):
    path, marker = evil
    run_dir = tmp_path / "victim"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run_dir / "checkpoints" / "best.pt")
    # a run as training leaves it (evaluate reads the run's own config and recorded preset)
    from medmim.config import dump_config, load_config

    (run_dir / "config.yaml").write_text(dump_config(load_config(None, _tiny(tmp_path))))
    (run_dir / "environment.json").write_text('{"data": {"preset": "uint8"}}')
    err = _cli_refuses(["evaluate", str(run_dir)], capsys)
    assert "pickle payload" in err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# corrupted and truncated checkpoints


def _good(tmp_path: Path) -> Path:
    obj = {"model": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "epoch": 3, "step": 7}
    return save_checkpoint(obj, tmp_path / "checkpoints" / "last.pt")


def test_round_trip_and_sidecar(tmp_path):
    path = _good(tmp_path)
    side = path.with_name("last.pt.sha256")
    assert side.read_text().split() == [sha256_file(path)]
    assert safe_torch_load(path)["step"] == 7
    assert not list(path.parent.glob(".*.tmp"))


def test_corrupted_checkpoint_is_refused(tmp_path):
    path = _good(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(UnsafeCheckpointError, match="checksum mismatch .* corrupt, truncated or was modified"):
        safe_torch_load(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = _good(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UnsafeCheckpointError, match="checksum mismatch"):
        safe_torch_load(path)
    # without a sidecar (e.g. a file from elsewhere) the reader still refuses it, clearly
    path.with_name("last.pt.sha256").unlink()
    with pytest.raises(UnsafeCheckpointError, match="not a readable checkpoint"):
        safe_torch_load(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match="checkpoint not found"):
        safe_torch_load(tmp_path / "nope.pt")


def test_truncated_safetensors_is_refused(tmp_path):
    from medmim.models import build_encoder

    enc = build_encoder("vit_tiny", spatial_dims=2, in_channels=1, img_size=16, patch_size=4, embed_dim=32,
                        depth=1, num_heads=2)
    weights = export_encoder(enc, tmp_path, {"architecture": "vit_tiny"})
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(MedmimError, match="not a readable safetensors file"):
        load_state(weights)


def test_every_loader_in_the_package_is_safe():
    """Static guard: torch.load only in medmim/io.py (weights_only=True); no pickle / allow_pickle."""
    offenders = []
    for py in list((REPO / "medmim").rglob("*.py")) + list((REPO / "pipelines").rglob("*.py")):
        text = py.read_text()
        rel = py.relative_to(REPO).as_posix()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if rel != "medmim/io.py" or "weights_only=True" not in m.group(1):
                offenders.append(f"{rel}: {m.group(0)}")
        for bad in ("pickle.load(", "pickle.loads(", "allow_pickle=True", "joblib.load(", "dill.load("):
            if bad in text:
                offenders.append(f"{rel}: {bad}")
    assert not offenders, offenders


@pytest.mark.parametrize("cut_at", [1, 2, 3])
def test_every_step_of_a_checkpoint_write_leaves_a_loadable_pair(tmp_path, monkeypatch, cut_at):
    """save_checkpoint renames three times (sidecar with both hashes, the file, sidecar with the new
    hash). A process dying before any of them leaves the old or the new checkpoint, and its checksum
    still matches. (test_fault_injection.py does the same with real SIGKILLs at random moments.)"""
    path = save_checkpoint({"v": torch.tensor(1)}, tmp_path / "last.pt")
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == cut_at:
            raise SystemExit("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(SystemExit):
        save_checkpoint({"v": torch.tensor(2)}, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert int(safe_torch_load(path)["v"]) == (2 if cut_at == 3 else 1)
    save_checkpoint({"v": torch.tensor(3)}, path)  # and the next write works normally
    assert int(safe_torch_load(path)["v"]) == 3
    assert path.with_name("last.pt.sha256").read_text().split() == [sha256_file(path)]
