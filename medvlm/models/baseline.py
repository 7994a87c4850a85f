"""Image-only segmentation baseline: MONAI's UNet, CT in, one logit per structure out (no report).

It sees the CT through the same fixed windows as the report-conditioned decoder (:class:`CTWindows`), so the
comparison isolates what the report and the shared latent add. Wrapped as a diffusers model so it saves and loads (safetensors) like every other medvlm network, and
trained by ``python -m train baseline`` with the segmentation stage's data, patches, steps and loss,
so that the evaluation compares the report-conditioned decoder with it under equal conditions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the base class in this module
from monai.networks.nets import UNet

from medvlm.vocabulary import STRUCTURE_NAMES
from medvlm.models.base import AlignedModelMixin
from medvlm.models.windows import DEFAULT_CT_WINDOWS, CTWindows


class ImageOnlySegmenter(AlignedModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, num_classes: int = len(STRUCTURE_NAMES), channels: Sequence[int] = (16, 32, 64, 128),
                 num_res_units: int = 1, structure_names: Sequence[str] = STRUCTURE_NAMES,
                 ct_windows: Sequence[Sequence[float]] = DEFAULT_CT_WINDOWS,
                 input_hu_window: Sequence[float] = (-1000.0, 1500.0), input_range: Sequence[float] = (-1.0, 1.0)):
        super().__init__()
        self.windows = CTWindows(input_hu_window, input_range, ct_windows)
        self.net = UNet(spatial_dims=3, in_channels=self.windows.out_channels, out_channels=num_classes,
                        channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=num_res_units)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(self.windows(image))
