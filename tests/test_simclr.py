"""SimCLR baseline pretext: NT-Xent against a reference, augmentations, 2D/3D, DDP gather."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from medmim.config import PretrainConfig
from medmim.models import build_encoder, build_pretext
from medmim.models.simclr import MedicalViews, SimCLR, nt_xent


def _reference_nt_xent(z1, z2, t):
    """The textbook loop: for each of the 2B anchors, softmax over the 2B-1 others."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z.shape[0]
    b = n // 2
    losses = []
    for i in range(n):
        pos = (i + b) % n
        sims = torch.stack([z[i] @ z[j] / t for j in range(n) if j != i])
        others = [j for j in range(n) if j != i]
        losses.append(-(sims[others.index(pos)] - torch.logsumexp(sims, 0)))
    return torch.stack(losses).mean()


def test_nt_xent_matches_reference():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    loss, acc = nt_xent(z1, z2, 0.2)
    assert torch.allclose(loss, _reference_nt_xent(z1, z2, 0.2), atol=1e-5)
    # identical views of well separated points: the positive is always found
    loss2, acc2 = nt_xent(torch.eye(4) * 3, torch.eye(4) * 3, 0.1)
    assert acc2.item() == 1.0 and loss2.item() < 0.1


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_views_shape_deterministic_and_different(spatial_dims):
    views = MedicalViews(spatial_dims)
    x = torch.rand(4, 1, *([16] * spatial_dims))
    a = views(x, torch.Generator().manual_seed(1))
    b = views(x, torch.Generator().manual_seed(1))
    c = views(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_crop_keeps_at_least_half_the_area():
    views = MedicalViews(2)
    theta = views.affine(256, torch.Generator().manual_seed(0))
    area = torch.det(theta[:, :, :2]).abs()
    assert area.min() >= 0.5 * 0.99 - 1e-6 and area.max() <= 1 + 1e-6
    # the crop box stays inside the image (before rotation): |offset| + scale <= 1
    assert (theta[:, :, 2].abs() <= 1).all()


def _tiny_vit():
    return build_encoder("vit_tiny", spatial_dims=2, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def test_simclr_2d_vit_trains():
    torch.manual_seed(0)
    model = SimCLR(_tiny_vit(), temperature=0.2, proj_dim=16)
    assert model.pretext_kind == "contrastive"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(8, 1, 16, 16)
    out = model(x)
    assert set(out) >= {"loss"} and out["loss"].ndim == 0
    out["loss"].backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    opt.step()


def test_simclr_3d_cnn_and_build_pretext():
    enc = build_encoder("resnet18", spatial_dims=3, base_channels=4, small_input=True, num_stages=2)
    model = build_pretext(PretrainConfig(method="simclr", temperature=0.5), enc)
    assert isinstance(model, SimCLR) and model.temperature == 0.5
    out = model(torch.rand(3, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_recon_preview_skips_contrastive(tmp_path):
    from medmim.train.loop import Runtime
    from medmim.train.stages import save_recon_preview

    model = SimCLR(_tiny_vit(), proj_dim=8)
    save_recon_preview(model, torch.rand(2, 1, 16, 16), tmp_path / "r.png", Runtime(torch.device("cpu"), None))
    assert not (tmp_path / "r.png").exists()


DDP_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from medmim.models.simclr import nt_xent
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=int(sys.argv[2]), world_size=2)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    # each rank holds half the batch; DDP averages gradients over ranks
    l1 = z1[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    l2 = z2[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    loss, _ = nt_xent(l1, l2, 0.3)
    loss.backward()
    grads = torch.cat([l1.grad, l2.grad]) / 2  # DDP's averaging
    out = [torch.zeros(1), torch.zeros(1)]
    dist.all_gather(out, loss.detach().reshape(1))
    gs = [torch.zeros_like(grads), torch.zeros_like(grads)]
    dist.all_gather(gs, grads)
    if rank == 0:
        torch.save({"loss": torch.cat(out).mean(), "grads": gs}, sys.argv[3])
    dist.barrier()  # no rank tears gloo down while the other still uses it
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_ddp_gather_gives_the_global_batch_loss_and_gradients(tmp_path):
    """Two gloo ranks, half the batch each: same loss and gradients as one process with all of it."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    init, result = tmp_path / "init", tmp_path / "out.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(worker), str(init), str(r), str(result)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-2000:]
    got = torch.load(result)
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=g).requires_grad_()
    z2 = torch.randn(6, 5, generator=g).requires_grad_()
    loss, _ = nt_xent(z1, z2, 0.3)
    loss.backward()
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-5)
    g0, g1 = got["grads"]
    ddp_z1 = torch.cat([g0[:3], g1[:3]])
    ddp_z2 = torch.cat([g0[3:], g1[3:]])
    assert torch.allclose(ddp_z1, z1.grad, atol=1e-5)
    assert torch.allclose(ddp_z2, z2.grad, atol=1e-5)
