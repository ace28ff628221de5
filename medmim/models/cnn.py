"""CNN encoders (ResNet-18/50, ConvNeXt-tiny) for 2D or 3D images, masked-aware for SparK.

Every backbone meets the Encoder contract (docs/contracts.md): ``forward(x, mask=None)`` returns
the output of each stage, finest first, and the module exposes ``spatial_dims``, ``in_channels``,
``feature_channels`` and ``downsample_ratio``.

The layers are thin wrappers that own ordinary torch parameters (conv weights ``(out, in,
*kernel)``, batch-norm / layer-norm affine and running stats) and route their arithmetic through
:mod:`medmim.models.sparse`. Without a mask they are plain dense ops. With a mask (a bool
``(B, *grid)`` on the coarsest grid, ``True`` = hidden) they run SparK's masked semantics through
the backend chosen by ``backend=`` (``"dense"``: masked-dense; ``"sparse"``: spconv on the visible
sites only); both give the same features and gradients from the same weights. Hidden sites of the
returned feature maps are zero.

Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0`` ...) and the official ConvNeXt (``downsample_layers``, ``stages``,
``dwconv``, ``pwconv1`` ...), so checkpoints read naturally.

Input sizes: spatial sizes must be divisible by ``downsample_ratio`` (32 for the standard
4-stage nets). For small images (MedMNIST 28x28) use ``small_input=True`` (stride-1 stem, no
max-pool; ratio 8) and ``num_stages=3`` (ratio 4: a 7x7 grid on 28x28).
"""

from __future__ import annotations

import torch
from torch import nn

from medmim.models import sparse as ms


# --------------------------------------------------------------------------------------------
# masked-aware layers
# --------------------------------------------------------------------------------------------

class Conv(nn.Module):
    """N-d convolution holding a torch-layout weight ``(out, in / groups, *kernel)``."""

    def __init__(self, spatial_dims, in_channels, out_channels, kernel_size, stride=1,
                 padding=None, groups=1, bias=False):
        super().__init__()
        self.spatial_dims, self.stride, self.groups = spatial_dims, stride, groups
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2 if padding is None else padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                               *([kernel_size] * spatial_dims)))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, h):
        return ms.conv(h, self.weight, self.bias, self.stride, self.padding, self.groups)

    def extra_repr(self):
        out, inp = self.weight.shape[:2]
        return (f"{inp * self.groups}, {out}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over channels; with a mask, statistics come from visible sites only."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, h):
        return ms.batch_norm(h, super().forward)


class LayerNorm(nn.LayerNorm):
    """Layer norm over the channels of each site (channels-first maps), as in ConvNeXt."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, h):
        return ms.pointwise(h, super().forward)


class Act(nn.Module):
    def __init__(self, kind="relu"):
        super().__init__()
        self.kind = kind
        self.fn = {"relu": torch.relu, "gelu": nn.functional.gelu}[kind]

    def forward(self, h):
        return ms.elementwise(h, self.fn)

    def extra_repr(self):
        return self.kind


class MaxPool(nn.Module):
    def __init__(self, kernel_size=3, stride=2, padding=1):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, h):
        return ms.max_pool(h, self.kernel_size, self.stride, self.padding)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of samples."""

    def __init__(self, rate=0.0):
        super().__init__()
        self.rate = rate

    def forward(self, h):
        if not self.training or self.rate == 0:
            return h
        keep = torch.rand(ms.batch_size(h)) >= self.rate
        return ms.scale_samples(h, keep.float() / (1 - self.rate))

    def extra_repr(self):
        return f"rate={self.rate}"


def _drop_rates(depths, drop_path):
    """Linearly increasing stochastic-depth rates over all blocks, as in ConvNeXt / timm."""
    total = sum(depths)
    rates = [drop_path * i / max(1, total - 1) for i in range(total)]
    out, i = [], 0
    for n in depths:
        out.append(rates[i:i + n])
        i += n
    return out


class _MaskedEncoder(nn.Module):
    """Shared forward: wrap the input for the chosen backend, run the stages, return dense maps."""

    mask_backend = "dense"  # backend used when forward() gets a mask but no backend=
    stages: nn.ModuleList

    def stem(self, h):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                backend: str | None = None, kernel: str = "torch") -> list[torch.Tensor]:
        """Feature maps of every stage, finest first; hidden sites are zero when ``mask`` is given.

        ``mask``: ``(B, *grid)`` bool with ``grid = spatial / downsample_ratio``, ``True`` = hidden.
        ``backend``: ``"dense"`` (masked-dense) or ``"sparse"`` (spconv); default
        ``self.mask_backend``. ``kernel``: sparse arithmetic, ``"torch"`` or ``"spconv"``.
        """
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, *{self.spatial_dims} spatial dims),"
                             f" got {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % self.downsample_ratio]
        if bad:
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by "
                             f"downsample_ratio {self.downsample_ratio}")
        h = x if mask is None else ms.masked_input(x, mask, self.downsample_ratio,
                                                   backend or self.mask_backend, kernel)
        h = self.stem(h)
        feats = []
        for stage in self.stages:
            h = stage(h)
            feats.append(ms.to_dense(h))
        return feats


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, d, cin, planes, stride=1, drop_path=0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.conv1 = Conv(d, cin, planes, 3, stride)
        self.bn1 = BatchNorm(planes)
        self.conv2 = Conv(d, planes, planes, 3)
        self.bn2 = BatchNorm(planes)
        self.relu = Act("relu")
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(Conv(d, cin, planes, 1, stride, padding=0),
                                            BatchNorm(planes))

    def forward(self, h):
        y = self.relu(self.bn1(self.conv1(h)))
        y = self.bn2(self.conv2(y))
        skip = h if self.downsample is None else self.downsample(h)
        return self.relu(ms.add(self.drop_path(y), skip))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, d, cin, planes, stride=1, drop_path=0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        out = planes * self.expansion
        self.conv1 = Conv(d, cin, planes, 1, padding=0)
        self.bn1 = BatchNorm(planes)
        self.conv2 = Conv(d, planes, planes, 3, stride)
        self.bn2 = BatchNorm(planes)
        self.conv3 = Conv(d, planes, out, 1, padding=0)
        self.bn3 = BatchNorm(out)
        self.relu = Act("relu")
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(Conv(d, cin, out, 1, stride, padding=0),
                                            BatchNorm(out))

    def forward(self, h):
        y = self.relu(self.bn1(self.conv1(h)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = h if self.downsample is None else self.downsample(h)
        return self.relu(ms.add(self.drop_path(y), skip))


class ResNet(_MaskedEncoder):
    """ResNet (v1.5: stride on the 3x3 conv) for ``spatial_dims`` 2 or 3.

    ``base_channels`` (default 64) or ``width`` (multiplier) set the first stage's width; stage
    ``i`` has ``base * 2**i`` planes (x4 outputs for bottleneck blocks). Standard stem: 7^d conv
    stride 2 + 3^d max-pool stride 2 (ratio 32 with 4 stages). ``small_input``: 3^d conv stride 1,
    no max-pool (ratio 8). ``num_stages`` in 1..4 keeps the first stages only. ``drop_path``:
    stochastic depth rate of the last block (linear from 0).
    """

    def __init__(self, block, layers, spatial_dims=2, in_channels=1, base_channels=None,
                 width=1.0, small_input=False, num_stages=4, drop_path=0.0):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not 1 <= num_stages <= len(layers):
            raise ValueError(f"num_stages must be in 1..{len(layers)}, got {num_stages}")
        d = self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        base = base_channels or max(1, int(round(64 * width)))
        if small_input:
            self.conv1 = Conv(d, in_channels, base, 3, 1)
            self.maxpool = None
            stem_stride = 1
        else:
            self.conv1 = Conv(d, in_channels, base, 7, 2, padding=3)
            self.maxpool = MaxPool(3, 2, 1)
            stem_stride = 4
        self.bn1 = BatchNorm(base)
        self.relu = Act("relu")
        cin = base
        stages, self.feature_channels = [], []
        rates = _drop_rates(layers[:num_stages], drop_path)
        for i, n in enumerate(layers[:num_stages]):
            planes = base * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(d, cin, planes, 2 if (i > 0 and j == 0) else 1, rates[i][j]))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
            self.feature_channels.append(cin)
        # torchvision names: layer1..layer4
        for i, stage in enumerate(stages):
            self.add_module(f"layer{i + 1}", stage)
        self.downsample_ratio = stem_stride * 2 ** (num_stages - 1)
        self.feature_strides = [stem_stride * 2 ** i for i in range(num_stages)]

    @property
    def stages(self):
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.feature_channels))]

    def stem(self, h):
        h = self.relu(self.bn1(self.conv1(h)))
        return h if self.maxpool is None else self.maxpool(h)


# --------------------------------------------------------------------------------------------
# ConvNeXt
# --------------------------------------------------------------------------------------------

class ConvNeXtBlock(nn.Module):
    """Depthwise k^d conv -> LayerNorm -> Linear(4C) -> GELU -> Linear(C) -> layer scale, + skip."""

    def __init__(self, d, dim, kernel_size=7, layer_scale=1e-6, drop_path=0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.dwconv = Conv(d, dim, dim, kernel_size, groups=dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None

    def _mlp(self, t):  # channels-last (..., C), per site
        t = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(t))))
        return t if self.gamma is None else t * self.gamma

    def forward(self, h):
        return ms.add(h, self.drop_path(ms.pointwise(self.dwconv(h), self._mlp)))


class ConvNeXt(_MaskedEncoder):
    """ConvNeXt for ``spatial_dims`` 2 or 3 (tiny: depths 3-3-9-3, dims 96-192-384-768).

    Standard stem: 4^d patchify conv stride 4 + LayerNorm (ratio 32 with 4 stages);
    ``small_input``: 3^d conv stride 1 + LayerNorm (ratio 8). Downsampling between stages:
    LayerNorm + 2^d conv stride 2. ``width`` scales the dims, ``kernel_size`` the depthwise conv.
    """

    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), spatial_dims=2,
                 in_channels=1, width=1.0, base_channels=None, kernel_size=7, small_input=False,
                 num_stages=4, layer_scale=1e-6, drop_path=0.0):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not 1 <= num_stages <= len(depths):
            raise ValueError(f"num_stages must be in 1..{len(depths)}, got {num_stages}")
        d = self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        if base_channels:
            dims = [base_channels * 2 ** i for i in range(len(depths))]
        else:
            dims = [max(1, int(round(c * width))) for c in dims]
        dims = list(dims[:num_stages])
        if small_input:
            stem, stem_stride = Conv(d, in_channels, dims[0], 3, 1, bias=True), 1
        else:
            stem, stem_stride = Conv(d, in_channels, dims[0], 4, 4, padding=0, bias=True), 4
        self.downsample_layers = nn.ModuleList([nn.Sequential(stem, LayerNorm(dims[0]))])
        for i in range(1, num_stages):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i - 1]), Conv(d, dims[i - 1], dims[i], 2, 2, padding=0, bias=True)))
        rates = _drop_rates(depths[:num_stages], drop_path)
        self.stages_ = nn.ModuleList(
            nn.Sequential(*[ConvNeXtBlock(d, dims[i], kernel_size, layer_scale, rates[i][j])
                            for j in range(depths[i])]) for i in range(num_stages))
        self.feature_channels = dims
        self.downsample_ratio = stem_stride * 2 ** (num_stages - 1)
        self.feature_strides = [stem_stride * 2 ** i for i in range(num_stages)]
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (Conv, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def stem(self, h):
        return h  # the stem is downsample_layers[0], applied per stage below

    @property
    def stages(self):
        return [nn.Sequential(down, stage)
                for down, stage in zip(self.downsample_layers, self.stages_)]


# --------------------------------------------------------------------------------------------
# builder
# --------------------------------------------------------------------------------------------

_NAMES = ("resnet18", "resnet50", "convnext_tiny")


def build_cnn(name: str, spatial_dims: int = 2, in_channels: int = 1, **kw) -> nn.Module:
    """Build ``resnet18``, ``resnet50`` or ``convnext_tiny`` for 2D or 3D images.

    Keyword options: ``width`` / ``base_channels`` (tiny test models), ``small_input``,
    ``num_stages``, ``drop_path``; ConvNeXt also ``kernel_size``, ``layer_scale``, ``depths``
    (shallow test nets). ``img_size`` is accepted and
    ignored (CNNs are size-agnostic), so the generic ``build_encoder`` can pass it.
    """
    kw.pop("img_size", None)
    if name == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2], spatial_dims, in_channels, **kw)
    if name == "resnet50":
        return ResNet(Bottleneck, [3, 4, 6, 3], spatial_dims, in_channels, **kw)
    if name == "convnext_tiny":
        depths = kw.pop("depths", (3, 3, 9, 3))
        return ConvNeXt(depths, (96, 192, 384, 768), spatial_dims, in_channels, **kw)
    raise ValueError(f"unknown CNN {name!r}; choose from {', '.join(_NAMES)}")
