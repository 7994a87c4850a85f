"""Fixed CT display windows as network input channels (shared by the CT towers of medvlm)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

DEFAULT_CT_WINDOWS = ((40.0, 400.0), (400.0, 1800.0))  # (level, width) in HU: soft tissue, bone


class CTWindows(nn.Module):
    """The preprocessed CT plus fixed display windows (level, width in HU) as extra input channels.

    Preprocessing maps ``hu_window`` linearly to ``output_range`` for every model; a soft-tissue window
    restores the 20-40 HU contrasts (glands, tumour) that a -1000..1500 HU window compresses to about
    1 % of the range. Written here (not a MONAI ``ScaleIntensityRange`` transform) because the channels are
    part of the network: every pipeline keeps the one shared preprocessing.
    """

    def __init__(self, hu_window: Sequence[float] = (-1000.0, 1500.0), output_range: Sequence[float] = (-1.0, 1.0),
                 windows: Sequence[Sequence[float]] = DEFAULT_CT_WINDOWS):
        super().__init__()
        self.hu_window = tuple(float(v) for v in hu_window)
        self.output_range = tuple(float(v) for v in output_range)
        self.windows = tuple((float(level), float(width)) for level, width in windows)
        if self.output_range[1] == self.output_range[0] or any(width <= 0 for _, width in self.windows):
            raise ValueError(f"invalid CT windows {self.windows} or output range {self.output_range}")

    @property
    def out_channels(self) -> int:
        return 1 + len(self.windows)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        (lo, hi), (a, b) = self.hu_window, self.output_range
        hu = lo + (image - a) * (hi - lo) / (b - a)
        channels = [image] + [((hu - level) / (width / 2)).clamp(-1.0, 1.0) for level, width in self.windows]
        return torch.cat(channels, dim=1)


def coordinate_channels(reference: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates in [-1, 1] along x, y, z as three channels shaped like ``reference`` (CoordConv).

    Reports say *left*, *right*, *ipsilateral* or *bilateral*; convolutions are translation equivariant,
    global pooling discards position and the neck is nearly symmetric, so without its position (RAS grid,
    ROI around the body) a CT network could not tell the patient's left half from the right. Written
    here: MONAI has no coordinate-channel block.
    """
    axes = [torch.linspace(-1.0, 1.0, n, device=reference.device, dtype=reference.dtype) for n in reference.shape[2:]]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.expand(reference.shape[0], -1, -1, -1, -1)


def midline_distance(image: torch.Tensor, hu_window: Sequence[float] = (-1000.0, 1500.0),
                     output_range: Sequence[float] = (-1.0, 1.0), body_hu: float = -500.0) -> torch.Tensor:
    """Signed distance in voxels along x from the patient's midline, (B, 1, X, Y, Z), positive on the right.

    The midline is the x centroid of the body (voxels above ``body_hu``) of each preprocessed CT (RAS grid:
    index 0 grows towards the patient's right); a volume without body voxels uses its centre. Computed on the
    whole volume: a patch of it has its own centroid, so patch-wise callers compute this once and crop it
    with the image. Written here: MONAI has no midline estimate.
    """
    (lo, hi), (a, b) = hu_window, output_range
    threshold = a + (body_hu - lo) * (b - a) / (hi - lo)
    body = (image[:, :1] > threshold).to(torch.float32)
    x = torch.arange(image.shape[2], device=image.device, dtype=torch.float32).view(1, 1, -1, 1, 1)
    count = body.sum(dim=(1, 2, 3, 4))
    centre = torch.where(count > 0, (body * x).sum(dim=(1, 2, 3, 4)) / count.clamp_min(1.0),
                         torch.full_like(count, (image.shape[2] - 1) / 2))
    return (x - centre.view(-1, 1, 1, 1, 1)).expand(image.shape[0], 1, *image.shape[2:]).to(image.dtype)
