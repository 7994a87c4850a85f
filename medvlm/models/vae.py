"""3D KL autoencoder for CT: MONAI's ``AutoencoderKL`` wrapped as a diffusers model.

diffusers' own ``AutoencoderKL`` is 2D (video variants do not downsample depth), so the network is
MONAI's 3D one; the wrapper adds ``save_pretrained``/``from_pretrained`` (safetensors), a scaling
factor, the encoder's multi-scale features for the segmentation decoder, and tiled encode/decode.

With ``mask_channels`` > 0 the autoencoder is *paired*: a generation latent is the CT latent plus one
channel per structure at latent resolution (:meth:`CTAutoencoderKL.encode_masks`), and the decoder reads
both and returns the CT *and* the structures' mask logits. A sampled latent therefore carries its contours, and the decoded image follows
the mask channels (a tumour is drawn where the GTVp channel says), which report conditioning sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the base class in this module when loading

from medvlm.config import BACKBONES
from medvlm.data.transforms import map_intensity
from medvlm.errors import InputError
from medvlm.models.base import AlignedModelMixin
from diffusers.utils import BaseOutput
from monai.inferers import sliding_window_inference
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL
from monai.transforms.utils import distance_transform_edt
from torch import nn

MASK_ENCODINGS = ("fraction", "distance")
# what MAISI's autoencoder reads: HU -1000..1000 scaled to [0, 1] and clipped (MONAI's MAISI recipe,
# ScaleIntensityRange a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True)
MAISI_HU_WINDOW = (-1000.0, 1000.0)
# the keys under which MAISI's scripts (and forks of them) store the autoencoder's state dict in a checkpoint
MAISI_CHECKPOINT_KEYS = ("unet_state_dict", "autoencoder_state_dict", "autoencoder", "state_dict", "model")


class CompactEncoder(nn.Module):
    """Norm-free convolutions: one at the full resolution, then per level a stride-2 (kernel 4) convolution and
    ``num_res_blocks`` 3^3 convolutions (MONAI ``Convolution``, SiLU), down to ``2 * latent_channels`` maps (mean
    and log-variance). Features: the last map at each resolution, finest first (the segmentation decoder's skips).

    Written by hand rather than used as MONAI's ``AutoencoderKL`` because that network (GroupNorm residual
    blocks, nearest-neighbour upsampling) learned too slowly for the step budgets here. Overfitting one 32^3
    crop of a phantom case (L1, Adam 1e-3, 2 cores): MONAI's ``AutoencoderKL`` 20 dB PSNR after 200 steps at
    0.7 s a step; this stack 32.6 dB after 400 steps at 0.14 s a step. After the demo's autoencoder training
    MONAI's kept no bone (0.0 % of body voxels above 300 HU against 7.7 %) and reversed the tumour's contrast.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], latent_channels: int, num_res_blocks: Sequence[int]):
        super().__init__()
        self.conv_in = Convolution(3, in_channels, channels[0], kernel_size=3, act="SWISH", norm=None)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, width in enumerate(channels):
            # no residual units at the full resolution: 3D convolutions there cost most (16-channel 3^3
            # convolutions on a 32^3 patch: 0.09 s each, forward and backward, on 2 cores)
            self.levels.append(nn.Sequential(*[Convolution(3, width, width, kernel_size=3, act="SWISH", norm=None)
                                               for _ in range(num_res_blocks[i] if i else 0)]))
            if i + 1 < len(channels):
                self.downs.append(nn.Sequential(nn.Conv3d(width, channels[i + 1], 4, stride=2, padding=1), nn.SiLU()))
        self.conv_out = Convolution(3, channels[-1], 2 * latent_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            h = level(h)
            features.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return self.conv_out(h), features


class CompactDecoder(nn.Module):
    """The mirror of :class:`CompactEncoder`: 3^3 convolutions and stride-2 (kernel 4) transposed convolutions."""

    def __init__(self, in_channels: int, channels: Sequence[int], out_channels: int, num_res_blocks: Sequence[int],
                 guide_channels: int = 0):
        super().__init__()
        widths = list(channels)[::-1]
        self.conv_in = Convolution(3, in_channels, widths[0], kernel_size=3, act="SWISH", norm=None)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, width in enumerate(widths):
            coarse = i + 1 < len(widths)  # as in the encoder, none at the full resolution
            self.levels.append(nn.Sequential(*[Convolution(3, width, width, kernel_size=3, act="SWISH", norm=None)
                                               for _ in range(num_res_blocks[::-1][i] if coarse else 0)]))
            if i + 1 < len(widths):
                self.ups.append(nn.Sequential(nn.ConvTranspose3d(width, widths[i + 1], 4, stride=2, padding=1), nn.SiLU()))
        # full-resolution guide maps (the structures' masks) read with the last map before the output convolution,
        # as a residual whose last convolution starts at zero: an unguided decoder's weights load and decode as
        # they did, and fine-tuning learns what the masks add (as ControlNet's zero convolutions)
        self.guide = None
        if guide_channels:
            self.guide = nn.Sequential(
                Convolution(3, widths[-1] + guide_channels, widths[-1], kernel_size=3, act="SWISH", norm=None),
                Convolution(3, widths[-1], widths[-1], kernel_size=3, conv_only=True))
            nn.init.zeros_(self.guide[1].conv.weight)
            nn.init.zeros_(self.guide[1].conv.bias)
        self.conv_out = Convolution(3, widths[-1], out_channels, kernel_size=3, conv_only=True)

    def forward(self, z: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv_in(z)
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.ups):
                h = self.ups[i](h)
        if self.guide is not None:
            if guide is None or guide.shape[2:] != h.shape[2:]:
                raise ValueError(f"this decoder draws along the structures' masks: pass them at {tuple(h.shape[2:])}, "
                                 f"got {None if guide is None else tuple(guide.shape[2:])}")
            h = h + self.guide(torch.cat([h, guide.to(h.dtype)], dim=1))
        return self.conv_out(h)


@dataclass
class CTEncoderOutput(BaseOutput):
    """``latent_dist``: diagonal Gaussian over the latent; ``features``: encoder maps, finest first."""

    latent_dist: DiagonalGaussianDistribution
    features: tuple[torch.Tensor, ...] = ()


@dataclass
class CTDecoderOutput(BaseOutput):
    """``sample``: the decoded CT (model range); ``mask_logits``: one logit map per structure (paired
    autoencoders only, else None)."""

    sample: torch.Tensor
    mask_logits: torch.Tensor | None = None


class CTAutoencoderKL(AlignedModelMixin, ConfigMixin):
    """3D VAE with compression ``2 ** (len(channels) - 1)`` per axis (4 or 8 in the presets).

    Args mirror MONAI's ``AutoencoderKL``; ``scaling_factor`` rescales latents to unit variance for the
    diffusion model (set from data after training, as in latent diffusion). ``mask_channels``: structures
    decoded with the CT from the paired latent (0: a CT-only autoencoder). ``backbone``: ``"compact"``
    (:class:`CompactEncoder`/:class:`CompactDecoder`, norm-free, fast to train) or ``"monai_kl"`` (MONAI's
    ``AutoencoderKL`` with GroupNorm residual blocks and optional attention). ``mask_encoding``: how a structure
    becomes its latent channel (:meth:`encode_masks`); ``mask_distance``: the decay length of the ``"distance"``
    encoding in latent cells. ``mask_shift``/``mask_scale``: per structure channel, what the generation latent
    subtracts and divides by (set from data like ``scaling_factor``, so each channel has unit variance).
    ``mask_field_thresholds``: per structure channel, the level of its interpolated channel that separates inside
    from outside when masks are read from the structure channels alone (:meth:`structure_field_logits`; set from
    data at export).

    ``backbone="maisi"`` is MONAI's MAISI autoencoder (``AutoencoderKlMaisi``; its published configuration is
    ``channels=(64, 128, 256)``, ``num_res_blocks=2``, ``norm_num_groups=32``, ``latent_channels=4``), loaded from
    its ``.pt`` state dict with :meth:`load_maisi_checkpoint`. Its decoder is kept as published, so the structures
    of a paired MAISI autoencoder are read from their channels alone (:meth:`structure_field_logits`).
    ``mask_guidance`` (compact, paired): the decoder also reads the structures' masks at full resolution (a
    sample's own paired masks when generating), so the CT's edges are drawn where its contours are; without
    masks (:meth:`decode` with ``masks=None``) they are read from the structure channels.
    ``network_hu_window``: the HU window the network reads, scaled to [0, 1] and clipped (MAISI: -1000..1000); the
    caller passes and receives the model range given by ``input_hu_window``/``input_range`` (the preprocessing's),
    converted at the network's input and output. ``None`` (the other backbones): the network reads the model range.
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, out_channels: int = 1, latent_channels: int = 4,
                 channels: Sequence[int] = (32, 64, 64), num_res_blocks: int | Sequence[int] = 1,
                 attention_levels: Sequence[bool] | None = None, norm_num_groups: int = 16,
                 with_nonlocal_attn: bool = False, scaling_factor: float = 1.0, mask_channels: int = 0,
                 backbone: str = "monai_kl", mask_encoding: str = "fraction", mask_distance: float = 4.0,
                 mask_shift: Sequence[float] | None = None, mask_scale: Sequence[float] | None = None,
                 mask_field_thresholds: Sequence[float] | None = None,
                 network_hu_window: Sequence[float] | None = None,
                 input_hu_window: Sequence[float] = (-1000.0, 1500.0), input_range: Sequence[float] = (-1.0, 1.0),
                 mask_guidance: bool = False):
        super().__init__()
        if mask_channels < 0:
            raise ValueError(f"mask_channels must be >= 0, got {mask_channels}")
        if mask_encoding not in MASK_ENCODINGS:
            raise ValueError(f"mask_encoding must be one of {MASK_ENCODINGS}, got {mask_encoding!r}")
        if not mask_distance > 0:
            raise ValueError(f"mask_distance must be > 0 latent cells, got {mask_distance}")
        for name, values in (("mask_shift", mask_shift), ("mask_scale", mask_scale),
                             ("mask_field_thresholds", mask_field_thresholds)):
            if values is not None and len(values) != mask_channels:
                raise ValueError(f"{name} needs one value per structure channel ({mask_channels}), got {len(values)}")
        if mask_scale is not None and not all(float(v) > 0 for v in mask_scale):
            raise ValueError(f"mask_scale values must be > 0, got {list(mask_scale)}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        for name, pair in (("network_hu_window", network_hu_window), ("input_hu_window", input_hu_window),
                           ("input_range", input_range)):
            if pair is not None and (len(pair) != 2 or not float(pair[0]) < float(pair[1])):
                raise ValueError(f"{name} must be (low, high) with low < high, got {pair}")
        if mask_guidance and (backbone != "compact" or not mask_channels):
            raise ValueError("mask_guidance needs the compact backbone and paired structures (mask_channels > 0)")
        levels = _as_levels(num_res_blocks, len(channels))
        if backbone == "compact":
            self.encoder = CompactEncoder(in_channels, channels, latent_channels, levels)
            self.decoder = CompactDecoder(latent_channels + mask_channels, channels, out_channels + mask_channels, levels,
                                          guide_channels=mask_channels if mask_guidance else 0)
            return
        attention_levels = tuple(attention_levels) if attention_levels is not None else (False,) * len(channels)
        if backbone == "maisi":
            from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

            # the published decoder reads the CT latent only; splitting convolutions (num_splits) and float16
            # norms are MAISI's GPU memory savers, replaced here by tiled encode/decode (same weights either way)
            self.network = AutoencoderKlMaisi(
                spatial_dims=3, in_channels=in_channels, out_channels=out_channels, num_res_blocks=levels,
                num_channels=tuple(channels), attention_levels=attention_levels, latent_channels=latent_channels,
                norm_num_groups=norm_num_groups, norm_eps=1e-6, with_encoder_nonlocal_attn=with_nonlocal_attn,
                with_decoder_nonlocal_attn=with_nonlocal_attn, use_convtranspose=False, num_splits=1, dim_split=0,
                norm_float16=False, save_mem=False)
            return
        self.network = MonaiAutoencoderKL(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels, latent_channels=latent_channels,
            channels=tuple(channels), num_res_blocks=num_res_blocks, attention_levels=attention_levels,
            norm_num_groups=norm_num_groups, with_encoder_nonlocal_attn=with_nonlocal_attn,
            with_decoder_nonlocal_attn=with_nonlocal_attn,
        )
        if mask_channels:
            # MONAI's AutoencoderKL ties the decoder's input to latent_channels: the paired decoder is MONAI's
            # Decoder with the structure channels added at its input and output
            from monai.networks.nets.autoencoderkl import Decoder

            self.network.decoder = Decoder(
                spatial_dims=3, channels=tuple(channels), in_channels=latent_channels + mask_channels,
                out_channels=out_channels + mask_channels, num_res_blocks=levels,
                norm_num_groups=norm_num_groups, norm_eps=1e-6, attention_levels=attention_levels,
                with_nonlocal_attn=with_nonlocal_attn)

    @property
    def compression(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    @property
    def generation_channels(self) -> int:
        """Channels of a generation latent: the CT latent plus the structure channels."""
        return int(self.config.latent_channels) + int(self.config.mask_channels)

    def encode_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Structure channels of the paired latent for masks (B, mask_channels, X, Y, Z) in {0, 1}.

        ``"fraction"``: each latent cell's voxel fraction mapped to [-1, 1] (-1 = none of the structure).
        ``"distance"``: the voxel fraction f in (0, 1] in cells the structure touches, and -tanh(d / mask_distance)
        elsewhere, d the distance in latent cells to the nearest touched cell (-1 everywhere for an absent
        structure). A small tumour then shapes the whole channel, not 0.5 % of its cells: its side and size are
        visible to the diffusion model at high noise levels, where the layout of a sample is decided.
        """
        if masks.shape[1] != self.config.mask_channels:
            raise ValueError(f"masks have {masks.shape[1]} channels, the autoencoder pairs {self.config.mask_channels}")
        dtype = masks.dtype if masks.is_floating_point() else torch.float32
        fraction = torch.nn.functional.avg_pool3d(masks.float(), kernel_size=self.compression)
        if self.config.mask_encoding == "fraction":
            return (fraction * 2.0 - 1.0).to(dtype)
        touched = fraction > 0
        outside = torch.full_like(fraction, -1.0)
        for b, k in zip(*torch.nonzero(touched.flatten(2).any(-1), as_tuple=True)):
            # MONAI's Euclidean distance transform (scipy on CPU, cuCIM on a GPU): distance to the nearest touched cell
            distance = distance_transform_edt((~touched[b, k])[None].float())[0]
            outside[b, k] = -torch.tanh(torch.as_tensor(distance, device=fraction.device, dtype=fraction.dtype)
                                        / float(self.config.mask_distance))
        return torch.where(touched, fraction, outside).to(dtype)

    def generation_latents(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """What a generative model learns: the scaled CT latent (posterior mode) of ``images`` and, for a paired
        autoencoder, the structure channels of ``masks`` standardised by ``mask_shift``/``mask_scale``."""
        latents = self.encode(images).latent_dist.mode() * float(self.config.scaling_factor)
        if not self.config.mask_channels:
            return latents
        if masks is None:
            raise ValueError(f"this paired autoencoder generates {self.config.mask_channels} structures with the CT: "
                             "pass their masks")
        shift, scale = self._mask_affine(latents)
        return torch.cat([latents, (self.encode_masks(masks.to(latents.device, latents.dtype)) - shift) / scale], dim=1)

    def structure_field_logits(self, mask_latents: torch.Tensor, spatial_size: Sequence[int],
                               levels: Sequence[float] | None = None) -> torch.Tensor:
        """Mask logits read from the structure channels alone (unstandardised, :meth:`split_latents`): each channel
        interpolated (trilinear) to ``spatial_size`` minus its level (``levels``, else ``mask_field_thresholds``,
        else 0, the encoding's boundary between touched and untouched cells), scaled so that sigmoid 0.5 is that level.

        The joint decoder (:meth:`decode`) reads the structures together with the CT latent, so a generated CT
        latent that is off also moves its masks; read this way a sample's contours are exactly its structure
        channels, at latent resolution (torch's ``interpolate``: MONAI's ``Resize`` works per sample, unbatched).
        """
        k = int(self.config.mask_channels)
        if mask_latents.shape[1] != k:
            raise ValueError(f"mask_latents have {mask_latents.shape[1]} channels, the autoencoder pairs {k}")
        levels = levels or self.config.mask_field_thresholds or [0.0] * k
        if len(levels) != k:
            raise ValueError(f"levels needs one value per structure channel ({k}), got {len(levels)}")
        fields, cells, centre = self._structure_fields(mask_latents, spatial_size)
        level = torch.tensor(levels, device=fields.device, dtype=fields.dtype).view(1, -1, 1, 1, 1)
        logits = (fields - level) * 20.0
        if cells is not None:
            # a cell that reads as inside keeps the voxels at its centre: trilinear interpolation averages an
            # isolated cell (a small node: one cell is 4^3 voxels) with its neighbours, below the level in every
            # voxel, and a structure the latent carries would vanish from its contours
            cells = (cells - level) * 20.0
            logits = torch.where(centre & (cells > 0), torch.maximum(logits, cells), logits)
        return logits

    @staticmethod
    def _structure_fields(mask_latents: torch.Tensor, spatial_size: Sequence[int]):
        """What reading structure channels at ``spatial_size`` needs, whatever the level: the channels interpolated
        trilinearly and, where ``spatial_size`` is an integer multiple >= 2 of the latent grid, each voxel's own
        cell value (nearest) and the mask of the 2^3 voxels at each cell's centre (else None, None)."""
        size = tuple(int(s) for s in spatial_size)
        fields = torch.nn.functional.interpolate(mask_latents.float(), size=size, mode="trilinear", align_corners=False)
        factors = [s // c for s, c in zip(size, mask_latents.shape[2:])]
        if not all(f >= 2 and f * c == s for f, c, s in zip(factors, mask_latents.shape[2:], size)):
            return fields, None, None
        cells = torch.nn.functional.interpolate(mask_latents.float(), size=size, mode="nearest")
        centre = torch.ones(size, dtype=torch.bool, device=fields.device)
        for axis, f in enumerate(factors):
            shape = [1, 1, 1]
            shape[axis] = -1
            offset = torch.arange(size[axis], device=fields.device) % f
            centre = centre & ((offset == f // 2 - 1) | (offset == f // 2)).view(shape)
        return fields, cells, centre

    @torch.no_grad()
    def fit_field_thresholds(self, masks: Sequence[torch.Tensor],
                             candidates: Sequence[float] = tuple(round(-0.2 + 0.05 * i, 2) for i in range(21))) -> list[float]:
        """Per structure, the level of :meth:`structure_field_logits` with the highest Dice against ``masks``
        (each (1 or B, mask_channels, X, Y, Z)) over all of them: what ``mask_field_thresholds`` is set to."""
        k = int(self.config.mask_channels)
        overlap = torch.zeros(len(candidates), k, dtype=torch.float64)
        total = torch.zeros(len(candidates), k, dtype=torch.float64)
        for batch in masks:
            truth = batch.float()
            fields = torch.nn.functional.interpolate(self.encode_masks(truth), size=truth.shape[2:], mode="trilinear",
                                                     align_corners=False)
            for i, level in enumerate(candidates):
                inside = (fields > level).float()
                overlap[i] += (inside * truth).sum((0, 2, 3, 4)).double()
                total[i] += (inside.sum((0, 2, 3, 4)) + truth.sum((0, 2, 3, 4))).double()
        dice = 2 * overlap / total.clamp_min(1.0)
        return [float(candidates[int(i)]) for i in dice.argmax(0)]

    @torch.no_grad()
    def levels_matching_volumes(self, mask_latents: torch.Tensor, spatial_size: Sequence[int], volumes: Sequence[float],
                                candidates: Sequence[float] = tuple(round(-0.3 + 0.025 * i, 3) for i in range(45))) -> list[float]:
        """Per structure, the level at which the structure channels ``mask_latents`` (N, K, x, y, z, unstandardised)
        of generated samples read as structures of mean volume ``volumes`` (voxels of ``spatial_size``, the
        training cases' mean): a generator's channels are smoother than encoded masks, so levels fitted on
        encoded masks read its small structures as absent."""
        k = int(self.config.mask_channels)
        if mask_latents.shape[1] != k or len(volumes) != k:
            raise ValueError(f"need {k} structure channels and {k} volumes, got {mask_latents.shape[1]} and {len(volumes)}")
        # read as the pipeline reads them (structure_field_logits): a voxel is inside at a level where its trilinear
        # field, or at a cell's centre voxels the cell's own value, is above it; interpolated once for every level
        fields, cells, centre = self._structure_fields(mask_latents, spatial_size)
        reach = fields if cells is None else torch.where(centre, torch.maximum(fields, cells), fields)
        flat = reach.transpose(0, 1).flatten(1)  # (K, N * voxels)
        mean_volume = torch.stack([(flat > float(level)).sum(1) for level in candidates]).double() / mask_latents.shape[0]
        target = torch.as_tensor(list(volumes), dtype=torch.float64)
        error = (torch.log1p(mean_volume) - torch.log1p(target)).abs()
        return [float(candidates[int(i)]) for i in error.argmin(0)]

    def split_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A generation latent -> (CT latent divided by ``scaling_factor``, structure channels or None)."""
        c = int(self.config.latent_channels)
        ct = latents[:, :c] / float(self.config.scaling_factor)
        if not self.config.mask_channels:
            return ct, None
        shift, scale = self._mask_affine(latents)
        return ct, (latents[:, c:] * scale + shift).clamp(-1.0, 1.0)

    def _mask_affine(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(self.config.mask_channels)
        shift = self.config.mask_shift if self.config.mask_shift is not None else [0.0] * k
        scale = self.config.mask_scale if self.config.mask_scale is not None else [1.0] * k
        view = (1, k) + (1,) * (like.ndim - 2)
        return (torch.as_tensor(shift, device=like.device, dtype=like.dtype).view(view),
                torch.as_tensor(scale, device=like.device, dtype=like.dtype).view(view))

    def freeze_encoder(self) -> None:
        """Stop gradients to everything that makes a latent (encoder and latent heads): only the decoder trains."""
        if self.config.backbone == "compact":
            self.encoder.requires_grad_(False)
            return
        for module in (self.network.encoder, self.network.quant_conv_mu, self.network.quant_conv_log_sigma):
            module.requires_grad_(False)

    def _intensity_windows(self) -> tuple[tuple[float, float], ...] | None:
        """(input HU window, input range, network HU window) as floats, or None when the network reads the input."""
        if self.config.network_hu_window is None:
            return None
        return tuple(tuple(map(float, v)) for v in (self.config.input_hu_window, self.config.input_range,
                                                    self.config.network_hu_window))

    def _to_network(self, x: torch.Tensor) -> torch.Tensor:
        """The model range (``input_hu_window`` <-> ``input_range``) -> what the network reads."""
        windows = self._intensity_windows()
        if windows is None:
            return x
        hu_window, model_range, network_window = windows
        return map_intensity(map_intensity(x, model_range, hu_window), network_window, (0.0, 1.0), clip=True)

    def _from_network(self, y: torch.Tensor) -> torch.Tensor:
        """What the network decodes -> the model range (the inverse of :meth:`_to_network` inside its window)."""
        windows = self._intensity_windows()
        if windows is None:
            return y
        hu_window, model_range, network_window = windows
        return map_intensity(map_intensity(y.float(), (0.0, 1.0), network_window), hu_window, model_range).to(y.dtype)

    def _encode_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run MONAI's encoder block by block, keeping the last map at each resolution."""
        if self.config.backbone == "compact":
            return self.encoder(x)
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
        h, features = self._encode_with_features(self._to_network(x))
        if self.config.backbone == "compact":
            mu, log_var = h.chunk(2, dim=1)
            log_var = torch.clamp(log_var, -30.0, 20.0)
        else:
            mu = self.network.quant_conv_mu(h)
            log_var = torch.clamp(self.network.quant_conv_log_sigma(h), -30.0, 20.0)
        distribution = DiagonalGaussianDistribution(torch.cat([mu, log_var], dim=1))
        feats = tuple(features) if return_features else ()
        if not return_dict:
            return (distribution, feats)
        return CTEncoderOutput(latent_dist=distribution, features=feats)

    def decode(self, z: torch.Tensor, mask_latents: torch.Tensor | None = None, return_dict: bool = True,
               masks: torch.Tensor | None = None, levels: Sequence[float] | None = None):
        """Decode latents (already divided by ``scaling_factor``) to the image space; a paired autoencoder also
        takes the structure channels ``mask_latents`` (:meth:`encode_masks`) and returns their mask logits.
        ``masks`` (B, K, X, Y, Z in [0, 1]): the guide of a ``mask_guidance`` decoder (default: read from
        ``mask_latents`` by :meth:`structure_field_logits` at ``levels``); ignored by other decoders."""
        mask_channels = int(self.config.mask_channels)
        compact = self.config.backbone == "compact"
        maisi = self.config.backbone == "maisi"  # its decoder reads the CT latent alone: structures are optional
        if mask_channels and not (maisi and mask_latents is None) and (
                mask_latents is None or mask_latents.shape[1] != mask_channels or mask_latents.shape[2:] != z.shape[2:]):
            got = None if mask_latents is None else tuple(mask_latents.shape)
            raise ValueError(f"this paired autoencoder decodes {mask_channels} structure channels at the latent's "
                             f"grid {tuple(z.shape[2:])} with the CT latent; got mask_latents {got}")
        if not mask_channels or (maisi and mask_latents is None):
            sample, logits = (self.decoder(z) if compact else self.network.decode(z)), None
        elif maisi:  # the published decoder: the CT only; masks from their channels
            sample = self.network.decode(z)
            logits = self.structure_field_logits(mask_latents, sample.shape[2:])
        else:
            h = z if compact else self.network.post_quant_conv(z)
            joint = torch.cat([h, mask_latents.to(z.dtype)], dim=1)
            if compact and self.config.mask_guidance:
                if masks is None:
                    size = [int(n) * self.compression for n in z.shape[2:]]
                    masks = (self.structure_field_logits(mask_latents, size, levels) > 0).to(z.dtype)
                out = self.decoder(joint, masks)
            else:
                out = self.decoder(joint) if compact else self.network.decoder(joint)
            sample, logits = out[:, : self.config.out_channels], out[:, self.config.out_channels:]
        sample = self._from_network(sample)
        return CTDecoderOutput(sample=sample, mask_logits=logits) if return_dict else (sample, logits)

    def forward(self, sample: torch.Tensor, masks: torch.Tensor | None = None, sample_posterior: bool = False,
                generator: torch.Generator | None = None, return_dict: bool = True):
        """Encode and decode ``sample``; a paired autoencoder needs the structures' ``masks`` (B, K, X, Y, Z)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        if self.config.mask_channels and masks is None:
            raise ValueError(f"this paired autoencoder needs the {self.config.mask_channels} structure masks to decode")
        decoded = self.decode(z, self.encode_masks(masks) if self.config.mask_channels else None, masks=masks)
        return decoded if return_dict else (decoded.sample, decoded.mask_logits)

    # ------------------------------------------------------------------ MAISI weights
    def load_maisi_checkpoint(self, path: str | Path) -> "CTAutoencoderKL":
        """Load MONAI MAISI autoencoder weights into this ``backbone="maisi"`` model (in place; returns self).

        ``path``: the ``.pt`` state dict MONAI publishes (``torch.load(..., weights_only=True)``: a file holding
        anything but tensors is refused, never unpickled; a wrapper dict such as MAISI's ``{"unet_state_dict": ...}``
        (:data:`MAISI_CHECKPOINT_KEYS`) and a DDP ``module.`` prefix are unwrapped) or a ``.safetensors`` file. Loading is strict: keys or shapes that do not
        match this model's MAISI configuration raise :class:`~medvlm.errors.InputError` listing them.
        """
        if self.config.backbone != "maisi":
            raise InputError(f"MAISI weights load into an autoencoder with backbone 'maisi', not {self.config.backbone!r}")
        state = read_state_dict(path)
        for wrapper in MAISI_CHECKPOINT_KEYS:
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{path} is not a state dict of tensors (MAISI publishes the autoencoder's state_dict)")
        expected = self.network.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                        for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
        if missing or unexpected or shapes:
            def listed(names):
                return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            problems = [f"{label}: {listed(names)}" for label, names in
                        (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if names]
            raise InputError(f"{path} does not match the MAISI autoencoder of this configuration (channels "
                             f"{list(self.config.channels)}, num_res_blocks {self.config.num_res_blocks}, latent_channels "
                             f"{self.config.latent_channels}); " + "; ".join(problems))
        self.network.load_state_dict(state, strict=True)
        return self

    # ------------------------------------------------------------------ tiles (bounded memory)
    def tiled_encode_mean(self, x: torch.Tensor, tile_size: Sequence[int], overlap: float = 0.25,
                          sw_batch_size: int = 1) -> torch.Tensor:
        """Latent means of a large volume, encoded tile by tile with Gaussian blending (MONAI sliding window)."""
        self._check_tile(tile_size)
        return sliding_window_inference(x, roi_size=tuple(tile_size), sw_batch_size=sw_batch_size,
                                        predictor=lambda t: self.encode(t).latent_dist.mean.clone(), overlap=overlap,
                                        mode="gaussian")

    def tiled_decode(self, z: torch.Tensor, tile_size: Sequence[int], overlap: float = 0.25,
                     sw_batch_size: int = 1, mask_latents: torch.Tensor | None = None,
                     levels: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode a large latent tile by tile (``tile_size`` in latent voxels) with Gaussian blending:
        (CT, mask logits or None). A ``mask_guidance`` decoder reads each tile's masks from its structure channels
        at ``levels``."""
        c = int(self.config.latent_channels)
        joint = z if mask_latents is None else torch.cat([z, mask_latents.to(z.dtype)], dim=1)

        def predictor(tile: torch.Tensor) -> torch.Tensor:
            out = self.decode(tile[:, :c], tile[:, c:] if mask_latents is not None else None, levels=levels)
            return out.sample if out.mask_logits is None else torch.cat([out.sample, out.mask_logits], dim=1)

        decoded = sliding_window_inference(joint, roi_size=tuple(tile_size), sw_batch_size=sw_batch_size,
                                           predictor=predictor, overlap=overlap, mode="gaussian")
        out_channels = int(self.config.out_channels)
        return decoded[:, :out_channels], (decoded[:, out_channels:] if mask_latents is not None else None)

    def _check_tile(self, tile_size: Sequence[int]) -> None:
        if any(int(s) % self.compression for s in tile_size):
            raise ValueError(f"tile_size {tuple(tile_size)} must be a multiple of the compression {self.compression}")


def read_state_dict(path: str | Path) -> dict:
    """A weights file as a dict without running code: ``.safetensors``, or a torch checkpoint read with
    ``weights_only=True`` (pickled objects other than tensors and containers are refused)."""
    import pickle

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} was refused: it holds pickled objects other than tensors, which could run code "
                         f"when loaded ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable weights file (corrupted or truncated?): {exc}") from None
    if not isinstance(state, dict):
        raise InputError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _as_levels(value: int | Sequence[int], levels: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * levels
