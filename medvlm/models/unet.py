"""Report-conditioned 3D diffusion UNet: MONAI's ``DiffusionModelUNet`` as a diffusers model.

Cross-attention on the report's token states at the configured levels. ``forward`` returns the noise
(or v) prediction and, on request, the decoder's intermediate maps: the *fused latent* that the
segmentation decoder reads. MONAI's forward is re-stepped here (same modules, same order) because it
returns only the final output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the base class in this module when loading

from medvlm.models.base import AlignedModelMixin
from diffusers.utils import BaseOutput
from monai.networks.nets import DiffusionModelUNet
from monai.transforms import AddCoordinateChannels
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn


@dataclass
class UNet3DOutput(BaseOutput):
    """``sample``: the prediction; ``features``: up-block outputs, coarsest first (last = fused latent)."""

    sample: torch.Tensor
    features: tuple[torch.Tensor, ...] = ()


class ReportConditionedUNet3D(AlignedModelMixin, ConfigMixin):
    """3D conditional UNet over VAE latents; ``encoder_hidden_states`` are report token states (B, L, d).

    ``null_context(batch)`` gives the learned "no report" context used for classifier-free guidance and
    for contouring without a report. With ``report_fields`` > 0 the report's parsed fields (a multi-hot
    vector, :func:`medvlm.text.parse.label_vector`) become one more context token (a linear embedding; all
    zeros = nothing parsed), so side, stage and elective neck reach the UNet as directly as the tokens do;
    with ``fields_time`` they are also added to the timestep embedding (as a class label is in class-conditional
    diffusion), so every residual block sees them. With ``coordinates`` the input gets three coordinate channels
    (MONAI ``AddCoordinateChannels``, -0.5..0.5 along x, y, z of the latent grid): a convolutional UNet is otherwise
    blind to where it is, and a left-right symmetric anatomy under noise gives it no cue which side is left.
    With ``canonical_side`` ("left"/"right") the UNet was trained on every lateralised case mirrored into that
    side (:mod:`medvlm.data.laterality`); a pipeline generates a report of the other side in the canonical frame
    and mirrors the result back. ``structure_levels``: per structure channel of a paired latent, the level at
    which this model's samples read as structures of the training cases' mean volume (set at export,
    :meth:`CTAutoencoderKL.levels_matching_volumes`), used when contours are read from the structure channels.
    """

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: int = 4, channels: Sequence[int] = (32, 64, 64),
                 attention_levels: Sequence[bool] = (False, True, True), num_res_blocks: int | Sequence[int] = 1,
                 num_head_channels: int | Sequence[int] = 16, cross_attention_dim: int = 384, norm_num_groups: int = 16,
                 transformer_num_layers: int = 1, null_tokens: int = 1, report_fields: int = 0, fields_time: bool = False,
                 coordinates: bool = False, canonical_side: str | None = None,
                 structure_levels: Sequence[float] | None = None, template_size: Sequence[int] | None = None,
                 prior_rank: int = 0, prior_size: Sequence[int] | None = None, prior_spread: float | None = None,
                 prior_rows: int = 0):
        super().__init__()
        if canonical_side not in (None, "left", "right"):
            raise ValueError(f"canonical_side must be None, 'left' or 'right', got {canonical_side!r}")
        if canonical_side is not None and not report_fields:
            raise ValueError("canonical_side reads the primary's side from the parsed report fields: it needs report_fields > 0")
        self.network = DiffusionModelUNet(
            spatial_dims=3, in_channels=in_channels + (3 if coordinates else 0), out_channels=out_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels), num_res_blocks=num_res_blocks, num_head_channels=num_head_channels,
            with_conditioning=True, cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups,
            transformer_num_layers=transformer_num_layers,
            # torch's fused scaled_dot_product_attention instead of MONAI's explicit einsum + softmax: the same
            # weights and the same outputs (to float rounding), a quarter less sampling time on CPU; diffusers'
            # own attention processors use it by default too. No attention dropout in these blocks.
            use_flash_attention=True,
        )
        self.null_text_embedding = nn.Parameter(torch.zeros(1, null_tokens, cross_attention_dim))
        nn.init.normal_(self.null_text_embedding, std=0.02)
        self.fields_embedding = nn.Linear(report_fields, cross_attention_dim) if report_fields else None
        if fields_time and not report_fields:
            raise ValueError("fields_time adds the parsed report fields to the timestep embedding: it needs report_fields > 0")
        # class-conditional diffusion's path: a global condition added to the timestep embedding reaches every
        # residual block (MONAI's class embedding takes one integer label; the fields are a multi-hot vector)
        self.fields_time_embedding = nn.Linear(report_fields, int(channels[0]) * 4) if fields_time else None
        if template_size is not None:  # per latent voxel mean and spread of the training latents (set from data)
            grid = tuple(int(v) for v in template_size)
            self.register_buffer("template_mean", torch.zeros(in_channels, *grid))
            self.register_buffer("template_std", torch.ones(in_channels, *grid))
        if prior_rank:  # a linear model of the training latents as this UNet models them (set from data)
            if prior_size is None:
                raise ValueError("prior_rank > 0 needs prior_size, the latent grid of the training cases")
            grid = tuple(int(v) for v in prior_size)
            self.register_buffer("prior_mean", torch.zeros(in_channels, *grid))
            self.register_buffer("prior_components", torch.zeros(int(prior_rank), in_channels, *grid))
            self.register_buffer("prior_cases", torch.zeros((), dtype=torch.long))
            if prior_spread is not None and (isinstance(prior_spread, bool) or not float(prior_spread) >= 0.0):
                raise ValueError(f"prior_spread must be None (Gaussian draws) or a number >= 0, got {prior_spread!r}")
            if prior_spread is not None:  # each training case's coefficients (set_prior records prior_rows)
                self.register_buffer("prior_coefficients", torch.zeros(int(prior_rows), int(prior_rank)))

    def set_template(self, latents: torch.Tensor, channels: int | None = None) -> None:
        """Per-voxel mean and standard deviation (floored at 0.05) of training latents (N, C, x, y, z), for the
        first ``channels`` channels (default all; the others stay as they are: mean 0, spread 1)."""
        if self.config.template_size is None:
            raise ValueError("this UNet has no latent template (template_size)")
        channels = latents.shape[1] if channels is None else int(channels)
        with torch.no_grad():
            self.template_mean.zero_()
            self.template_std.fill_(1.0)
            self.template_mean[:channels] = latents[:, :channels].mean(0)
            self.template_std[:channels] = latents[:, :channels].std(0).clamp_min(0.05)

    @property
    def has_prior(self) -> bool:
        """Whether a latent prior was fitted (:meth:`set_prior`)."""
        return bool(self.config.prior_rank) and int(self.prior_cases) > 0

    def set_prior(self, latents: torch.Tensor) -> None:
        """Fit the latent prior to training latents (N, C, x, y, z) as this UNet models them (after
        :meth:`normalize_latents`): their mean and their first ``prior_rank`` principal directions, each scaled
        by its standard deviation over the cases (a Gaussian in the span of the cases, as an active appearance
        model). torch's SVD, as nothing in MONAI or diffusers fits one to a few hundred volumes."""
        if not self.config.prior_rank:
            raise ValueError("this UNet has no latent prior (prior_rank 0)")
        if latents.ndim != 5 or tuple(latents.shape[1:]) != tuple(self.prior_mean.shape) or latents.shape[0] < 2:
            raise ValueError(f"the prior is fitted to >= 2 latents of shape {tuple(self.prior_mean.shape)}, "
                             f"got {tuple(latents.shape)}")
        flat = latents.detach().reshape(latents.shape[0], -1).double().cpu()
        mean = flat.mean(0)
        cases, spread, directions = torch.linalg.svd(flat - mean, full_matrices=False)
        rank = min(int(self.config.prior_rank), directions.shape[0])
        rank = max(1, min(rank, int((spread > spread[0] * 1e-6).sum())))  # directions the cases actually span
        components = torch.zeros_like(self.prior_components)
        scaled = directions[:rank] * (spread[:rank, None] / (flat.shape[0] - 1) ** 0.5)
        components[:rank] = scaled.reshape(rank, *self.prior_mean.shape).to(components)
        with torch.no_grad():
            self.prior_mean.copy_(mean.reshape(self.prior_mean.shape).to(self.prior_mean))
            self.prior_components.copy_(components)
            self.prior_cases.fill_(int(flat.shape[0]))
        if self.config.prior_spread is not None:
            # each case's coordinates along the scaled components (its projection, in units of their spread)
            coefficients = torch.zeros(flat.shape[0], int(self.config.prior_rank), dtype=self.prior_mean.dtype)
            coefficients[:, :rank] = (cases[:, :rank] * (flat.shape[0] - 1) ** 0.5).to(coefficients)
            self.register_buffer("prior_coefficients", coefficients.to(self.prior_mean.device))
            self.register_to_config(prior_rows=int(flat.shape[0]))

    @property
    def prior_draw_size(self) -> int:
        """How many standard normal numbers one draw of :meth:`sample_prior` takes: one per component, and with
        ``prior_spread`` one more that picks the training case the draw is made around."""
        return int(self.config.prior_rank) + (1 if self.config.prior_spread is not None else 0)

    def sample_prior(self, coefficients: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """Latents (N, C, *grid) drawn from the prior: its mean plus coefficients times its scaled components,
        resampled to ``grid`` when it differs. ``coefficients`` (N, :attr:`prior_draw_size`), standard normal for
        a random draw: the coefficients themselves (a Gaussian over the cases' span); with ``prior_spread``, the
        last column picks one training case (uniformly, through the normal's distribution function) and the
        others, times ``prior_spread``, are added to that case's own coefficients (a kernel density over the
        cases: each draw is a real anatomy, varied, not a blend of all of them)."""
        if not self.has_prior:
            raise ValueError("this UNet's latent prior was never fitted (set_prior)")
        if coefficients.ndim != 2 or coefficients.shape[1] != self.prior_draw_size:
            raise ValueError(f"a draw of this prior takes (N, {self.prior_draw_size}) numbers, got {tuple(coefficients.shape)}")
        coefficients = coefficients.float()
        if self.config.prior_spread is not None:
            rows = self.prior_coefficients.shape[0]
            if rows == 0:
                raise ValueError("this UNet's prior has no case coefficients (fit it with set_prior)")
            rank = int(self.config.prior_rank)
            row = (torch.special.ndtr(coefficients[:, rank].double()) * rows).floor().long().clamp(0, rows - 1)
            coefficients = self.prior_coefficients.to(coefficients.device, torch.float32)[row.to(coefficients.device)] \
                + float(self.config.prior_spread) * coefficients[:, :rank]
        components = self.prior_components.to(coefficients.device, torch.float32)
        draws = self.prior_mean.to(coefficients.device, torch.float32)[None] + torch.einsum(
            "nk,k...->n...", coefficients.float(), components)
        if grid is not None and tuple(grid) != tuple(draws.shape[2:]):
            draws = torch.nn.functional.interpolate(draws, size=tuple(grid), mode="trilinear", align_corners=False)
        return draws

    def _template(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.template_mean[None], self.template_std[None]
        if mean.shape[2:] != like.shape[2:]:  # another grid: the template resampled to it
            mean = torch.nn.functional.interpolate(mean, size=like.shape[2:], mode="trilinear", align_corners=False)
            std = torch.nn.functional.interpolate(std, size=like.shape[2:], mode="trilinear", align_corners=False)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Generation latents -> what this UNet models: with a template, each voxel's deviation from the training
        cases' mean latent in units of their spread (the model learns how a case differs from the typical one)."""
        if self.config.template_size is None:
            return latents
        mean, std = self._template(latents)
        return (latents - mean) / std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize_latents`."""
        if self.config.template_size is None:
            return latents
        mean, std = self._template(latents)
        return latents * std + mean

    @property
    def feature_channels(self) -> int:
        """Channels of the fused latent (the last up-block's output)."""
        return int(self.config.channels[0])

    def null_context(self, batch_size: int) -> torch.Tensor:
        return self.null_text_embedding.expand(batch_size, -1, -1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor | None = None,
                return_features: bool = False, return_dict: bool = True,
                encoder_attention_mask: torch.Tensor | None = None, report_fields: torch.Tensor | None = None):
        """Predict noise (or v) for ``sample`` (B, C, x, y, z) at ``timestep``; ``None`` text = null report.

        ``encoder_attention_mask`` (B, L) zeroes padded report tokens: MONAI's cross-attention takes no
        padding mask, so padding must not carry content. ``report_fields`` (B, F): the parsed fields' token
        (a UNet built with ``report_fields``; None = nothing parsed).
        """
        net = self.network
        batch = sample.shape[0]
        if encoder_hidden_states is None:
            encoder_hidden_states = self.null_context(batch)
        if encoder_hidden_states.shape[-1] != self.config.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states last dim {encoder_hidden_states.shape[-1]} != "
                             f"cross_attention_dim {self.config.cross_attention_dim}")
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        context = encoder_hidden_states.to(sample.dtype)
        if encoder_attention_mask is not None:
            context = context * encoder_attention_mask[..., None].to(context.dtype)
        if self.fields_embedding is not None:
            size = self.config.report_fields
            if report_fields is None:
                report_fields = context.new_zeros(batch, size)
            if report_fields.shape != (batch, size):
                raise ValueError(f"report_fields has shape {tuple(report_fields.shape)}, expected ({batch}, {size})")
            token = self.fields_embedding(report_fields.to(context.dtype))[:, None]
            context = torch.cat([context, token], dim=1)

        if self.config.coordinates:
            grid = AddCoordinateChannels(spatial_dims=(0, 1, 2))(sample.new_zeros(1, *sample.shape[2:]))[1:]
            sample = torch.cat([sample, grid[None].expand(batch, -1, -1, -1, -1).to(sample.dtype)], dim=1)
        emb = net.time_embed(get_timestep_embedding(timesteps, net.block_out_channels[0]).to(sample.dtype))
        if self.fields_time_embedding is not None:
            emb = emb + self.fields_time_embedding(report_fields.to(emb.dtype))
        h = net.conv_in(sample)
        residuals: list[torch.Tensor] = [h]
        for block in net.down_blocks:
            h, res = block(hidden_states=h, temb=emb, context=context)
            residuals.extend(res)
        h = net.middle_block(hidden_states=h, temb=emb, context=context)
        features = []
        for block in net.up_blocks:
            count = len(block.resnets)
            skip, residuals = residuals[-count:], residuals[:-count]
            h = block(hidden_states=h, res_hidden_states_list=skip, temb=emb, context=context)
            features.append(h)
        out = net.out(h)
        feats = tuple(features) if return_features else ()
        if not return_dict:
            return (out, feats)
        return UNet3DOutput(sample=out, features=feats)
