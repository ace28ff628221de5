from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"

torch.set_num_threads(2)


@pytest.fixture
def shared_datasets() -> Path:
    return SHARED


def require_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared dataset not found: {path}")
    return path


# tiny settings that make any pipeline run in seconds
TINY = [
    "data.phantoms.n_patients=24", "data.phantoms.size_2d=32", "data.image_size=16",
    "encoder.embed_dim=32", "encoder.depth=1", "encoder.num_heads=2", "encoder.patch_size=4",
    "pretrain.decoder_dim=16", "pretrain.decoder_depth=1", "pretrain.epochs=2", "pretrain.batch_size=16",
    "finetune.epochs=2", "finetune.batch_size=8", "study.seeds=[0]",
    "data.phantoms.pool_patients=0",  # the demo's 1000-patient pool is tested in tests/test_pool.py
]
