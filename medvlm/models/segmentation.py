"""Segmentation decoder sharing the fused latent (the seed's cross-modal attention fusion).

Two paths, summed as logits (one channel per structure, multi-label, sigmoid):

* the **report path** works at the latent scale: the diffusion UNet's fused latent, the VAE's
  latent-scale map and voxel coordinates go through MONAI ``UnetResBlock``s, each followed by cross-attention to the report's
  token states; its logits are upsampled (trilinear) to the CT grid. It carries what only the report
  says (the elective neck side and levels) and the fused latent's view of the anatomy.
* the **image path** is MONAI's ``UNet`` on the CT (plus fixed CT windows), the architecture of the
  image-only baseline, for voxel-accurate boundaries. The frozen VAE and diffusion UNet are trained for
  reconstruction and denoising; their features alone gave a decoder that learned the small organs several
  times slower than a UNet on the CT (demo phantom, eval/README figures).

The report path's output layer starts near zero, so training starts from the image path.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the base class in this module when loading
from monai.networks.blocks import UnetOutBlock, UnetResBlock
from monai.networks.nets import UNet
from torch import nn

from medvlm.data.structures import STRUCTURE_NAMES
from medvlm.models.base import AlignedModelMixin
from medvlm.models.windows import DEFAULT_CT_WINDOWS, CTWindows


class TextCrossAttention(nn.Module):
    """Image tokens attend to report tokens, pre-norm and residual.

    torch's ``MultiheadAttention`` rather than MONAI's ``CrossAttentionBlock`` because it takes a key
    padding mask, so padded report tokens are ignored.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int, norm_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.attention = nn.MultiheadAttention(channels, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        # small, not zero: the block starts close to identity, yet every weight receives gradient from step one
        self.gate = nn.Parameter(torch.full((1,), 0.1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        queries = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        padding = None if context_mask is None else ~context_mask.bool()
        attended, _ = self.attention(queries, context, context, key_padding_mask=padding, need_weights=False)
        return x + torch.tanh(self.gate) * attended.transpose(1, 2).reshape(b, c, *spatial)


def _coordinates(reference: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates in [-1, 1] along x, y, z as three channels (CoordConv).

    The report says *left*, *right*, *ipsilateral* or *bilateral*; convolutions are translation
    equivariant and the neck is nearly symmetric, so without its position (RAS grid, ROI around the body)
    the report path could not tell the patient's left half from the right. Written here: MONAI has no
    coordinate-channel block.
    """
    axes = [torch.linspace(-1.0, 1.0, n, device=reference.device, dtype=reference.dtype) for n in reference.shape[2:]]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.expand(reference.shape[0], -1, -1, -1, -1)


class FusedSegmentationDecoder(AlignedModelMixin, ConfigMixin):
    """(fused latent, VAE maps, report tokens, CT) -> per-structure logits at the CT's resolution.

    Args:
        fused_channels: channels of the UNet's fused latent.
        skip_channels: channels of the VAE encoder maps, finest first; the last (latent-scale) map joins
            the report path.
        decoder_channels: MONAI ``UNet`` channels of the image path (stride 2 between them).
        num_res_units: residual units per ``UNet`` layer.
        report_channels / report_layers: width and depth (residual block + cross-attention) of the report path.
        ct_windows / input_hu_window / input_range: fixed CT windows of the image path (:class:`CTWindows`).
    """

    @register_to_config
    def __init__(self, num_classes: int = len(STRUCTURE_NAMES), fused_channels: int = 32,
                 skip_channels: Sequence[int] = (16, 32, 32), decoder_channels: Sequence[int] = (16, 32, 64, 128),
                 context_dim: int = 384, num_heads: int = 4, norm_num_groups: int = 8, num_res_units: int = 1,
                 report_channels: int = 64, report_layers: int = 2, null_tokens: int = 1,
                 structure_names: Sequence[str] = STRUCTURE_NAMES,
                 ct_windows: Sequence[Sequence[float]] = DEFAULT_CT_WINDOWS,
                 input_hu_window: Sequence[float] = (-1000.0, 1500.0), input_range: Sequence[float] = (-1.0, 1.0)):
        super().__init__()
        if len(structure_names) != num_classes:
            raise ValueError(f"{num_classes} classes but {len(structure_names)} structure names")
        if len(decoder_channels) < 2:
            raise ValueError(f"decoder_channels {tuple(decoder_channels)} needs at least two UNet levels")
        if report_layers < 1:
            raise ValueError(f"report_layers must be >= 1, got {report_layers}")
        norm = ("group", {"num_groups": norm_num_groups})
        self.windows = CTWindows(input_hu_window, input_range, ct_windows)
        self.image_path = UNet(spatial_dims=3, in_channels=self.windows.out_channels, out_channels=num_classes,
                               channels=tuple(decoder_channels), strides=(2,) * (len(decoder_channels) - 1),
                               num_res_units=num_res_units)
        self.report_blocks = nn.ModuleList([
            UnetResBlock(3, (fused_channels + skip_channels[-1] + 3) if i == 0 else report_channels, report_channels,
                         kernel_size=3, stride=1, norm_name=norm) for i in range(report_layers)])
        self.report_attention = nn.ModuleList([TextCrossAttention(report_channels, context_dim, num_heads, norm_num_groups)
                                               for _ in range(report_layers)])
        self.report_head = UnetOutBlock(3, report_channels, num_classes)
        # near zero, not zero: training starts from the image path, yet the report path gets gradient from step one
        nn.init.normal_(self.report_head.conv.conv.weight, std=1e-3)
        nn.init.zeros_(self.report_head.conv.conv.bias)
        self.null_text_embedding = nn.Parameter(torch.zeros(1, null_tokens, context_dim))
        nn.init.normal_(self.null_text_embedding, std=0.02)

    def null_context(self, batch_size: int) -> torch.Tensor:
        return self.null_text_embedding.expand(batch_size, -1, -1)

    def report_logits(self, fused: torch.Tensor, latent_map: torch.Tensor, text_states: torch.Tensor,
                      text_mask: torch.Tensor | None) -> torch.Tensor:
        """The report path's logits at the latent scale."""
        if fused.shape[2:] != latent_map.shape[2:]:
            fused = nn.functional.interpolate(fused, size=latent_map.shape[2:], mode="trilinear", align_corners=False)
        h = torch.cat([fused, latent_map, _coordinates(latent_map)], dim=1)
        for block, attention in zip(self.report_blocks, self.report_attention):
            h = attention(block(h), text_states, text_mask)
        return self.report_head(h)

    def forward(self, fused: torch.Tensor, skips: Sequence[torch.Tensor], text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, null_report: bool = False,
                image: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_classes, X, Y, Z) at the CT's resolution.

        ``null_report=True`` (or ``text_states=None``) replaces the report with the learned null report.
        ``image``: the preprocessed CT (B, 1, X, Y, Z) the features were computed from. Its sizes must suit
        the image path's ``UNet`` (divisible by ``2 ** (len(decoder_channels) - 1)``), as the pipelines' ROIs are.
        """
        if len(skips) != len(self.config.skip_channels):
            raise ValueError(f"expected {len(self.config.skip_channels)} skip maps, got {len(skips)}")
        if image is None:
            raise ValueError("the decoder needs image= (the preprocessed CT the features were computed from)")
        factor = 2 ** (len(self.config.decoder_channels) - 1)
        if any(size % factor for size in image.shape[2:]):
            raise ValueError(f"image size {tuple(image.shape[2:])} must be divisible by {factor} (the image path's UNet)")
        if null_report or text_states is None:
            text_states, text_mask = self.null_context(fused.shape[0]), None
        text_states = text_states.to(fused.dtype)
        image_logits = self.image_path(self.windows(image.to(fused.dtype)))
        coarse = self.report_logits(fused, skips[-1], text_states, text_mask)
        return image_logits + nn.functional.interpolate(coarse, size=image_logits.shape[2:], mode="trilinear",
                                                        align_corners=False)
