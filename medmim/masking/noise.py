"""Data-independent noise-filtered masks (ColorMAE style).

White noise over the patch grid is filtered in Fourier space and the mask hides the cells whose
filtered value lies above the ``1 - ratio`` quantile (implemented as top-k, so the count is exact):

- ``low``  (red noise): Gaussian low-pass  -> large connected blobs, hard, spatially coherent holes
- ``high`` (blue noise): Gaussian high-pass -> evenly spread, scattered cells
- ``band`` (green noise): Gaussian ring     -> medium-sized clusters at a characteristic spacing

Frequencies are in cycles per patch (the Nyquist limit is 0.5 on every axis).
"""

from __future__ import annotations

import torch

from medmim.masking.base import MaskGenerator, rand

KINDS = ("low", "high", "band")


def radial_frequency(grid: tuple[int, ...], device=None) -> torch.Tensor:
    """Radial frequency ``|f|`` (cycles per cell) of every FFT bin of a grid, shape ``grid``."""
    axes = [torch.fft.fftfreq(n, device=device) for n in grid]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(m**2 for m in mesh))


class NoiseFilteredMask(MaskGenerator):
    """Mask by thresholding Fourier-filtered white noise.

    Args:
        ratio: fraction of hidden cells.
        kind: ``"low"``, ``"high"`` or ``"band"`` pass.
        cutoff: Gaussian width (cycles/cell) of the low- and high-pass filters; ``None`` = 0.15
            for low-pass (blobs a few cells wide) and 0.4 for high-pass (close to Nyquist, so
            neighbouring cells tend to differ: fewer adjacent hidden pairs than random).
        band_centre, band_width: centre and width (cycles/cell) of the band-pass ring.
    """

    name = "noise"

    def __init__(self, ratio: float = 0.75, kind: str = "low", cutoff: float | None = None,
                 band_centre: float = 0.25, band_width: float = 0.08):
        super().__init__(ratio)
        if kind not in KINDS:
            raise ValueError(f"noise kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.cutoff = float(cutoff) if cutoff is not None else (0.4 if kind == "high" else 0.15)
        self.band_centre, self.band_width = float(band_centre), float(band_width)

    def transfer(self, grid: tuple[int, ...], device=None) -> torch.Tensor:
        """The filter's gain for every FFT bin (real, shape ``grid``)."""
        r = radial_frequency(grid, device)
        low = torch.exp(-((r / self.cutoff) ** 2))
        if self.kind == "low":
            return low
        if self.kind == "high":
            return 1.0 - low
        return torch.exp(-(((r - self.band_centre) / self.band_width) ** 2))

    def scores(self, batch_size, grid, generator, device):
        noise = rand((batch_size, *grid), generator, None, normal=True)
        dims = tuple(range(1, len(grid) + 1))
        filtered = torch.fft.ifftn(torch.fft.fftn(noise, dim=dims) * self.transfer(grid), dim=dims).real
        # a tiny amount of the white noise breaks exact ties (e.g. a filter that removes everything)
        scores = filtered + 1e-6 * noise
        return scores.to(device) if device is not None else scores

    def __repr__(self):
        return f"NoiseFilteredMask(ratio={self.ratio}, kind={self.kind!r})"
