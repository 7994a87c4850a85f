"""ReportToCTPipeline: report text -> synthetic CT (HU) with paired contours, by report-conditioned latent diffusion."""
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from medvlm.config import PreprocessConfig, preprocess_from_dict, preprocess_to_dict, valid_prior_strength
from medvlm.data.laterality import (mirror_labels, mirror_volumes, mirrored_channels, other_side, side_of_labels,
                                    swap_side_words)
from medvlm.vocabulary import STRUCTURE_NAMES, TARGET_NAMES
from medvlm.data.transforms import to_hu
from medvlm.models import CTAutoencoderKL, FusedSegmentationDecoder, ReportConditionedUNet3D
from medvlm.models.factory import noised_latents
from medvlm.text.prompts import ProcessedReport
from pipelines.base import MedVLMPipeline

OUTPUT_TYPES = ("np", "pt", "nifti", "latent")
# voxels one call may generate (volumes x voxels per volume): CT and mask logits then stay under about 3 GB;
# more volumes go through several calls (the CLI generates in chunks)
MAX_GENERATED_VOXELS = 2 ** 26


def _check_prior_strength(value, argument: bool = False) -> None:
    if not valid_prior_strength(value):
        name = "`prior_strength`" if argument else "prior_strength"
        raise ValueError(f"{name} must be in (0, 1] (1: no latent prior), got {value!r}")


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
    (:meth:`CTAutoencoderKL.structure_field_logits`), so a sample's contours are exactly what was sampled;
    ``prior_strength``: the default of the call's argument (1: no prior).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae->segmentation"
    _optional_components = ["segmentation"]
    _config_names = ("preprocess", "structure_names", "thresholds", "max_report_tokens", "report_format", "vae_tile_size",
                     "mask_decoding", "prior_strength")
    _callback_tensor_inputs = ["latents"]
    _guidance_scale, _num_timesteps = 1.0, 0  # of the running (or last) call

    def __init__(self, vae: CTAutoencoderKL, unet: ReportConditionedUNet3D, text_encoder, tokenizer,
                 scheduler: SchedulerMixin, segmentation: FusedSegmentationDecoder | None = None,
                 preprocess: dict | None = None, structure_names: list | tuple = STRUCTURE_NAMES,
                 thresholds: list | tuple | None = None, max_report_tokens: int = 128, report_format: str = "structured",
                 vae_tile_size: list | tuple | None = None, mask_decoding: str = "joint", prior_strength: float = 1.0):
        super().__init__()
        if mask_decoding not in ("joint", "fields"):
            raise ValueError(f"mask_decoding must be 'joint' or 'fields', got {mask_decoding!r}")
        _check_prior_strength(prior_strength)
        self.register_modules(vae=vae, unet=unet, segmentation=segmentation, text_encoder=text_encoder,
                              tokenizer=tokenizer, scheduler=scheduler)
        preprocess = dict(preprocess or preprocess_to_dict())
        thresholds = list(thresholds) if thresholds is not None else [0.5] * len(structure_names)
        self.register_to_config(preprocess=preprocess, structure_names=list(structure_names), thresholds=thresholds,
                                max_report_tokens=max_report_tokens, report_format=report_format,
                                vae_tile_size=list(vae_tile_size) if vae_tile_size is not None else None,
                                mask_decoding=mask_decoding, prior_strength=float(prior_strength))

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return preprocess_from_dict(self.config.preprocess)

    _slice_size: int | None = None

    def enable_batch_slicing(self, slice_size: int = 4) -> None:
        """Run the UNet and the autoencoder's decoder on at most ``slice_size`` volumes at a time (the UNet's
        classifier-free guidance pair counts as two), as diffusers' ``enable_vae_slicing`` does for the decoder:
        less peak memory on a GPU, and on CPU faster, as a few volumes' activations stay in cache (32 samples on
        2 cores: UNet step 1.43 -> 1.16 s, decoding 13.4 -> 9.1 s). Each volume's result is the same up to float
        rounding."""
        if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
            raise ValueError(f"slice_size must be a positive integer, got {slice_size!r}")
        self._slice_size = slice_size

    def disable_batch_slicing(self) -> None:
        self._slice_size = None

    def _sliced(self, run: Callable, *batched: torch.Tensor | None) -> tuple:
        """``run(*batched)`` over slices of the batch (dimension 0), each output concatenated back; outputs are
        tensors or None."""
        size = self._slice_size
        if size is None or batched[0].shape[0] <= size:
            return run(*batched)
        parts = [run(*(None if b is None else b[i:i + size] for b in batched))
                 for i in range(0, batched[0].shape[0], size)]
        return tuple(None if p[0] is None else torch.cat(list(p)) for p in zip(*parts))

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
        """:meth:`encode_prompt`'s four tensors and the processed reports of ``prompt`` (empty for embeddings).

        With a UNet trained in a canonical side the token states are those of the report mirrored into that side
        (left and right swapped, with its negative prompt) where the report's primary lies on the other side; the
        fields stay as the report reads, so :meth:`__call__` knows which samples to mirror back.
        """
        size = int(getattr(self.unet.config, "report_fields", 0) or 0)

        def encoded(texts, mirror=None):  # token states (padding zeroed), the UNet's fields (or None), reports, mirror
            processed = self.process_reports(texts)  # de-identified and parsed once
            fields = self.report_fields(processed, device, component="unet")
            mirror = self._mirrored_rows(fields, len(processed)) if mirror is None else mirror
            seen = [swap_side_words(text) if flip else text
                    for text, flip in zip((r.model_text(self.config.report_format) for r in processed), mirror)]
            states, mask = self.encode_texts(seen, device, self.config.max_report_tokens)
            return states * mask[..., None].to(states.dtype), fields, processed, mirror

        def repeated(tensor):
            return None if tensor is None else tensor.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        used: list[ProcessedReport] = []
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
                 image: Any = None, masks: Any = None, strength: float = 1.0,
                 keep_structures: Sequence[str] | None = None, prior_strength: float | None = None,
                 return_dict: bool = True):
        """Generate CT volumes from report text, from noise or (``image``, ``strength``) from a source CT.

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
            image, masks, strength: image-to-image generation (as diffusers' img2img pipelines): the source CT(s)
                in HU on the model grid ((X, Y, Z) or (N, X, Y, Z), one per prompt or one for all; this pipeline's
                ``ct`` output is such a volume, and so is a case preprocessed with ``data.preprocess``) and, for a
                paired autoencoder, its structure masks ((K, X, Y, Z) or (N, K, X, Y, Z), ``structure_names``
                order) are encoded, noised to ``strength`` (0 < strength <= 1; 1: pure noise) and denoised with the
                report for the last ``round(num_inference_steps * strength)`` steps: the sample keeps the source's
                anatomy as far as the report and the noise leave it. A report of the other side than the canonical
                one mirrors the source too.
            keep_structures: with a source, the structures kept as they are (e.g. the organs at risk): their
                channels and the CT latent are held to the source's at every step (inpainting in channel space,
                as RePaint), so only the other structures (e.g. GTVp, GTVn, CTVn) are generated for the report; the
                returned CT is the source outside the regenerated structures (theirs in the source and in the
                sample, a few voxels wider, blended) and the decoded CT inside; the kept masks are the source's.
                The decoded CT inside follows the source's CT latent (and, with a mask-guided autoencoder, the
                sample's masks): a lesion moved by the report may not show in the image where its mask lies.
            prior_strength: with a UNet that carries a latent prior (``unet.has_prior``, ``models.unet.prior_rank``),
                generation from noise holds the anatomy (the CT latent and the organ-at-risk channels) to a draw
                from that prior (a linear model of the training cases' latents; its coefficients drawn with
                ``generator``), noised to each step's level, and sets it free for the last ``prior_strength`` of
                the steps; the targets (GTVp, GTVn, CTVn) are sampled for the report from pure noise throughout.
                1 disables it; default the pipeline config's ``prior_strength``. Ignored with a source ``image``.
        """
        # 1. check inputs
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        prompts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
        negatives = None if negative_prompt is None else ([negative_prompt] * len(prompts or [0]) if isinstance(negative_prompt, str) else list(negative_prompt))
        config = self.preprocess_config
        prior_strength = self.config.prior_strength if prior_strength is None else prior_strength
        _check_prior_strength(prior_strength, argument=True)
        source = self._source_volumes(image, masks, strength, volume_shape)
        kept = self._kept_channels(keep_structures, source)
        volume_shape = tuple(int(s) for s in (source[0].shape[2:] if source is not None else (volume_shape or config.roi_size)))
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

        # 2. encode prompts (and the negative / null report); `processed`: the reports, de-identified and parsed
        # once, whose texts the UNet saw (for the output); none for given embeddings
        given_fields = report_fields
        context, uncond, fields, uncond_fields, processed = self._conditioning(
            prompts, device, num_images_per_prompt, do_guidance, negatives, prompt_embeds, negative_prompt_embeds)
        if given_fields is not None and fields is not None:
            fields = given_fields.to(device).float().repeat_interleave(num_images_per_prompt, dim=0)
        if negative_report_fields is not None and uncond_fields is not None:
            uncond_fields = negative_report_fields.to(device).float().repeat_interleave(num_images_per_prompt, dim=0)
        # a UNet trained in a canonical side generates a report of the other side mirrored (its token states
        # already are, see _conditioning); the sample is mirrored back after decoding
        mirror = self._mirrored_rows(fields, batch)
        used = [report.model_text(self.config.report_format) for report in processed]
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
        timesteps = self.scheduler.timesteps
        if source is None:
            latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow matching starts from N(0, I)
        else:  # the source's latent noised to the first of the last `strength` of the steps (diffusers' img2img)
            start = len(timesteps) - max(1, int(round(num_inference_steps * float(strength))))
            timesteps = timesteps[start:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(start)
            latents, clean = self._source_latents(source, batch, num_images_per_prompt, mirror, latents, timesteps[:1])
        extra = {"generator": generator} if "generator" in __import__("inspect").signature(self.scheduler.step).parameters else {}

        # 4. denoising loop; with kept structures, `known` (1: held to the source) marks what is not generated
        def denoise(latents: torch.Tensor, clean: torch.Tensor | None = None, known: torch.Tensor | None = None,
                    held_steps: int | None = None):
            with self.progress_bar(total=len(timesteps)) as progress:
                for i, t in enumerate(timesteps):
                    model_input = torch.cat([latents, latents]) if do_guidance else latents
                    if hasattr(self.scheduler, "scale_model_input"):  # the flow-matching sampler scales nothing
                        model_input = self.scheduler.scale_model_input(model_input, t)
                    model_context = torch.cat([uncond, context]) if do_guidance else context
                    model_fields = None if fields is None else (torch.cat([uncond_fields, fields]) if do_guidance else fields)
                    prediction, = self._sliced(
                        lambda x, c, f: (self.unet(x, t, c, report_fields=f).sample,), model_input, model_context,
                        model_fields)
                    if do_guidance:
                        unconditional, conditional = prediction.chunk(2)
                        prediction = unconditional + self.guidance_scale * (conditional - unconditional)
                    latents = self.scheduler.step(prediction, t, latents, **extra).prev_sample
                    if known is not None and (held_steps is None or i + 1 < held_steps):
                        # the source's (or the prior draw's), noised to the next step's level (RePaint)
                        following = timesteps[i + 1] if i + 1 < len(timesteps) else None
                        held = clean if following is None else noised_latents(
                            self.scheduler, clean, randn_tensor(clean.shape, generator=generator, device=device,
                                                                dtype=clean.dtype), following.expand(batch))
                        latents = known * held + (1.0 - known) * latents
                    if callback_on_step_end is not None:
                        available = {"latents": latents}
                        outputs = callback_on_step_end(self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs})
                        latents = (outputs or {}).get("latents", latents)
                    progress.update()
            return latents

        self._num_timesteps = len(timesteps)
        if source is None and prior_strength < 1.0:  # the anatomy held to a prior draw until the last steps
            latents = self._prior_denoise(denoise, latents, float(prior_strength), generator, timesteps)
        elif kept is None:
            latents = denoise(latents)
        else:  # the regenerated structures sampled with the CT latent and the kept structures held to the source's
            known = torch.zeros_like(clean)
            known[:, kept] = 1.0
            latents = denoise(latents, clean, known)

        latents = self.unet.denormalize_latents(latents)  # generation latents (identity without a template)

        if output_type == "latent":
            self.maybe_free_model_hooks()
            latents = self._mirrored_back(latents, mirror, latent=True)
            return ReportToCTPipelineOutput(latents, None, self._affine(volume_shape), tuple(self.config.structure_names), used) \
                if return_dict else (latents, None)

        # 5. decode the CT and, from a paired latent, its structures (in tiles when larger than the configured tile)
        z, mask_latents = self.vae.split_latents(latents)
        # the levels at which a structure channel reads as inside: the contours of "fields" decoding, and the
        # masks a mask-guided decoder draws the CT's structures along
        levels = getattr(self.unet.config, "structure_levels", None)
        tile = self.config.vae_tile_size
        if tile is not None and any(s > t for s, t in zip(z.shape[2:], tile)):
            image, mask_logits = self.vae.tiled_decode(z, tile_size=tile, mask_latents=mask_latents, levels=levels)
        else:
            def decode(z: torch.Tensor, mask_latents: torch.Tensor | None) -> tuple:
                decoded = self.vae.decode(z, mask_latents, levels=levels)
                return decoded.sample, decoded.mask_logits

            image, mask_logits = self._sliced(decode, z, mask_latents)
        if mask_latents is not None and self.config.mask_decoding == "fields":
            mask_logits = self.vae.structure_field_logits(mask_latents, image.shape[2:], levels)
        low, high = config.output_range
        image = image.clamp(low, high)

        # 6. contours: the paired masks, or (CT-only autoencoder) the shared segmentation decoder's
        masks = None
        thresholds = torch.tensor(self.config.thresholds, device=device).view(1, -1, 1, 1, 1)
        if return_masks and mask_logits is not None:
            masks = torch.sigmoid(mask_logits.float()) >= thresholds
        elif return_masks:
            encoded = self.vae.encode(image, return_features=True)
            fused = self.unet(self.unet.normalize_latents(latents), 0, report_context, return_features=True).features[-1]
            fields = self.report_fields(processed, device) if processed else None
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
        if kept is not None:  # the source outside what was regenerated, its kept structures as they were
            ct, masks = self._pasted(source, ct, masks, kept, batch, num_images_per_prompt)
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

    def _prior_denoise(self, denoise: Callable, latents: torch.Tensor, strength: float, generator,
                       timesteps: torch.Tensor) -> torch.Tensor:
        """``denoise`` with the anatomy channels (the CT latent and every structure channel that is not a
        target) held to a draw from the UNet's latent prior for the first ``1 - strength`` of the steps."""
        if not getattr(self.unet, "has_prior", False):
            raise ValueError("`prior_strength` < 1 draws the anatomy from the UNet's latent prior, and this UNet has "
                             "none (train it with models.unet.prior_rank > 0, or pass prior_strength=1)")
        batch = latents.shape[0]
        coefficients = randn_tensor((batch, self.unet.prior_draw_size), generator=generator,
                                    device=latents.device, dtype=torch.float32)
        clean = self.unet.sample_prior(coefficients, latents.shape[2:]).to(latents.dtype)
        known = torch.zeros_like(clean)
        held = int(self.vae.config.latent_channels)
        known[:, :held] = 1.0
        if self.has_paired_masks:
            names = list(self.config.structure_names)
            known[:, [held + names.index(n) for n in names if n not in TARGET_NAMES]] = 1.0
        start = noised_latents(self.scheduler, clean, latents, timesteps[:1].expand(batch))
        latents = known * start + (1.0 - known) * latents
        held_steps = max(0, int(round(len(timesteps) * (1.0 - strength))))
        return denoise(latents, clean, known, held_steps=held_steps)

    def _source_volumes(self, image, masks, strength, volume_shape) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Checked source CT(s) (N, 1, X, Y, Z, model range) and masks (N, K, X, Y, Z) of image-to-image generation."""
        if image is None:
            if masks is not None:
                raise ValueError("`masks` belong to a source `image`; pass the image too")
            if strength != 1.0:
                raise ValueError("`strength` applies to image-to-image generation: pass a source `image`")
            return None
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")
        if volume_shape is not None:
            raise ValueError("pass either `volume_shape` or a source `image` (its grid is the volume's)")
        ct = torch.as_tensor(np.asarray(image, dtype=np.float32)) if not isinstance(image, torch.Tensor) else image.float()
        ct = ct[None] if ct.ndim == 3 else ct
        if ct.ndim != 4 or not torch.isfinite(ct).all():
            raise ValueError(f"`image` must be finite HU volume(s) (X, Y, Z) or (N, X, Y, Z), got shape {tuple(ct.shape)}")
        from medvlm.data.transforms import from_hu

        ct = torch.as_tensor(from_hu(ct.cpu().numpy(), self.preprocess_config))[:, None]
        labels = None
        if self.has_paired_masks:
            if masks is None:
                raise ValueError(f"this pipeline generates the CT with its {len(self.config.structure_names)} structures: "
                                 "pass the source's `masks` too")
            labels = torch.as_tensor(np.asarray(masks)).float() if not isinstance(masks, torch.Tensor) else masks.float()
            labels = labels[None] if labels.ndim == 4 else labels
            expected = (ct.shape[0], len(self.config.structure_names), *ct.shape[2:])
            if tuple(labels.shape) != expected:
                raise ValueError(f"`masks` must have shape {expected} (the image's volumes, structure_names order), "
                                 f"got {tuple(labels.shape)}")
        return ct, labels

    def _kept_channels(self, keep_structures, source) -> list[int] | None:
        """Generation-latent channels held to the source: the CT latent and the kept structures' channels."""
        if keep_structures is None:
            return None
        if source is None or source[1] is None:
            raise ValueError("`keep_structures` keeps structures of a source: pass `image` and `masks` "
                             "(a paired autoencoder)")
        names = list(self.config.structure_names)
        unknown = [n for n in keep_structures if n not in names]
        if unknown or not list(keep_structures):
            raise ValueError(f"`keep_structures` must name structures of {names}, got {list(keep_structures)}")
        c = int(self.vae.config.latent_channels)
        return list(range(c)) + [c + names.index(n) for n in keep_structures]

    @staticmethod
    def _source_rows(count: int, batch: int, per_prompt: int) -> torch.Tensor:
        prompts = batch // per_prompt
        if count not in (1, prompts):
            raise ValueError(f"`image` holds {count} volumes for {prompts} prompts (give one, or one per prompt)")
        return torch.arange(batch) // per_prompt if count > 1 else torch.zeros(batch, dtype=torch.long)

    def _pasted(self, source, ct: torch.Tensor, masks: torch.Tensor | None, kept: list[int], batch: int,
                per_prompt: int, margin: int = 2) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The source CT outside the regenerated structures (in the source and in the sample, ``margin`` voxels
        wider, blended over as many) and the sample inside; the kept structures' masks taken from the source."""
        rows = self._source_rows(source[0].shape[0], batch, per_prompt)
        source_hu = to_hu(source[0][rows, 0].to(ct.device, torch.float32), self.preprocess_config)
        labels = source[1][rows].to(ct.device) > 0.5
        c = int(self.vae.config.latent_channels)
        kept_structures = [k - c for k in kept if k >= c]
        regenerated = [k for k in range(labels.shape[1]) if k not in kept_structures]
        region = labels[:, regenerated].any(1)
        if masks is not None:
            region = region | masks[:, regenerated].to(region.device).any(1)
        wide = torch.nn.functional.max_pool3d(region[:, None].float(), 2 * margin + 1, stride=1, padding=margin)
        weight = torch.nn.functional.avg_pool3d(wide, 2 * margin + 1, stride=1, padding=margin, count_include_pad=False)[:, 0]
        weight = torch.maximum(weight, region.float())  # the regenerated structures themselves wholly from the sample
        pasted = weight * ct + (1.0 - weight) * source_hu
        if masks is not None:
            masks = masks.clone()
            masks[:, kept_structures] = labels[:, kept_structures].to(masks.device, masks.dtype)
        return pasted, masks

    def _source_latents(self, source, batch: int, per_prompt: int, mirror: Sequence[bool], noise: torch.Tensor,
                        timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation latents of the source volumes (one per prompt, repeated per image), mirrored where the
        report is generated in the canonical side: (noised to ``timestep``, clean)."""
        ct, labels = source
        rows = self._source_rows(ct.shape[0], batch, per_prompt)
        device, dtype = noise.device, noise.dtype
        ct = ct[rows].to(device, dtype)
        labels = labels[rows].to(device, dtype) if labels is not None else None
        if any(mirror):  # into the canonical side: the same flip as the one back
            ct = self._mirrored_back(ct, mirror)
            labels = self._mirrored_back(labels, mirror, structures=True) if labels is not None else None
        clean = self.unet.normalize_latents(self.vae.generation_latents(ct, labels).to(dtype))
        return noised_latents(self.scheduler, clean, noise, timestep.expand(batch)), clean

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
