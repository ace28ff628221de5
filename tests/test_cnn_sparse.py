"""CNN encoders (2D/3D) and the two masked backends: shapes, dense == sparse, masked semantics.

Backend equivalence is checked in float64 to 1e-9 relative (both backends compute the same sums
in a different order; in float64 they agree to ~1e-14), and once in float32 to 2e-3 relative: in
float32 the summation-order noise (~1e-6) is amplified by the train-mode batch norms of a deep
net (per-parameter gradients of ResNet-50 differ by up to a few 1e-2 on random losses), so the
strict check is the float64 one.
"""

from __future__ import annotations

import pytest
import torch

from medmim.masking import random_mask
from medmim.models.cnn import build_cnn
from medmim.models.export import export_encoder, load_encoder_weights
from medmim.models.sparse import MaskPlan

torch.set_num_threads(2)

# name, spatial_dims, image size, builder options: tiny nets with >= 8 coarse cells per sample
CASES = [
    ("resnet18", 2, 64, {}),
    ("resnet18", 3, 16, {"small_input": True}),
    ("resnet50", 2, 64, {}),
    ("resnet50", 3, 16, {"small_input": True}),
    ("convnext_tiny", 2, 64, {"depths": (1, 1, 2, 1)}),
    ("convnext_tiny", 3, 16, {"depths": (1, 1, 1, 1), "kernel_size": 3, "small_input": True}),
]
IDS = [f"{n}-{d}d" for n, d, _, _ in CASES]


def tiny(name, d, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return build_cnn(name, spatial_dims=d, base_channels=4, **kw).to(dtype)


def inputs(enc, size, batch=2, ratio=0.6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *[size] * enc.spatial_dims, generator=g, dtype=dtype)
    grid = (size // enc.downsample_ratio,) * enc.spatial_dims
    return x, random_mask(batch, grid, ratio, generator=g)


def forward_backward(enc, x, mask, backend, kernel="torch"):
    """Features and parameter gradients of a fixed random projection of all feature maps."""
    enc.zero_grad(set_to_none=True)
    feats = enc(x, mask, backend=backend, kernel=kernel)
    g = torch.Generator().manual_seed(1)
    loss = sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in feats)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    return [f.detach() for f in feats], grads


def max_rel(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "convnext_tiny"])
def test_output_shapes(name, d):
    kw = {"depths": (1, 1, 1, 1)} if name == "convnext_tiny" else {}
    enc = build_cnn(name, spatial_dims=d, base_channels=4, **kw)
    assert enc.spatial_dims == d and enc.in_channels == 1 and enc.downsample_ratio == 32
    x = torch.randn(2, 1, *[32] * d)
    feats = enc(x)
    assert len(feats) == len(enc.feature_channels) == 4
    for i, (f, c) in enumerate(zip(feats, enc.feature_channels)):
        assert f.shape == (2, c, *[32 // (4 * 2 ** i)] * d)
    assert feats[-1].shape[2:] == (1,) * d  # the coarsest map is the mask grid


def test_channel_widths_and_small_input():
    assert build_cnn("resnet18").feature_channels == [64, 128, 256, 512]
    assert build_cnn("resnet50").feature_channels == [256, 512, 1024, 2048]
    assert build_cnn("convnext_tiny").feature_channels == [96, 192, 384, 768]
    small = build_cnn("resnet18", base_channels=4, small_input=True, num_stages=3)
    assert small.downsample_ratio == 4 and small.feature_channels == [4, 8, 16]
    feats = small(torch.randn(2, 1, 28, 28))  # MedMNIST size: a 7x7 grid
    assert [tuple(f.shape[2:]) for f in feats] == [(28, 28), (14, 14), (7, 7)]
    with pytest.raises(ValueError, match="divisible"):
        small(torch.randn(1, 1, 30, 30))
    with pytest.raises(ValueError, match="unknown CNN"):
        build_cnn("resnet34")


@pytest.mark.parametrize("name,d,size,kw", CASES, ids=IDS)
def test_backends_equal_forward_and_backward(name, d, size, kw):
    enc = tiny(name, d, **kw)
    x, mask = inputs(enc, size)
    dense, g_dense = forward_backward(enc, x, mask, "dense")
    sparse, g_sparse = forward_backward(enc, x, mask, "sparse")
    for a, b in zip(dense, sparse):
        assert a.shape == b.shape
        assert max_rel(a, b) < 1e-9
    assert set(g_dense) == set(g_sparse) == {n for n, _ in enc.named_parameters()}
    for key in g_dense:
        assert max_rel(g_dense[key], g_sparse[key]) < 1e-9, key


def test_backends_equal_running_stats():
    enc = tiny("resnet18", 2)
    x, mask = inputs(enc, 64)
    enc(x, mask, backend="dense")
    dense_stats = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k}
    enc.load_state_dict(tiny("resnet18", 2).state_dict())
    enc(x, mask, backend="sparse")
    for k, v in dense_stats.items():
        assert max_rel(v, enc.state_dict()[k]) < 1e-9, k


def test_backends_equal_float32():
    for name, kw in [("resnet18", {}), ("convnext_tiny", {"depths": (1, 1, 2, 1)})]:
        enc = tiny(name, 2, dtype=torch.float32, **kw)
        x, mask = inputs(enc, 64, batch=4, dtype=torch.float32)
        dense, g_dense = forward_backward(enc, x, mask, "dense")
        sparse, g_sparse = forward_backward(enc, x, mask, "sparse")
        for a, b in zip(dense, sparse):
            assert max_rel(a, b) < 2e-3
        for key in g_dense:
            assert max_rel(g_dense[key], g_sparse[key]) < 2e-3, (name, key)


def test_spconv_kernels_match():
    """kernel='spconv' (spconv's own conv kernels; CPU: single-threaded, patched backward)."""
    enc = tiny("resnet18", 3, small_input=True)
    x, mask = inputs(enc, 16)
    dense, g_dense = forward_backward(enc, x, mask, "dense")
    sparse, g_sparse = forward_backward(enc, x, mask, "sparse", kernel="spconv")
    for a, b in zip(dense, sparse):
        assert max_rel(a, b) < 1e-9
    for key in g_dense:
        assert max_rel(g_dense[key], g_sparse[key]) < 1e-9, key


@pytest.mark.parametrize("kernel", ["torch", "spconv"])
@pytest.mark.parametrize("name,d,size,kw", [
    ("resnet18", 3, 64, {}),  # standard 3D stem: 7^3 stride-2 conv + 3^3 stride-2 max-pool
    ("convnext_tiny", 3, 16, {"depths": (1, 1, 1, 1), "kernel_size": 3, "small_input": True}),
], ids=["resnet18-3d-stem", "convnext_tiny-3d"])
def test_sparse_kernels_equal_masked_dense(name, d, size, kw, kernel):
    """Both kernels: 'torch' (a dense conv per visible cell plus halo; the default) and 'spconv'
    (spconv's rulebooks and conv kernels for regular convs) equal masked-dense, forward and
    backward, in float64, on a strided 7^3 stem + max-pool and on depthwise ConvNeXt blocks."""
    enc = tiny(name, d, **kw)
    x, mask = inputs(enc, size, batch=2 if size < 64 else 1, ratio=0.5)
    dense, g_dense = forward_backward(enc, x, mask, "dense")
    sparse, g_sparse = forward_backward(enc, x, mask, "sparse", kernel=kernel)
    for a, b in zip(dense, sparse):
        assert max_rel(a, b) < 1e-9
    assert set(g_dense) == set(g_sparse)
    for key in g_dense:
        assert max_rel(g_dense[key], g_sparse[key]) < 1e-9, key


def test_sites_are_cell_major():
    """Each visible cell's sites are consecutive rows (what the block kernel's views rely on)."""
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, True]]])
    plan = MaskPlan(mask, 4, 2)
    for stride, b in [(1, 4), (2, 2), (4, 1)]:
        indices, lookup = plan.sites(stride)
        cells = indices[:, 1:].long() // b
        per_cell = torch.cat([indices[:, :1].long(), cells], 1).view(-1, b * b, 3)
        assert (per_cell == per_cell[:, :1]).all()  # one cell per group of b^2 rows
        assert torch.equal(per_cell[:, 0], (~mask).nonzero())  # cells in row-major order
        assert torch.equal(lookup[tuple(indices.long().T)], torch.arange(indices.shape[0]))
        assert (lookup >= 0).sum() == indices.shape[0]


@pytest.mark.parametrize("backend", ["dense", "sparse"])
@pytest.mark.parametrize("name,d,size,kw", [CASES[0], CASES[5]], ids=[IDS[0], IDS[5]])
def test_hidden_sites_are_exactly_zero(name, d, size, kw, backend):
    enc = tiny(name, d, **kw)
    x, mask = inputs(enc, size)
    plan = MaskPlan(mask, enc.downsample_ratio, d)
    feats = enc(x, mask, backend=backend)
    for f, s in zip(feats, enc.feature_strides):
        hidden = ~plan.active(s).unsqueeze(1).expand_as(f)
        assert hidden.any() and (~hidden).any()
        assert torch.all(f[hidden] == 0)
        assert f[~hidden].abs().sum() > 0


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_hidden_inputs_and_norm_statistics_ignored(backend):
    """Changing pixels under the mask changes nothing (batch-norm statistics included), while
    changing a visible pixel does change the output (train mode: batch statistics)."""
    enc = tiny("resnet18", 2)
    x, mask = inputs(enc, 64)
    hidden_px = MaskPlan(mask, 32, 2).active(1).logical_not().unsqueeze(1)
    ref = enc(x, mask, backend=backend)
    noisy = torch.where(hidden_px, 100.0 * torch.randn_like(x) + 50.0, x)
    for a, b in zip(ref, enc(noisy, mask, backend=backend)):
        assert torch.equal(a, b)
    shifted = torch.where(hidden_px, x, x + 1.0)
    assert not torch.allclose(ref[-1], enc(shifted, mask, backend=backend)[-1])


def test_all_visible_mask_equals_unmasked():
    enc = tiny("resnet18", 2)
    x, _ = inputs(enc, 64)
    none = torch.zeros(2, 2, 2, dtype=torch.bool)
    for backend in ("dense", "sparse"):
        for a, b in zip(enc(x), enc(x, none, backend=backend)):
            assert max_rel(a, b) < 1e-9


def test_eval_mode_and_bad_mask():
    enc = tiny("resnet18", 2).eval()
    x, mask = inputs(enc, 64)
    dense = enc(x, mask, backend="dense")
    sparse = enc(x, mask, backend="sparse")
    assert all(max_rel(a, b) < 1e-9 for a, b in zip(dense, sparse))
    with pytest.raises(ValueError, match="mask"):
        enc(x, torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        enc(x, mask, backend="gpu")
    for backend in ("dense", "sparse"):  # nothing visible: a clear error, not an empty batch norm
        with pytest.raises(ValueError, match="hides all"):
            enc(x, torch.ones_like(mask), backend=backend)


def test_export_import_round_trip(tmp_path):
    for name, kw in [("resnet50", {}), ("convnext_tiny", {"depths": (1, 1, 1, 1)})]:
        enc = tiny(name, 3, dtype=torch.float32, **kw)
        x, mask = inputs(enc, 64, dtype=torch.float32)  # a 2^3 grid: some cells visible
        stats = {k: v.clone() for k, v in enc.state_dict().items() if k.endswith("running_mean")}
        enc(x, mask, backend="sparse")  # a masked training step moves the running stats
        assert all(not torch.equal(v, enc.state_dict()[k]) for k, v in stats.items())
        weights = export_encoder(enc, tmp_path / name, {"architecture": name, "pretext": "spark"})
        fresh = build_cnn(name, spatial_dims=3, base_channels=4, **kw)
        report = load_encoder_weights(fresh, weights, verbose=False)
        assert report.ok and len(report.matched) == len(enc.state_dict())
        enc.eval(), fresh.eval()
        with torch.no_grad():
            for a, b in zip(enc(x), fresh(x)):
                assert torch.equal(a, b)


def test_torch_kernel_needs_no_spconv():
    """The default sparse kernel holds plain torch rows and densifies them itself: it runs (and
    equals masked-dense) in a process where spconv cannot be imported."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, torch
        sys.modules["spconv"] = None  # any import of spconv now raises ImportError
        from medmim.masking import random_mask
        from medmim.models.cnn import build_cnn
        torch.manual_seed(0)
        enc = build_cnn("resnet18", spatial_dims=2, base_channels=4).double()
        x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
        mask = random_mask(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
        a = enc(x, mask, backend="dense")
        b = enc(x, mask, backend="sparse")
        print(max(float((u - v).abs().max()) for u, v in zip(a, b)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) < 1e-9
