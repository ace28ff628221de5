"""SparK pretext: outputs, masked-only loss, backends agree, and it learns on real X-rays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmim.models.cnn import build_cnn
from medmim.models.patches import upsample_mask
from medmim.models.spark import SparK

torch.set_num_threads(2)
DATASETS = Path(__file__).resolve().parents[2] / "shared/datasets"
PNEUMONIA = DATASETS / "pneumoniamnist/pneumoniamnist_28.npz"


def tiny_spark(d=2, backend="sparse", **kw):
    torch.manual_seed(0)
    enc = build_cnn("resnet18", spatial_dims=d, base_channels=8, small_input=True, num_stages=3)
    return SparK(enc, backend=backend, decoder_width=32, **kw)


@pytest.mark.parametrize("d,size", [(2, 28), (3, 16)])
def test_outputs_and_visible_cells_pasted_back(d, size):
    model = tiny_spark(d)
    x = torch.randn(2, 1, *[size] * d)
    out = model(x, generator=torch.Generator().manual_seed(0))
    grid = (size // 4,) * d
    assert out["mask"].shape == (2, *grid) and out["mask"].dtype == torch.bool
    assert out["mask"].flatten(1).sum(1).tolist() == [round(0.6 * np.prod(grid))] * 2
    assert out["recon"].shape == x.shape
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    visible = ~upsample_mask(out["mask"], 4).unsqueeze(1)
    assert torch.equal(out["recon"][visible], x[visible])
    assert not torch.allclose(out["recon"][~visible], x[~visible])
    out["loss"].backward()
    assert model.mask_tokens[0].grad is not None and model.encoder.conv1.weight.grad.abs().sum() > 0


def test_loss_counts_hidden_cells_only():
    """Without norm-pix, the loss is exactly the pixel MSE over hidden cells only."""
    model = tiny_spark(2, norm_pix_loss=False).eval()
    x = torch.rand(2, 1, 28, 28)
    mask = torch.zeros(2, 7, 7, dtype=torch.bool)
    mask[:, :4] = True
    visible_px = ~upsample_mask(mask, 4).unsqueeze(1)
    with torch.no_grad():
        a = model(x, mask)["loss"]
        pred = model.decode(model.densify(model.encoder(x, mask, backend="sparse"), mask))
        per_px = (pred - x) ** 2
        manual = per_px[~visible_px].mean()
    assert torch.allclose(a, manual, rtol=1e-5)


def test_norm_pix_targets_and_backend_equivalence():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    mask = torch.rand(4, 7, 7) < 0.6
    outs = {}
    for backend in ("dense", "sparse"):
        model = tiny_spark(2, backend=backend).double()
        out = model(x.double(), mask)
        out["loss"].backward()
        outs[backend] = (out["loss"].detach(), out["recon"],
                         {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (ld, rd, gd), (ls, rs, gs) = outs["dense"], outs["sparse"]
    assert torch.allclose(ld, ls, rtol=1e-10) and torch.allclose(rd, rs, atol=1e-10)
    assert gd.keys() == gs.keys()
    for k in gd:
        assert torch.allclose(gd[k], gs[k], rtol=1e-8, atol=1e-12), k


def test_rejects_bad_settings():
    enc = build_cnn("resnet18", base_channels=4)
    with pytest.raises(ValueError, match="backend"):
        SparK(enc, backend="cuda")
    with pytest.raises(ValueError, match="mask_ratio"):
        SparK(enc, mask_ratio=1.0)
    with pytest.raises(ValueError, match="divisible"):
        SparK(enc, decoder_width=16)(torch.randn(1, 1, 40, 40))


def test_loss_goes_down_on_pneumoniamnist():
    if not PNEUMONIA.exists():
        pytest.skip(f"PneumoniaMNIST not found at {PNEUMONIA}")
    images = np.load(PNEUMONIA)["train_images"][:512]
    x_all = torch.from_numpy(images).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    model = tiny_spark(2, backend="sparse")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    held = x_all[:64]
    held_mask = model.mask_generator(64, (7, 7), generator=torch.Generator().manual_seed(123))

    def held_loss():
        model.eval()
        with torch.no_grad():
            loss = model(held, held_mask)["loss"].item()
        model.train()
        return loss

    before = held_loss()
    g = torch.Generator().manual_seed(0)
    for step in range(25):
        batch = x_all[64 + (step * 32) % 448:][:32]
        loss = model(batch, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert after < 0.95 * before, (before, after)  # norm-pix loss starts near 1.0; 25 steps: ~0.87
