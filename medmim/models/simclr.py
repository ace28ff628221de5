"""SimCLR (Chen et al. 2020): a contrastive baseline pretext for any Encoder, 2D or 3D.

Two augmented views of every image in the batch go through the encoder (coarsest feature map,
global average pool) and a projection MLP; the NT-Xent loss pulls the two views of one image
together and pushes every other image in the (global) batch away.

The views are made *inside* the module, on the batch tensor, so SimCLR works with any loader.
Medical augmentations, no ImageNet assumptions (no colour jitter, no flips: laterality matters in
chest radiographs and CT):

* random resized crop, area 0.5-1.0 of the image, aspect ratio 3/4-4/3, resized back to the input
  size, with a small rotation (up to ±10°) in the same warp: one batched affine resample through
  MONAI's ``AffineTransform`` (2D and 3D; in 3D the rotation is in the first two axes);
* intensity jitter: contrast (×0.8-1.2 about the image mean) and brightness (±0.1 image std), drawn
  per channel (each sequence of a multi-channel image on its own); the geometry is shared by all
  channels (they are one anatomy);
* gaussian noise (p=0.5, σ up to 0.05 image std) and gaussian blur (p=0.3, σ 0.1-1.0 pixel, MONAI's
  ``GaussianFilter``).

MONAI's per-sample array transforms (RandScaleCrop, RandRotate, ...) cost ~28 ms per 32×32 image
on a 2-core CPU, more than the network itself, so the same operations run batched here through
MONAI's network layers.

Randomness comes from the ``generator`` argument or, without one, the global torch RNG, which the
training loop seeds and checkpoints: a resumed run draws the same views.

Under DDP the embeddings of all ranks are gathered with an autograd-aware all-gather, so the
negatives are the global batch (as in the paper), and gradients flow back to every rank's encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medmim.models.heads import global_pool


# ---- distributed ----------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        chunks = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, t.contiguous())
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped ``t`` across DDP ranks (rank order), keeping the autograd graph.

    In backward, each rank receives the sum over ranks of the gradient for its own rows (each
    rank's loss used them as negatives), which DDP's gradient averaging then turns into the
    gradient of the global-batch loss. Without a process group this is ``t``.
    (``medmim.train.distributed.all_gather_cat`` has no autograd: it is for metrics.)
    """
    _rank, world = _dist_info()
    if world == 1:
        return t
    return _GatherWithGrad.apply(t)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent over the global batch; returns (loss, top-1 accuracy of finding the positive).

    ``z1``, ``z2``: ``(B, D)`` projections of the two views of this rank's ``B`` images (any norm;
    they are L2-normalised here). Every local anchor (2B of them) is scored against the 2·B·W
    gathered embeddings of all ``W`` ranks, itself excluded; its positive is the other view of the
    same image. The loss is the mean over local anchors, so averaging over ranks (DDP) gives the
    loss of the whole global batch.
    """
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    b = z1.shape[0]
    rank, _world = _dist_info()
    a1, a2 = gather_with_grad(z1), gather_with_grad(z2)
    n_all = a1.shape[0]
    candidates = torch.cat([a1, a2], dim=0)  # (2N, D): first views of all images, then second views
    anchors = torch.cat([z1, z2], dim=0)  # (2B, D)
    logits = anchors @ candidates.t() / temperature  # (2B, 2N)
    local = torch.arange(b, device=z1.device) + rank * b  # this rank's rows in the gathered set
    self_idx = torch.cat([local, local + n_all])
    pos_idx = torch.cat([local + n_all, local])
    rows = torch.arange(2 * b, device=z1.device)
    logits = logits.masked_fill(
        torch.zeros_like(logits, dtype=torch.bool).index_put_((rows, self_idx), torch.tensor(True, device=z1.device)),
        float("-inf"))
    loss = F.cross_entropy(logits, pos_idx)
    acc = (logits.argmax(1) == pos_idx).float().mean()
    return loss, acc.detach()


# ---- augmentation -----------------------------------------------------------------------------------
class MedicalViews(nn.Module):
    """Batched random medical augmentations of ``(B, C, *spatial)`` images (see module doc)."""

    def __init__(self, spatial_dims: int, crop_scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 max_rotation: float = math.radians(10), contrast: float = 0.2, brightness: float = 0.1,
                 noise_prob: float = 0.5, noise_std: float = 0.05, blur_prob: float = 0.3,
                 blur_sigma=(0.1, 1.0)):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.crop_scale, self.ratio, self.max_rotation = crop_scale, ratio, max_rotation
        self.contrast, self.brightness = contrast, brightness
        self.noise_prob, self.noise_std = noise_prob, noise_std
        self.blur_prob, self.blur_sigma = blur_prob, blur_sigma

    @staticmethod
    def _uniform(n: int, lo: float, hi: float, generator) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def affine(self, b: int, generator=None) -> torch.Tensor:
        """``(B, d, d+1)`` normalised affine matrices: crop box scale + offset, then a rotation."""
        d = self.spatial_dims
        area = self._uniform(b, *self.crop_scale, generator)
        log_r = self._uniform(b, math.log(self.ratio[0]), math.log(self.ratio[1]), generator)
        # side scales whose product is the area fraction; the aspect ratio skews the first two axes
        base = area ** (1.0 / d)
        scales = base[:, None].repeat(1, d)
        scales[:, 0] = base * torch.exp(log_r / 2)
        scales[:, 1] = base * torch.exp(-log_r / 2)
        scales = scales.clamp(max=1.0)
        offset = (torch.rand(b, d, generator=generator) * 2 - 1) * (1 - scales)
        angle = self._uniform(b, -self.max_rotation, self.max_rotation, generator)
        rot = torch.eye(d).repeat(b, 1, 1)
        c, s = torch.cos(angle), torch.sin(angle)
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = c, -s, s, c
        mat = rot @ torch.diag_embed(scales)
        return torch.cat([mat, offset[..., None]], dim=2)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        from monai.networks.layers import AffineTransform, GaussianFilter

        b, d = x.shape[0], self.spatial_dims
        dims = tuple(range(2, x.ndim))
        theta = self.affine(b, generator).to(x.device, torch.float32)
        warp = AffineTransform(normalized=True, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = warp(x.float(), theta, spatial_size=tuple(x.shape[2:]))
        # intensity jitter, scaled to each image's own statistics (no fixed intensity range assumed)
        mean = out.mean(dim=dims, keepdim=True)
        std = out.std(dim=dims, keepdim=True).clamp_min(1e-6)
        shape = (b,) + (1,) * (x.ndim - 1)
        # one contrast and brightness draw per channel: the sequences of a multi-channel image vary
        # independently (with one channel these are the draws of a grayscale image)
        per_channel = (b, x.shape[1]) + (1,) * (x.ndim - 2)
        n = b * x.shape[1]
        gain = self._uniform(n, 1 - self.contrast, 1 + self.contrast, generator).view(per_channel).to(x.device)
        shift = self._uniform(n, -self.brightness, self.brightness, generator).view(per_channel).to(x.device)
        out = (out - mean) * gain + mean + shift * std
        # gaussian noise
        noisy = (torch.rand(b, generator=generator) < self.noise_prob).view(shape).to(x.device)
        sigma_n = self._uniform(b, 0.0, self.noise_std, generator).view(shape).to(x.device)
        noise = torch.randn(out.shape, generator=generator).to(x.device)
        out = torch.where(noisy, out + noise * sigma_n * std, out)
        # gaussian blur, one sigma per blurred image
        blur = torch.rand(b, generator=generator) < self.blur_prob
        sigmas = self._uniform(b, *self.blur_sigma, generator)
        if blur.any():
            out = out.clone()
            for i in torch.nonzero(blur).flatten().tolist():
                filt = GaussianFilter(d, float(sigmas[i])).to(x.device)
                out[i:i + 1] = filt(out[i:i + 1])
        return out.to(x.dtype)


# ---- the pretext --------------------------------------------------------------------------------------
class SimCLR(nn.Module):
    """SimCLR around any Encoder (docs/contracts.md): ``forward(x) -> {"loss", "accuracy"}``."""

    pretext_kind = "contrastive"  # not a masked-modelling pretext: no reconstruction grids

    def __init__(self, encoder: nn.Module, temperature: float = 0.2, proj_dim: int = 128,
                 hidden_dim: int | None = None, augment: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        dim = encoder.feature_channels[-1]
        hidden = hidden_dim or max(dim, proj_dim)
        self.projector = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, proj_dim))
        self.augment = augment if augment is not None else MedicalViews(encoder.spatial_dims)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projections ``(B, proj_dim)`` of (already augmented) images."""
        return self.projector(global_pool(self.encoder(x)[-1]))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if x.shape[0] < 2:
            raise ValueError("SimCLR needs at least 2 images per batch (the others are the negatives)")
        v1 = self.augment(x, generator)
        v2 = self.augment(x, generator)
        z = self.embed(torch.cat([v1, v2]))  # one pass: batch norm sees both views
        z1, z2 = z.chunk(2)
        loss, acc = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "accuracy": acc}
