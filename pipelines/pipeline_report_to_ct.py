"""ReportToCTPipeline: report text -> synthetic CT (HU) with paired contours, by report-conditioned latent diffusion."""
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from medvlm.config import PreprocessConfig, preprocess_from_dict, preprocess_to_dict
from medvlm.data.laterality import (mirror_labels, mirror_volumes, mirrored_channels, other_side, side_of_labels,
                                    swap_side_words)
from medvlm.data.structures import STRUCTURE_NAMES
from medvlm.data.transforms import to_hu
from medvlm.models import CTAutoencoderKL, FusedSegmentationDecoder, ReportConditionedUNet3D
from pipelines.base import MedVLMPipeline

OUTPUT_TYPES = ("np", "pt", "nifti", "latent")
# voxels one call may generate (volumes x voxels per volume): CT and mask logits then stay under about 3 GB;
# more volumes go through several calls (the CLI generates in chunks)
MAX_GENERATED_VOXELS = 2 ** 26


@dataclass
class ReportToCTPipelineOutput(BaseOutput):
    """``ct``: (N, X, Y, Z) in HU (np/pt) or a list of ``nibabel`` images; ``masks``: (N, C, X, Y, Z) bool
    (np/pt) when requested; ``affine`` of every volume; the (de-identified) prompts used."""

    ct: Any
    masks: Any
    affine: np.ndarray
    structure_names: tuple[str, ...]
    prompts: list[str]


class ReportToCTPipeline(MedVLMPipeline):
    r"""Synthesise CT volumes with paired contours from report text (data augmentation).

    With a paired autoencoder (``vae.config.mask_channels`` > 0) the sampled latent holds the CT latent and one
    channel per structure, and the autoencoder decodes the CT and its masks together: the contours are
    generated with the CT, not predicted from it afterwards. With a CT-only autoencoder the optional
    ``segmentation`` decoder contours the generated CT instead.

    A UNet trained in a canonical side (``unet.config.canonical_side``) generates a report whose primary lies
    on the other side as its mirror image and flips the CT and its contours back (``Parotid_L`` <-> ``Parotid_R``),
    so the generated primary lies on the report's side by construction; midline and unread sides are generated
    as they are.

    Components:
        vae ([`CTAutoencoderKL`]), unet ([`ReportConditionedUNet3D`]), segmentation ([`FusedSegmentationDecoder`],
        optional), text_encoder + tokenizer (report token states), scheduler (DDIM for diffusion, the
        flow-matching Euler sampler for rectified flow, as trained; another of the same family swaps in with
        ``Scheduler.from_config(pipe.scheduler.config)``).

    Config: ``preprocess`` (spacing, HU window and ROI of the training data), ``structure_names``,
    ``thresholds``, ``report_format``, ``max_report_tokens``, ``vae_tile_size`` (latent voxels per decode tile),
    ``mask_decoding``: ``"joint"`` reads the paired masks with the autoencoder's decoder (from the structure
    channels together with the CT latent), ``"fields"`` from the structure channels alone
    (:meth:`CTAutoencoderKL.structure_field_logits`), so a sample's contours are exactly what was sampled.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae->segmentation"
    _optional_components = ["segmentation"]
    _config_names = ("preprocess", "structure_names", "thresholds", "max_report_tokens", "report_format", "vae_tile_size",
                     "mask_decoding")
    _callback_tensor_inputs = ["latents"]
    _guidance_scale, _num_timesteps = 1.0, 0  # of the running (or last) call

    def __init__(self, vae: CTAutoencoderKL, unet: ReportConditionedUNet3D, text_encoder, tokenizer,
                 scheduler: SchedulerMixin, segmentation: FusedSegmentationDecoder | None = None,
                 preprocess: dict | None = None, structure_names: list | tuple = STRUCTURE_NAMES,
                 thresholds: list | tuple | None = None, max_report_tokens: int = 128, report_format: str = "structured",
                 vae_tile_size: list | tuple | None = None, mask_decoding: str = "joint"):
        super().__init__()
        if mask_decoding not in ("joint", "fields"):
            raise ValueError(f"mask_decoding must be 'joint' or 'fields', got {mask_decoding!r}")
        self.register_modules(vae=vae, unet=unet, segmentation=segmentation, text_encoder=text_encoder,
                              tokenizer=tokenizer, scheduler=scheduler)
        preprocess = dict(preprocess or preprocess_to_dict())
        thresholds = list(thresholds) if thresholds is not None else [0.5] * len(structure_names)
        self.register_to_config(preprocess=preprocess, structure_names=list(structure_names), thresholds=thresholds,
                                max_report_tokens=max_report_tokens, report_format=report_format,
                                vae_tile_size=list(vae_tile_size) if vae_tile_size is not None else None,
                                mask_decoding=mask_decoding)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return preprocess_from_dict(self.config.preprocess)

    def check_inputs(self, prompts: list, negative_prompts: list | None, num_inference_steps: int, guidance_scale: float,
                     output_type: str, volume_shape: Sequence[int], latents: torch.Tensor | None, batch: int,
                     num_images_per_prompt: int, generator, return_masks: bool) -> None:
        if prompts is not None and (not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts)):
            raise ValueError(f"`prompt` must be non-empty text (or a list of texts), got {prompts!r}")
        if negative_prompts is not None and prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"`negative_prompt` has {len(negative_prompts)} entries for {len(prompts)} prompts")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a finite number >= 0 (1 = no guidance), got {guidance_scale}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}")
        factor = self.vae.compression
        if len(volume_shape) != 3 or any(int(s) % factor or int(s) <= 0 for s in volume_shape):
            raise ValueError(f"`volume_shape` {tuple(volume_shape)} must be three positive multiples of the VAE compression {factor}")
        voxels = batch * int(np.prod([int(s) for s in volume_shape]))
        if voxels > MAX_GENERATED_VOXELS:
            raise ValueError(f"{batch} volume(s) of {tuple(volume_shape)} are {voxels:,} voxels, more than one call generates "
                             f"({MAX_GENERATED_VOXELS:,}); generate fewer volumes per call or a smaller `volume_shape`")
        if latents is not None:
            expected = (batch, self.unet.config.in_channels, *(int(s) // factor for s in volume_shape))
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {expected} (prompts x "
                                 "num_images_per_prompt, generation channels, the volume's latent grid)")
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` holds NaN or infinite values")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"`generator` is a list of {len(generator)}, expected {batch} (one per volume)")
        if return_masks and not self.has_paired_masks and self.segmentation is None:
            raise ValueError("`return_masks=True` needs a paired autoencoder or the segmentation component")

    @property
    def guidance_scale(self) -> float:
        """Classifier-free guidance of the running (or last) call; a step-end callback may change it."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int:
        """Sampler steps of the running (or last) call."""
        return self._num_timesteps

    def encode_prompt(self, prompt: str | list[str] | None = None, device: torch.device | None = None,
                      num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      negative_prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None):
        """Report text -> the UNet's conditioning, as diffusers pipelines split it out.

        Returns ``(prompt_embeds, negative_prompt_embeds, report_fields, negative_report_fields)``: token states
        with padded tokens zeroed (N, L, d); for guidance the negative report's or the learned null report's
        (None without guidance); the parsed fields' vectors for a UNet with a fields token (None otherwise;
        zeros, nothing parsed, for given embeddings and the null report). Each repeats
        ``num_images_per_prompt`` times. Pass them back to ``__call__`` to reuse one encoding. With a UNet
        trained in a canonical side (``unet.config.canonical_side``) the token states of a report of the other
        side are those of its mirror image, and the fields (as the report reads) tell ``__call__`` to mirror
        that sample back.
        """
        return self._conditioning(prompt, device or self._execution_device, num_images_per_prompt,
                                  do_classifier_free_guidance, negative_prompt, prompt_embeds, negative_prompt_embeds)[:4]

    def _conditioning(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                      prompt_embeds, negative_prompt_embeds):
        """:meth:`encode_prompt`'s four tensors and the normalised texts of ``prompt`` (empty for embeddings).

        With a UNet trained in a canonical side the token states are those of the report mirrored into that side
        (left and right swapped, with its negative prompt) where the report's primary lies on the other side; the
        fields stay as the report reads, so :meth:`__call__` knows which samples to mirror back.
        """
        size = int(getattr(self.unet.config, "report_fields", 0) or 0)

        def encoded(texts, mirror=None):  # token states (padding zeroed), the UNet's fields (or None), texts, mirror
            used = self.normalised_reports(texts, self.config.report_format)
            fields = self.report_fields(used, device, component="unet")
            mirror = self._mirrored_rows(fields, len(used)) if mirror is None else mirror
            seen = [swap_side_words(text) if flip else text for text, flip in zip(used, mirror)]
            states, mask = self.encode_texts(seen, device, self.config.max_report_tokens)
            return states * mask[..., None].to(states.dtype), fields, used, mirror

        def repeated(tensor):
            return None if tensor is None else tensor.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        used: list[str] = []
        mirror = None
        if prompt_embeds is None:
            prompt_embeds, report_fields, used, mirror = encoded([prompt] if isinstance(prompt, str) else list(prompt))
        else:
            report_fields = torch.zeros(prompt_embeds.shape[0], size, device=device) if size else None
        count = prompt_embeds.shape[0]
        prompt_embeds, report_fields = repeated(prompt_embeds), repeated(report_fields)
        negative_report_fields = None
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None and negative_prompt is not None:
                negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
                negative_prompt_embeds, negative_report_fields, _, _ = encoded(negatives, mirror or [False] * count)
            if negative_prompt_embeds is None:  # the learned null report (report dropout in training); it parses nothing
                negative_prompt_embeds = self.unet.null_context(count).to(device, prompt_embeds.dtype)
            negative_prompt_embeds, negative_report_fields = repeated(negative_prompt_embeds), repeated(negative_report_fields)
            if report_fields is not None and negative_report_fields is None:
                negative_report_fields = torch.zeros_like(report_fields)
        return prompt_embeds, negative_prompt_embeds, report_fields, negative_report_fields, used

    @property
    def canonical_side(self) -> str | None:
        """The side the UNet generates every lateralised primary in ("left"/"right"), or None (both sides)."""
        return getattr(self.unet.config, "canonical_side", None)

    def _mirrored_rows(self, fields: torch.Tensor | None, count: int) -> list[bool]:
        """Which samples are generated mirrored: those whose parsed side is not the UNet's canonical side."""
        if self.canonical_side is None or fields is None:
            return [False] * count
        other = other_side(self.canonical_side)
        return [side == other for side in side_of_labels(fields)]

    @property
    def has_paired_masks(self) -> bool:
        """Whether sampled latents carry the structures (a paired autoencoder)."""
        return bool(getattr(self.vae.config, "mask_channels", 0))

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 3.0, generator: torch.Generator | list | None = None,
                 latents: torch.Tensor | None = None, num_images_per_prompt: int = 1, output_type: str = "np",
                 return_masks: bool | None = None, volume_shape: Sequence[int] | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 report_fields: torch.Tensor | None = None, negative_report_fields: torch.Tensor | None = None,
                 callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] = ("latents",),
                 return_dict: bool = True):
        """Generate CT volumes from report text.

        Args:
            prompt: report text(s); de-identified and normalised like the training reports.
            negative_prompt: text(s) to steer away from; default the learned null report.
            num_inference_steps, guidance_scale: sampler steps and classifier-free guidance (1 disables it).
            generator: a ``torch.Generator`` or one per volume (then a batch equals single calls).
            latents: initial noise (N, C, x, y, z) instead of drawing it.
            output_type: ``"np"`` (HU arrays), ``"pt"``, ``"nifti"`` (nibabel images) or ``"latent"``.
            return_masks: also return contours: the paired masks decoded with the CT, or (CT-only autoencoder)
                the segmentation decoder's contours of the generated CT. Default: whenever available.
            volume_shape: voxels (x, y, z) at the preprocessing spacing; default the training ROI.
            prompt_embeds, negative_prompt_embeds, report_fields, negative_report_fields: a conditioning from
                :meth:`encode_prompt` instead of ``prompt`` / ``negative_prompt`` (fields default to zeros:
                nothing parsed).
            callback_on_step_end: ``f(pipe, step, timestep, {"latents": ...}) -> dict`` after each step; it may
                set ``pipe._guidance_scale`` (read back by the ``guidance_scale`` property each step).
        """
        # 1. check inputs
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        prompts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
        negatives = None if negative_prompt is None else ([negative_prompt] * len(prompts or [0]) if isinstance(negative_prompt, str) else list(negative_prompt))
        config = self.preprocess_config
        volume_shape = tuple(int(s) for s in (volume_shape or config.roi_size))
        if prompt_embeds is not None and (prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.unet.config.cross_attention_dim):
            raise ValueError(f"`prompt_embeds` must be (N, tokens, {self.unet.config.cross_attention_dim}), got {tuple(prompt_embeds.shape)}")
        batch = (len(prompts) if prompts is not None else prompt_embeds.shape[0]) * num_images_per_prompt
        if return_masks is None:
            return_masks = self.has_paired_masks or self.segmentation is not None
        self.check_inputs(prompts, negatives, num_inference_steps, guidance_scale, output_type, volume_shape, latents, batch,
                          num_images_per_prompt, generator, return_masks)
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {unknown} not in {self._callback_tensor_inputs}")
        device = self._execution_device
        self._guidance_scale = float(guidance_scale)
        do_guidance = self.do_classifier_free_guidance

        # 2. encode prompts (and the negative / null report); `used`: the texts the UNet saw (de-identified,
        # normalised), for the output; none for given embeddings
        given_fields = report_fields
        context, uncond, fields, uncond_fields, used = self._conditioning(
            prompts, device, num_images_per_prompt, do_guidance, negatives, prompt_embeds, negative_prompt_embeds)
        if given_fields is not None and fields is not None:
            fields = given_fields.to(device).float().repeat_interleave(num_images_per_prompt, dim=0)
        if negative_report_fields is not None and uncond_fields is not None:
            uncond_fields = negative_report_fields.to(device).float().repeat_interleave(num_images_per_prompt, dim=0)
        # a UNet trained in a canonical side generates a report of the other side mirrored (its token states
        # already are, see _conditioning); the sample is mirrored back after decoding
        mirror = self._mirrored_rows(fields, batch)
        if any(mirror):
            fields = mirror_labels(fields, mirror)
            uncond_fields = mirror_labels(uncond_fields, mirror) if uncond_fields is not None else None
        report_context = context  # before guidance padding: what the decoder contours with
        report_mask = (context.abs().sum(-1) > 0).long()
        if do_guidance:
            length = max(context.shape[1], uncond.shape[1])
            context, uncond = self._pad(context, length), self._pad(uncond, length)

        # 3. prepare latents
        factor = self.vae.compression
        shape = (batch, self.unet.config.in_channels, *(s // factor for s in volume_shape))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow matching starts from N(0, I)
        extra = {"generator": generator} if "generator" in __import__("inspect").signature(self.scheduler.step).parameters else {}

        # 4. denoising loop
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents, latents]) if do_guidance else latents
                if hasattr(self.scheduler, "scale_model_input"):  # the flow-matching sampler scales nothing
                    model_input = self.scheduler.scale_model_input(model_input, t)
                model_context = torch.cat([uncond, context]) if do_guidance else context
                model_fields = None if fields is None else (torch.cat([uncond_fields, fields]) if do_guidance else fields)
                prediction = self.unet(model_input, t, model_context, report_fields=model_fields).sample
                if do_guidance:
                    unconditional, conditional = prediction.chunk(2)
                    prediction = unconditional + self.guidance_scale * (conditional - unconditional)
                latents = self.scheduler.step(prediction, t, latents, **extra).prev_sample
                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    outputs = callback_on_step_end(self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs})
                    latents = (outputs or {}).get("latents", latents)
                progress.update()

        if output_type == "latent":
            self.maybe_free_model_hooks()
            latents = self._mirrored_back(latents, mirror, latent=True)
            return ReportToCTPipelineOutput(latents, None, self._affine(volume_shape), tuple(self.config.structure_names), used) \
                if return_dict else (latents, None)

        # 5. decode the CT and, from a paired latent, its structures (in tiles when larger than the configured tile)
        z, mask_latents = self.vae.split_latents(latents)
        tile = self.config.vae_tile_size
        if tile is not None and any(s > t for s, t in zip(z.shape[2:], tile)):
            image, mask_logits = self.vae.tiled_decode(z, tile_size=tile, mask_latents=mask_latents)
        else:
            decoded = self.vae.decode(z, mask_latents)
            image, mask_logits = decoded.sample, decoded.mask_logits
        if mask_latents is not None and self.config.mask_decoding == "fields":
            mask_logits = self.vae.structure_field_logits(mask_latents, image.shape[2:],
                                                          getattr(self.unet.config, "structure_levels", None))
        low, high = config.output_range
        image = image.clamp(low, high)

        # 6. contours: the paired masks, or (CT-only autoencoder) the shared segmentation decoder's
        masks = None
        thresholds = torch.tensor(self.config.thresholds, device=device).view(1, -1, 1, 1, 1)
        if return_masks and mask_logits is not None:
            masks = torch.sigmoid(mask_logits.float()) >= thresholds
        elif return_masks:
            encoded = self.vae.encode(image, return_features=True)
            fused = self.unet(latents, 0, report_context, return_features=True).features[-1]
            fields = self.report_fields(used, device) if used else None
            fields = fields.repeat_interleave(num_images_per_prompt, dim=0) if fields is not None else None
            fields = mirror_labels(fields, mirror) if fields is not None and any(mirror) else fields
            if fields is None and int(getattr(self.segmentation.config, "report_fields", 0) or 0):
                fields = torch.zeros(batch, int(self.segmentation.config.report_fields), device=device)
            # the decoder's cross-attention and presence pooling skip padded tokens, as in training
            probabilities = torch.sigmoid(self.segmentation(fused, encoded.features, report_context, report_mask,
                                                            image=image, report_fields=fields))
            masks = probabilities >= thresholds

        # 7. mirror back what was generated in the canonical side; post-process to Hounsfield units
        image = self._mirrored_back(image, mirror)
        masks = self._mirrored_back(masks, mirror, structures=True) if masks is not None else None
        ct = to_hu(image[:, 0].float(), config)
        affine = self._affine(volume_shape)
        if output_type == "np":
            ct = ct.cpu().numpy()
            masks = masks.cpu().numpy() if masks is not None else None
        elif output_type == "nifti":
            import nibabel as nib

            ct = [nib.Nifti1Image(np.round(v).astype(np.int16), affine) for v in ct.cpu().numpy()]
            masks = masks.cpu().numpy() if masks is not None else None
        self.maybe_free_model_hooks()
        output = ReportToCTPipelineOutput(ct, masks, affine, tuple(self.config.structure_names), used)
        return output if return_dict else (ct, masks)

    def _mirrored_back(self, volumes: torch.Tensor, mirror: Sequence[bool], structures: bool = False,
                       latent: bool = False) -> torch.Tensor:
        """``volumes`` (N, C, X, Y, Z) flipped left-right in the mirrored rows: CT as is, structures with
        ``*_L`` <-> ``*_R``, a generation latent's structure channels likewise (its CT channels flip only)."""
        if not any(mirror):
            return volumes
        order = None
        if structures:
            order = mirrored_channels(self.config.structure_names)
        elif latent and self.has_paired_masks:
            c = int(self.vae.config.latent_channels)
            order = list(range(c)) + [c + i for i in mirrored_channels(self.config.structure_names)]
        return mirror_volumes(volumes, mirror, channel_order=order)

    @staticmethod
    def _pad(states: torch.Tensor, length: int) -> torch.Tensor:
        if states.shape[1] == length:
            return states
        pad = states.new_zeros(states.shape[0], length - states.shape[1], states.shape[2])
        return torch.cat([states, pad], dim=1)

    def _affine(self, volume_shape: Sequence[int]) -> np.ndarray:
        spacing = np.asarray(self.preprocess_config.spacing_mm, dtype=np.float64)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -(np.asarray(volume_shape) - 1) / 2.0 * spacing  # centred on the origin, RAS
        return affine
