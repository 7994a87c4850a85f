"""Segmentation decoder sharing the fused latent (the seed's cross-modal attention fusion).

Input: the diffusion UNet's fused latent features, the VAE encoder's multi-scale maps (skips) and the
report's token states. At the latent scale and at every finer scale the image features attend to the
report tokens; MONAI ``UpSample``/``UnetResBlock`` carry the spatial path. Output: one logit channel
per structure at full resolution (multi-label, sigmoid).
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the base class in this module when loading

from medvlm.models.base import AlignedModelMixin
from monai.networks.blocks import UnetOutBlock, UnetResBlock, UpSample
from torch import nn

from medvlm.data.structures import STRUCTURE_NAMES


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


class FusedSegmentationDecoder(AlignedModelMixin, ConfigMixin):
    """Decoder from (fused latent, VAE skips, report tokens) to per-structure logits.

    Args:
        fused_channels: channels of the UNet's fused latent.
        skip_channels: channels of the VAE encoder maps, finest first (the last one is at latent scale).
        decoder_channels: channels of the decoder at each scale, finest first (same length as skips).
        context_dim: report token dimension; ``cross_attention_levels`` switches attention per scale.
        image_channels: channels of the CT given to the decoder (0: frozen features only). When > 0 a small
            trainable encoder (MONAI ``UnetResBlock`` per scale, stride 2 between scales) turns the CT into
            maps joined to the VAE skips at every scale: the VAE is frozen and trained for reconstruction,
            and its features alone leave the decoder too little trainable capacity to find small organs.
    """

    @register_to_config
    def __init__(self, num_classes: int = len(STRUCTURE_NAMES), fused_channels: int = 32,
                 skip_channels: Sequence[int] = (16, 32, 32), decoder_channels: Sequence[int] = (16, 32, 64),
                 context_dim: int = 384, num_heads: int = 4, norm_num_groups: int = 8,
                 cross_attention_levels: Sequence[bool] | None = None, null_tokens: int = 1,
                 structure_names: Sequence[str] = STRUCTURE_NAMES, image_channels: int = 0):
        super().__init__()
        if len(skip_channels) != len(decoder_channels):
            raise ValueError(f"skip_channels {tuple(skip_channels)} and decoder_channels {tuple(decoder_channels)} "
                             "must have one entry per scale")
        if len(structure_names) != num_classes:
            raise ValueError(f"{num_classes} classes but {len(structure_names)} structure names")
        levels = tuple(cross_attention_levels) if cross_attention_levels is not None else (True,) * len(skip_channels)
        norm = ("group", {"num_groups": norm_num_groups})
        top = decoder_channels[-1]
        self.bottom = UnetResBlock(3, fused_channels + skip_channels[-1] + (decoder_channels[-1] if image_channels else 0), top,
                                   kernel_size=3, stride=1, norm_name=norm)
        self.bottom_attention = TextCrossAttention(top, context_dim, num_heads, norm_num_groups) if levels[-1] else None
        self.image_encoder = nn.ModuleList()
        if image_channels:
            previous = image_channels
            for i, width in enumerate(decoder_channels):
                self.image_encoder.append(UnetResBlock(3, previous, width, kernel_size=3, stride=1 if i == 0 else 2,
                                                       norm_name=norm))
                previous = width
        extras = list(decoder_channels) if image_channels else [0] * len(decoder_channels)
        self.upsamples = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.attentions = nn.ModuleList()
        for i in range(len(skip_channels) - 2, -1, -1):  # from coarse to fine
            self.upsamples.append(UpSample(3, decoder_channels[i + 1], decoder_channels[i], scale_factor=2, mode="deconv"))
            self.up_blocks.append(UnetResBlock(3, decoder_channels[i] + skip_channels[i] + extras[i], decoder_channels[i],
                                               kernel_size=3, stride=1, norm_name=norm))
            self.attentions.append(TextCrossAttention(decoder_channels[i], context_dim, num_heads, norm_num_groups)
                                   if levels[i] else nn.Identity())
        self.head = UnetOutBlock(3, decoder_channels[0], num_classes)
        self.null_text_embedding = nn.Parameter(torch.zeros(1, null_tokens, context_dim))
        nn.init.normal_(self.null_text_embedding, std=0.02)

    def null_context(self, batch_size: int) -> torch.Tensor:
        return self.null_text_embedding.expand(batch_size, -1, -1)

    def forward(self, fused: torch.Tensor, skips: Sequence[torch.Tensor], text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, null_report: bool = False,
                image: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_classes, X, Y, Z) at the resolution of ``skips[0]``.

        ``null_report=True`` (or ``text_states=None``) replaces the report with the learned null report.
        ``image``: the preprocessed CT at ``skips[0]``'s resolution, required when ``image_channels > 0``.
        """
        if len(skips) != len(self.config.skip_channels):
            raise ValueError(f"expected {len(self.config.skip_channels)} skip maps, got {len(skips)}")
        if self.config.image_channels:
            if image is None:
                raise ValueError("this decoder was built with image_channels > 0: pass image= (the preprocessed CT)")
            h = image.to(skips[0].dtype)
            joined = []
            for encoder, skip in zip(self.image_encoder, skips):
                h = encoder(h)
                if h.shape[2:] != skip.shape[2:]:  # odd sizes: match the VAE map exactly
                    h = nn.functional.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
                joined.append(torch.cat([skip, h], dim=1))
            skips = joined
        if null_report or text_states is None:
            text_states, text_mask = self.null_context(fused.shape[0]), None
        text_states = text_states.to(fused.dtype)
        bottom_skip = skips[-1]
        if fused.shape[2:] != bottom_skip.shape[2:]:
            fused = nn.functional.interpolate(fused, size=bottom_skip.shape[2:], mode="trilinear", align_corners=False)
        h = self.bottom(torch.cat([fused, bottom_skip], dim=1))
        if self.bottom_attention is not None:
            h = self.bottom_attention(h, text_states, text_mask)
        for upsample, block, attention, skip in zip(self.upsamples, self.up_blocks, self.attentions, reversed(skips[:-1])):
            h = upsample(h)
            if h.shape[2:] != skip.shape[2:]:  # odd sizes: match the skip exactly
                h = nn.functional.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
            if isinstance(attention, TextCrossAttention):
                h = attention(h, text_states, text_mask)
        return self.head(h)
