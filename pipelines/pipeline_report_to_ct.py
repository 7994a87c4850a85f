"""ReportToCTPipeline: report text -> synthetic CT (HU) with paired contours, by report-conditioned latent diffusion."""
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from medvlm.config import PreprocessConfig, preprocess_from_dict, preprocess_to_dict
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

    Components:
        vae ([`CTAutoencoderKL`]), unet ([`ReportConditionedUNet3D`]), segmentation ([`FusedSegmentationDecoder`],
        optional), text_encoder + tokenizer (report token states), scheduler (DDIM for diffusion, the
        flow-matching Euler sampler for rectified flow, as trained; another of the same family swaps in with
        ``Scheduler.from_config(pipe.scheduler.config)``).

    Config: ``preprocess`` (spacing, HU window and ROI of the training data), ``structure_names``,
    ``thresholds``, ``report_format``, ``max_report_tokens``, ``vae_tile_size`` (latent voxels per decode tile).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae->segmentation"
    _optional_components = ["segmentation"]
    _config_names = ("preprocess", "structure_names", "thresholds", "max_report_tokens", "report_format", "vae_tile_size")
    _callback_tensor_inputs = ["latents"]
    _guidance_scale, _num_timesteps = 1.0, 0  # of the running (or last) call

    def __init__(self, vae: CTAutoencoderKL, unet: ReportConditionedUNet3D, text_encoder, tokenizer,
                 scheduler: SchedulerMixin, segmentation: FusedSegmentationDecoder | None = None,
                 preprocess: dict | None = None, structure_names: list | tuple = STRUCTURE_NAMES,
                 thresholds: list | tuple | None = None, max_report_tokens: int = 128, report_format: str = "structured",
                 vae_tile_size: list | tuple | None = None):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, segmentation=segmentation, text_encoder=text_encoder,
                              tokenizer=tokenizer, scheduler=scheduler)
        preprocess = dict(preprocess or preprocess_to_dict())
        thresholds = list(thresholds) if thresholds is not None else [0.5] * len(structure_names)
        self.register_to_config(preprocess=preprocess, structure_names=list(structure_names), thresholds=thresholds,
                                max_report_tokens=max_report_tokens, report_format=report_format,
                                vae_tile_size=list(vae_tile_size) if vae_tile_size is not None else None)

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
        ``num_images_per_prompt`` times. Pass them back to ``__call__`` to reuse one encoding.
        """
        return self._conditioning(prompt, device or self._execution_device, num_images_per_prompt,
                                  do_classifier_free_guidance, negative_prompt, prompt_embeds, negative_prompt_embeds)[:4]

    def _conditioning(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                      prompt_embeds, negative_prompt_embeds):
        """:meth:`encode_prompt`'s four tensors and the normalised texts of ``prompt`` (empty for embeddings)."""
        size = int(getattr(self.unet.config, "report_fields", 0) or 0)

        def encoded(texts):  # token states with padding zeroed, the UNet's fields (or None), the texts encoded
            states, mask, used = self.encode_reports(texts, device, self.config.max_report_tokens, self.config.report_format)
            return states * mask[..., None].to(states.dtype), self.report_fields(used, device, component="unet"), used

        def repeated(tensor):
            return None if tensor is None else tensor.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        used: list[str] = []
        if prompt_embeds is None:
            prompt_embeds, report_fields, used = encoded([prompt] if isinstance(prompt, str) else list(prompt))
        else:
            report_fields = torch.zeros(prompt_embeds.shape[0], size, device=device) if size else None
        count = prompt_embeds.shape[0]
        prompt_embeds, report_fields = repeated(prompt_embeds), repeated(report_fields)
        negative_report_fields = None
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None and negative_prompt is not None:
                negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
                negative_prompt_embeds, negative_report_fields, _ = encoded(negatives)
            if negative_prompt_embeds is None:  # the learned null report (report dropout in training); it parses nothing
                negative_prompt_embeds = self.unet.null_context(count).to(device, prompt_embeds.dtype)
            negative_prompt_embeds, negative_report_fields = repeated(negative_prompt_embeds), repeated(negative_report_fields)
            if report_fields is not None and negative_report_fields is None:
                negative_report_fields = torch.zeros_like(report_fields)
        return prompt_embeds, negative_prompt_embeds, report_fields, negative_report_fields, used

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
            if fields is None and int(getattr(self.segmentation.config, "report_fields", 0) or 0):
                fields = torch.zeros(batch, int(self.segmentation.config.report_fields), device=device)
            # the decoder's cross-attention and presence pooling skip padded tokens, as in training
            probabilities = torch.sigmoid(self.segmentation(fused, encoded.features, report_context, report_mask,
                                                            image=image, report_fields=fields))
            masks = probabilities >= thresholds

        # 7. post-process to Hounsfield units
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
