"""The model card written beside an exported encoder: its facts checked against the files and the data."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml
from safetensors.torch import load_file

from medmim.config import Config, load_config
from medmim.eval.model_card import CARD_NAME, write_model_card
from medmim.train.setup import setup_run
from medmim.train.stages import pretrain_stage

SECRET = "DOE^JOHN-77"


def _cfg(tmp: Path) -> Config:
    raw = {
        "run": {"name": "card", "out_dir": str(tmp / "runs"), "seed": 0, "num_threads": 1, "tensorboard": False},
        "data": {"source": "phantoms", "image_size": 16,
                 "phantoms": {"out_dir": str(tmp / "ph"), "n_patients": 24, "images_per_patient": 1, "size_2d": 32}},
        "encoder": {"name": "vit_tiny", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
        "pretrain": {"epochs": 2, "batch_size": 8, "decoder_dim": 16, "decoder_depth": 1, "recon_every": 0},
    }
    path = tmp / "card.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _table(md: str, header: str) -> list[list[str]]:
    lines = md.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith(f"| {header} |"))
    rows = []
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def _facts(md: str, section: str) -> dict[str, str]:
    """The two-column fact table of a section."""
    block = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = block.split("| | |\n|---|---|\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {c[0]: c[1] for c in ([x.strip() for x in ln.strip("|").split("|", 1)] for ln in lines)}


def test_card_beside_exported_encoder(tmp_path):
    cfg = _cfg(tmp_path)
    run, data, runtime = setup_run(cfg)
    # a data card as a study records it, with identifying fields that must not reach the model card
    (run.path / "data_card.json").write_text(json.dumps({
        "name": "phantoms", "source": "medmim phantoms 2D", "modality": {"xray": 24}, "n_images": 24,
        "n_patients": 24, "patient_ids": [SECRET], "PatientName": SECRET, "label_names": {"0": "normal", "1": "lesion"},
        "size_histogram": {"32×32": 24}}))
    pre = run.child("pretrain-mae")
    weights = pretrain_stage(cfg, data, pre, runtime, log=lambda m: None)
    card = pre.path / CARD_NAME
    assert card.is_file() and weights.parent == card.parent
    md = card.read_text()
    assert SECRET not in md and "PatientName" not in md

    model = _facts(md, "Model")
    state = load_file(str(weights))
    assert model["parameters"] == f"{sum(t.numel() for t in state.values()):,}"
    assert model["weights SHA-256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert model["architecture"] == "vit_tiny" and model["spatial dims"] == "2"

    pre_facts = _facts(md, "Pretraining")
    recs = [json.loads(ln) for ln in (pre.path / "metrics.jsonl").read_text().splitlines()]
    assert pre_facts["pretext"] == "mae" and pre_facts["epochs"] == "2"
    assert pre_facts["first / last train loss"] == f"{recs[0]['train_loss']:.4g} / {recs[-1]['train_loss']:.4g}"
    assert int(pre_facts["images seen per epoch"]) == len(data.split("train")) + len(data.split("val"))

    data_facts = _facts(md, "Data")
    assert data_facts["source"] == "medmim phantoms 2D" and data_facts["test split in pretraining"] == "no"
    # per-split counts equal the data bundle's
    rows = {r[0]: r for r in _table(md, "split")}
    for split, recs_ in data.records.items():
        if recs_:
            assert int(rows[split][1]) == len(recs_)
            assert int(rows[split][2]) == len({r["patient_id"] for r in recs_})
            n1 = sum(1 for r in recs_ if r.get("label") == 1)
            header = md.splitlines()[next(i for i, ln in enumerate(md.splitlines()) if ln.startswith("| split |"))]
            col = [c.strip() for c in header.strip("|").split("|")].index("class 1 (lesion)")
            assert int(rows[split][col]) == n1
    assert re.search(r"\*\*Out of scope\*\*: clinical use", md)
    hw = _facts(md, "Hardware and time")
    assert hw["device"] == "cpu" and hw["precision"] == "fp32" and int(hw["torch threads"]) == 1
    # the embedded config is the run's resolved config
    block = md.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == cfg.model_dump(mode="json")


def test_card_without_data_or_weights_still_writes(tmp_path):
    cfg = Config()
    path = write_model_card(tmp_path, cfg)
    md = path.read_text()
    assert md.startswith("# Model card:") and "## Intended use" in md and "SHA-256" not in md
