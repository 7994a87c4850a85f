"""3D KL autoencoder for CT: MONAI's ``AutoencoderKL`` wrapped as a diffusers model.

diffusers' own ``AutoencoderKL`` is 2D (video variants do not downsample depth), so the network is
MONAI's 3D one; the wrapper adds ``save_pretrained``/``from_pretrained`` (safetensors), a scaling
factor, the encoder's multi-scale features for the segmentation decoder, and tiled encode/decode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the base class in this module when loading

from medvlm.models.base import AlignedModelMixin
from diffusers.utils import BaseOutput
from monai.inferers import sliding_window_inference
from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL


@dataclass
class CTEncoderOutput(BaseOutput):
    """``latent_dist``: diagonal Gaussian over the latent; ``features``: encoder maps, finest first."""

    latent_dist: DiagonalGaussianDistribution
    features: tuple[torch.Tensor, ...] = ()


@dataclass
class CTDecoderOutput(BaseOutput):
    sample: torch.Tensor


class CTAutoencoderKL(AlignedModelMixin, ConfigMixin):
    """3D VAE with compression ``2 ** (len(channels) - 1)`` per axis (4 or 8 in the presets).

    Args mirror MONAI's ``AutoencoderKL``; ``scaling_factor`` rescales latents to unit variance for the
    diffusion model (set from data after training, as in latent diffusion).
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, out_channels: int = 1, latent_channels: int = 4,
                 channels: Sequence[int] = (32, 64, 64), num_res_blocks: int | Sequence[int] = 1,
                 attention_levels: Sequence[bool] | None = None, norm_num_groups: int = 16,
                 with_nonlocal_attn: bool = False, scaling_factor: float = 1.0):
        super().__init__()
        attention_levels = tuple(attention_levels) if attention_levels is not None else (False,) * len(channels)
        self.network = MonaiAutoencoderKL(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels, latent_channels=latent_channels,
            channels=tuple(channels), num_res_blocks=num_res_blocks, attention_levels=attention_levels,
            norm_num_groups=norm_num_groups, with_encoder_nonlocal_attn=with_nonlocal_attn,
            with_decoder_nonlocal_attn=with_nonlocal_attn,
        )

    @property
    def compression(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def _encode_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run MONAI's encoder block by block, keeping the last map at each resolution."""
        features: list[torch.Tensor] = []
        h = x
        for block in self.network.encoder.blocks:
            if isinstance(block, torch.nn.GroupNorm):
                features.append(h)  # the bottleneck map (latent resolution, channels[-1]) before the output head
            out = block(h)
            if out.shape[2:] != h.shape[2:]:
                features.append(h)  # resolution is about to change: keep the finished map
            h = out
        return h, features

    def encode(self, x: torch.Tensor, return_dict: bool = True, return_features: bool = False):
        """Encode ``x`` (B, C, X, Y, Z) to a latent distribution (and multi-scale features on request)."""
        h, features = self._encode_with_features(x)
        mu = self.network.quant_conv_mu(h)
        log_var = torch.clamp(self.network.quant_conv_log_sigma(h), -30.0, 20.0)
        distribution = DiagonalGaussianDistribution(torch.cat([mu, log_var], dim=1))
        feats = tuple(features) if return_features else ()
        if not return_dict:
            return (distribution, feats)
        return CTEncoderOutput(latent_dist=distribution, features=feats)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Decode latents (already divided by ``scaling_factor``) to the image space."""
        sample = self.network.decode(z)
        return CTDecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None,
                return_dict: bool = True):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        return CTDecoderOutput(sample=decoded) if return_dict else (decoded,)

    # ------------------------------------------------------------------ tiles (bounded memory)
    def tiled_encode_mean(self, x: torch.Tensor, tile_size: Sequence[int], overlap: float = 0.25,
                          sw_batch_size: int = 1) -> torch.Tensor:
        """Latent means of a large volume, encoded tile by tile with Gaussian blending (MONAI sliding window)."""
        self._check_tile(tile_size)
        return sliding_window_inference(x, roi_size=tuple(tile_size), sw_batch_size=sw_batch_size,
                                        predictor=lambda t: self.encode(t).latent_dist.mean.clone(), overlap=overlap,
                                        mode="gaussian")

    def tiled_decode(self, z: torch.Tensor, tile_size: Sequence[int], overlap: float = 0.25,
                     sw_batch_size: int = 1) -> torch.Tensor:
        """Decode a large latent tile by tile (``tile_size`` in latent voxels) with Gaussian blending."""
        return sliding_window_inference(z, roi_size=tuple(tile_size), sw_batch_size=sw_batch_size,
                                        predictor=lambda t: self.decode(t).sample, overlap=overlap, mode="gaussian")

    def _check_tile(self, tile_size: Sequence[int]) -> None:
        if any(int(s) % self.compression for s in tile_size):
            raise ValueError(f"tile_size {tuple(tile_size)} must be a multiple of the compression {self.compression}")
