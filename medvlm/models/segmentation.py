"""Segmentation decoder sharing the fused latent (the reference study's cross-modal attention fusion).

Two paths, summed as logits (one channel per structure, multi-label, sigmoid):

* the **report path** works at the latent scale: the diffusion UNet's fused latent, the VAE's
  latent-scale map and voxel coordinates go through MONAI ``UnetResBlock``s, each followed by cross-attention to the report's
  token states; its logits are upsampled (trilinear) to the CT grid. It carries what only the report
  says (the elective neck side and levels) and the fused latent's view of the anatomy.
* the **image path** is MONAI's ``UNet`` on the CT (plus fixed CT windows), the architecture of the
  image-only baseline, for voxel-accurate boundaries. The frozen VAE and diffusion UNet are trained for
  reconstruction and denoising; their features alone gave a decoder that learned the small organs several
  times slower than a UNet on the CT (demo phantom, docs/evaluation.md).

The report path's output layer starts near zero, so training starts from the image path.

With ``presence_head``, the report also says *whether* each structure exists: a cN0 neck has no nodal
GTV, a post-operative (adjuvant) case no primary GTV. A small head on the pooled report tokens gives a
per-structure presence logit, and the decoder's probability becomes
``P(voxel) = P(structure present | report) * P(voxel | present, image, report)``; without a report
nothing is ruled out. A voxel-wise network alone learns emptiness poorly: a whole case without the
structure is a few hundred false-positive voxels among 262,144 in its loss.

Two refinements of the presence head:

* ``report_fields``: the report's parsed fields (:func:`medvlm.text.parse.label_vector`: subsite, side,
  T, N, elective neck, ...) are read next to (or, with ``presence_tokens=False``, instead of) the pooled
  token states. The parser reads them exactly from either template family. From mean-pooled token states
  a head trained on the 84 demo cases read the elective neck's sides right in 0.78-0.83 of validation
  cases, from the fields in all of them; on 300 fresh phantom reports a head reading both put the
  elective neck on the wrong side for 5-9, one reading the fields alone for 1-3.
* ``side_structures`` (e.g. CTVn): presence is judged per side of the patient's midline (left, right, and
  a band of ``side_margin`` voxels around the midline that takes the structure's overall presence), so an
  ipsilateral elective neck rules out the contralateral neck. The midline is the body's x centroid
  (:func:`medvlm.models.windows.midline_distance`); callers working on patches pass ``side_map`` computed
  on the whole volume.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the base class in this module when loading
from monai.networks.blocks import UnetOutBlock, UnetResBlock
from monai.networks.nets import UNet
from torch import nn

from medvlm.vocabulary import STRUCTURE_NAMES
from medvlm.models.base import AlignedModelMixin
from medvlm.models.windows import DEFAULT_CT_WINDOWS, CTWindows, coordinate_channels, midline_distance
from medvlm.text.encoders import masked_mean


def fused_features(vae, unet, images: torch.Tensor, states: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, *, timestep: int = 0, scheduler=None,
                   generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The decoder's inputs for preprocessed CTs ``images``: the VAE encoder's feature maps (finest first), the
    scaled clean latents (posterior mode) and the UNet's fused features for the reports' token ``states`` and
    ``attention_mask`` (None: the null report). One path for training, its feature cache and ContourPipeline.

    ``timestep`` > 0: the UNet sees the latents noised to that step of the diffusers ``scheduler`` (noise drawn
    with ``generator``), as ContourPipeline's ``noise_timestep`` asks; training uses clean latents (0).
    """
    encoded = vae.encode(images, return_features=True)
    latents = encoded.latent_dist.mode() * float(vae.config.scaling_factor)
    if vae.config.mask_channels:
        # a paired UNet reads generation latents (CT + structure channels); contouring does not know the
        # structures, so their channels read 0, half-way between "none" (-1) and "all" (+1)
        latents = torch.cat([latents, latents.new_zeros(latents.shape[0], vae.config.mask_channels, *latents.shape[2:])], 1)
    seen = unet.normalize_latents(latents)
    if vae.config.mask_channels and getattr(unet.config, "template_size", None) is not None:
        seen = seen.clone()
        seen[:, vae.config.latent_channels:] = 0.0  # unknown structures: the typical case's, in the UNet's units
    if timestep > 0:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        from medvlm.models.factory import noised_latents

        seen = noised_latents(scheduler, latents, noise, torch.tensor([timestep], device=latents.device))
    fused = unet(seen, timestep, states, return_features=True, encoder_attention_mask=attention_mask).features[-1]
    return list(encoded.features), latents, fused


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


def joint_logits(voxel_logits: torch.Tensor, presence_logits: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(a) * sigmoid(b))`` computed stably: ``a + b - log(1 + e^a + e^b)``."""
    return voxel_logits + presence_logits - torch.logaddexp(nn.functional.softplus(voxel_logits), presence_logits)


SIDE_SOFTNESS = 0.5  # voxels: width of the soft step between the midline band and each side


def side_presence_logits(presence: torch.Tensor, side_map: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-voxel presence logits from per-side presence.

    ``presence`` (B, K, 3): logits of (anywhere, left side, right side); ``side_map`` (B, 1, X, Y, Z): signed
    distance from the midline (positive = right). Voxels further than ``margin`` from the midline take
    their side's presence, the band around it the overall presence, blended softly:
    ``q = w_left * sigmoid(left) + w_band * sigmoid(any) + w_right * sigmoid(right)``; returns ``logit(q)``
    (B, K, X, Y, Z), computed in log space (stable for saturated logits).
    """
    zero = torch.zeros_like(side_map)
    log_weights = torch.stack([(-side_map - margin) / SIDE_SOFTNESS, zero, (side_map - margin) / SIDE_SOFTNESS]
                              ).log_softmax(dim=0)  # (3, B, 1, X, Y, Z)
    any_, left, right = presence.unbind(-1)
    side_logits = torch.stack([left, any_, right])[(...,) + (None,) * (side_map.ndim - 2)]  # (3, B, K, 1, 1, 1)
    log_q = torch.logsumexp(log_weights + nn.functional.logsigmoid(side_logits), dim=0)
    log_not_q = torch.logsumexp(log_weights + nn.functional.logsigmoid(-side_logits), dim=0)
    return log_q - log_not_q


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
        presence_head: per-structure presence from the report (see the module docstring); it starts at
            "present" (probability about 0.98), so an untrained head changes little.
        report_fields: length of the parsed report-field vector the presence head reads (0: token states only).
        presence_tokens: whether the presence head reads the pooled report token states (needs them or fields).
        side_structures: structures whose presence the head judges per side of the midline (needs ``presence_head``).
        side_margin: half-width in voxels of the band around the midline that keeps the overall presence.
    """

    @register_to_config
    def __init__(self, num_classes: int = len(STRUCTURE_NAMES), fused_channels: int = 32,
                 skip_channels: Sequence[int] = (16, 32, 32), decoder_channels: Sequence[int] = (16, 32, 64, 128),
                 context_dim: int = 384, num_heads: int = 4, norm_num_groups: int = 8, num_res_units: int = 1,
                 report_channels: int = 64, report_layers: int = 2, null_tokens: int = 1,
                 structure_names: Sequence[str] = STRUCTURE_NAMES,
                 ct_windows: Sequence[Sequence[float]] = DEFAULT_CT_WINDOWS,
                 input_hu_window: Sequence[float] = (-1000.0, 1500.0), input_range: Sequence[float] = (-1.0, 1.0),
                 presence_head: bool = False, report_fields: int = 0, side_structures: Sequence[str] = (),
                 side_margin: float = 2.0, presence_tokens: bool = True):
        super().__init__()
        if len(structure_names) != num_classes:
            raise ValueError(f"{num_classes} classes but {len(structure_names)} structure names")
        if len(decoder_channels) < 2:
            raise ValueError(f"decoder_channels {tuple(decoder_channels)} needs at least two UNet levels")
        if report_layers < 1:
            raise ValueError(f"report_layers must be >= 1, got {report_layers}")
        unknown = [name for name in side_structures if name not in structure_names]
        if unknown:
            raise ValueError(f"side_structures {unknown} are not among the structures {list(structure_names)}")
        if (side_structures or report_fields) and not presence_head:
            raise ValueError("side_structures and report_fields refine the presence head: set presence_head=True")
        if presence_head and not presence_tokens and not report_fields:
            raise ValueError("a presence head reading no token states (presence_tokens=False) needs report_fields")
        if side_margin < 0 or report_fields < 0:
            raise ValueError(f"side_margin ({side_margin}) and report_fields ({report_fields}) must be >= 0")
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
        self.presence = None
        self.sided = [i for i, name in enumerate(structure_names) if name in side_structures]
        if presence_head:
            # per structure: (anywhere) or, with side_structures, (anywhere, left side, right side)
            outputs = num_classes * (3 if side_structures else 1)
            inputs = (context_dim if presence_tokens else 0) + report_fields
            self.presence = nn.Sequential(nn.LayerNorm(inputs), nn.Linear(inputs, report_channels), nn.SiLU(),
                                          nn.Linear(report_channels, outputs))
            # near zero, not zero (every weight gets gradient from step one); sigmoid(4) = 0.98: start from "present"
            nn.init.normal_(self.presence[-1].weight, std=1e-3)
            nn.init.constant_(self.presence[-1].bias, 4.0)

    @property
    def has_sides(self) -> bool:
        return bool(self.config.side_structures)

    def presence_logits(self, text_states: torch.Tensor, text_mask: torch.Tensor | None,
                        report_fields: torch.Tensor | None = None) -> torch.Tensor:
        """Presence logits from the report's token states (masked mean) and parsed fields: (B, num_classes),
        or (B, num_classes, 3) for (anywhere, left, right) with ``side_structures``.

        ``report_fields`` (B, report_fields): :func:`medvlm.text.parse.label_vector` of each report; ``None``
        is "nothing parsed" (all zero), as for a report whose fields the parser could not read.
        """
        if self.presence is None:
            raise ValueError("this decoder has no presence head (presence_head=False)")
        # the token states give the batch size and dtype; they are pooled only for a head that reads them
        inputs = [masked_mean(text_states, text_mask)] if self.config.presence_tokens else []
        size = self.config.report_fields
        if size:
            batch = text_states.shape[0]
            if report_fields is None:
                report_fields = text_states.new_zeros(batch, size)
            if tuple(report_fields.shape) != (batch, size):
                raise ValueError(f"report_fields must be (batch, {size}), got {tuple(report_fields.shape)}")
            inputs.append(report_fields.to(text_states.dtype))
        logits = self.presence(torch.cat(inputs, dim=1))
        return logits.view(logits.shape[0], -1, 3) if self.has_sides else logits

    def presence_map(self, presence: torch.Tensor, side_map: torch.Tensor) -> torch.Tensor:
        """Presence logits broadcastable to the voxel logits (B, K, 1, 1, 1), or per voxel (B, K, X, Y, Z) with sides."""
        if not self.has_sides:
            return presence[(...,) + (None,) * 3]
        overall = presence[..., 0][(...,) + (None,) * 3].expand(-1, -1, *side_map.shape[2:])
        sided = side_presence_logits(presence[:, self.sided], side_map, float(self.config.side_margin))
        out = overall.clone()
        out[:, self.sided] = sided.to(out.dtype)
        return out

    def null_context(self, batch_size: int) -> torch.Tensor:
        return self.null_text_embedding.expand(batch_size, -1, -1)

    def report_logits(self, fused: torch.Tensor, latent_map: torch.Tensor, text_states: torch.Tensor,
                      text_mask: torch.Tensor | None, coordinates: torch.Tensor) -> torch.Tensor:
        """The report path's logits at the latent scale.

        ``coordinates`` (B, 3, X, Y, Z) at the image's scale, averaged down to the latent grid: the voxel
        coordinates (:func:`medvlm.models.windows.coordinate_channels`) of the ROI the input was cut from.
        """
        if fused.shape[2:] != latent_map.shape[2:]:
            fused = nn.functional.interpolate(fused, size=latent_map.shape[2:], mode="trilinear", align_corners=False)
        if coordinates.shape[0] != latent_map.shape[0] or coordinates.shape[1] != 3:
            raise ValueError(f"coordinates must be (batch, 3, X, Y, Z), got {tuple(coordinates.shape)}")
        coordinates = nn.functional.adaptive_avg_pool3d(coordinates.to(latent_map), latent_map.shape[2:])
        h = torch.cat([fused, latent_map, coordinates], dim=1)
        for block, attention in zip(self.report_blocks, self.report_attention):
            h = attention(block(h), text_states, text_mask)
        return self.report_head(h)

    def forward(self, fused: torch.Tensor, skips: Sequence[torch.Tensor], text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, null_report: bool = False,
                image: torch.Tensor | None = None, return_presence: bool = False,
                report_fields: torch.Tensor | None = None, side_map: torch.Tensor | None = None,
                coordinates: torch.Tensor | None = None):
        """Logits (B, num_classes, X, Y, Z) at the CT's resolution.

        ``null_report=True`` (or ``text_states=None``) replaces the report with the learned null report.
        With a presence head and a report, the logits are those of ``P(present) * P(voxel | present)``;
        ``return_presence=True`` returns ``(logits, presence_logits)``, the latter ``None`` without a report
        or head (training supervises it with whether each structure occurs in the case).
        ``report_fields``: parsed fields of each report (see :meth:`presence_logits`).
        ``side_map`` (B, 1, X, Y, Z): distance from the patient's midline for ``side_structures``
        (:func:`medvlm.models.windows.midline_distance`); default: computed from ``image``, right for a whole volume.
        ``coordinates`` (B, 3, X, Y, Z): for a patch cut from a larger ROI, the ROI's voxel coordinates
        (:func:`medvlm.models.windows.coordinate_channels`) cut the same way, as ``side_map``; default: those of
        ``image`` itself, as in the pipelines, which contour whole ROIs. Training on patches without them gave
        the report path patch-relative positions that differ from the whole ROI's at inference.
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
        no_report = null_report or text_states is None
        if no_report:
            text_states, text_mask = self.null_context(fused.shape[0]), None
        text_states = text_states.to(fused.dtype)
        image_logits = self.image_path(self.windows(image.to(fused.dtype)))
        if coordinates is None:
            coordinates = coordinate_channels(image)
        elif tuple(coordinates.shape[2:]) != tuple(image.shape[2:]):
            raise ValueError(f"coordinates size {tuple(coordinates.shape[2:])} differs from the image's {tuple(image.shape[2:])}")
        coarse = self.report_logits(fused, skips[-1], text_states, text_mask, coordinates)
        logits = image_logits + nn.functional.interpolate(coarse, size=image_logits.shape[2:], mode="trilinear",
                                                          align_corners=False)
        presence = None
        if self.presence is not None and not no_report:
            presence = self.presence_logits(text_states, text_mask, report_fields)
            if self.has_sides and side_map is None:
                side_map = midline_distance(image, self.windows.hu_window, self.windows.output_range)
            if side_map is not None and tuple(side_map.shape[2:]) != tuple(logits.shape[2:]):
                raise ValueError(f"side_map size {tuple(side_map.shape[2:])} differs from the image's {tuple(logits.shape[2:])}")
            logits = joint_logits(logits, self.presence_map(presence, side_map))
        return (logits, presence) if return_presence else logits
