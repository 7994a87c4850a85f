"""Fixed CT display windows as network input channels (shared by the CT towers of medvlm)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from medvlm.data.transforms import BODY_HU, body_midline, map_intensity

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
        hu = map_intensity(image, self.output_range, self.hu_window)
        channels = [image] + [((hu - level) / (width / 2)).clamp(-1.0, 1.0) for level, width in self.windows]
        return torch.cat(channels, dim=1)


def coordinate_channels(reference: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates in [-1, 1] along x, y, z as three channels shaped like ``reference`` (CoordConv).

    Reports say *left*, *right*, *ipsilateral* or *bilateral*; convolutions are translation equivariant,
    global pooling discards position and the neck is nearly symmetric, so without its position (RAS grid,
    ROI around the body) a CT network could not tell the patient's left half from the right. Written
    here: MONAI's ``AddCoordinateChannels`` is a per-sample array transform with coordinates in [-0.5, 0.5];
    these are part of the network's forward pass, batched on the model's device.
    """
    axes = [torch.linspace(-1.0, 1.0, n, device=reference.device, dtype=reference.dtype) for n in reference.shape[2:]]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.expand(reference.shape[0], -1, -1, -1, -1)


def midline_distance(image: torch.Tensor, hu_window: Sequence[float] = (-1000.0, 1500.0),
                     output_range: Sequence[float] = (-1.0, 1.0), body_hu: float = BODY_HU) -> torch.Tensor:
    """Signed distance in voxels along x from the patient's midline, (B, 1, X, Y, Z), positive on the right.

    The midline is :func:`medvlm.data.transforms.body_midline` of each preprocessed CT (RAS grid: index 0 grows
    towards the patient's right). Computed on the whole volume: a patch of it has its own centroid, so patch-wise
    callers compute this once and crop it with the image.
    """
    threshold = float(map_intensity(float(body_hu), hu_window, output_range))
    x = torch.arange(image.shape[2], device=image.device, dtype=torch.float32).view(1, 1, -1, 1, 1)
    centre = torch.tensor([body_midline(volume[0], threshold=threshold) for volume in image.detach()],
                          device=image.device, dtype=torch.float32)
    return (x - centre.view(-1, 1, 1, 1, 1)).expand(image.shape[0], 1, *image.shape[2:]).to(image.dtype)
