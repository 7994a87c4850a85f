"""Stage 3: the report-conditioned latent generative UNet (frozen VAE and text encoder; EMA weights;
epsilon or v prediction, or rectified flow; report dropout for classifier-free guidance; optionally on
latents and report token states computed once per case).

With a paired autoencoder the UNet learns generation latents: the CT latent plus the structure channels
(:meth:`medvlm.models.CTAutoencoderKL.encode_masks`), so the report decides where tumour, nodes and the
elective neck lie at the level of the masks and the CT follows them when decoded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import nn

from medvlm.config import preprocess_to_dict
from medvlm.models import CTAutoencoderKL
from medvlm.models.factory import PREDICTION_TYPES, build_unet, is_flow_matching, noised_latents, training_scheduler
from train.common import StageTrainer, TrainingError, load_upstream
from train.data import augmentation, collate, is_mirrored, load_cases, report_fields
from medvlm.text.encoders import tokenize_reports


def with_null_report(unet, states: torch.Tensor, attention_mask: torch.Tensor, drop: torch.Tensor):
    """Replace the reports of ``drop``-ped samples by the learned null report, zero-padded to the batch's
    length: the same context the pipelines build when there is no prompt (classifier-free guidance)."""
    batch, length, _ = states.shape
    null = unet.null_context(batch).to(states.dtype)
    count = min(null.shape[1], length)
    null_states = torch.zeros_like(states)
    null_states[:, :count] = null[:, :count]
    null_mask = torch.zeros_like(attention_mask)
    null_mask[:, :count] = 1
    context = torch.where(drop[:, None, None], null_states, states)
    mask = torch.where(drop[:, None], null_mask, attention_mask)
    return context, mask


def generation_latents(vae, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """What the generative UNet learns (:meth:`CTAutoencoderKL.generation_latents`), as a training error."""
    if vae.config.mask_channels and labels is None:
        raise TrainingError("a paired autoencoder (models.vae.mask_channels > 0) generates structures: the diffusion "
                            "stage needs labels for every training case")
    return vae.generation_latents(images, labels)


def snr_weights(scheduler, timesteps: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of a batch's ``timesteps`` that turn the prediction type's own weighting of the
    clean latent's error (epsilon: SNR, v-prediction: SNR + 1) into ``weighting``'s (``training.diffusion.
    snr_weighting``): "min_snr", min(SNR, gamma); "clipped" (v-prediction), min(SNR + 1, gamma + 1).
    diffusers has ``compute_snr`` and the Min-SNR formula only inline in its example scripts."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    own = snr + 1.0 if scheduler.config.prediction_type == "v_prediction" else snr.clamp(min=1e-8)
    wanted = torch.clamp(snr, max=gamma) if weighting == "min_snr" else torch.clamp(snr + 1.0, max=gamma + 1.0)
    return wanted / own


class DiffusionLoss(nn.Module):
    """Noise-prediction (or v-prediction) MSE. Takes CT ``images`` and report ``input_ids`` (encoded here by
    the frozen VAE and text encoder) or their precomputed ``latents`` and token ``states``."""

    def __init__(self, unet, vae, text_encoder, scheduler: DDPMScheduler, snr_weighting: str | None = None,
                 snr_gamma: float = 5.0):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.scheduler = unet, vae, text_encoder, scheduler
        self.snr_weighting, self.snr_gamma = snr_weighting, snr_gamma

    def forward(self, attention_mask, noise, timesteps, drop, images=None, labels=None, input_ids=None, latents=None,
                states=None, fields=None):
        with torch.no_grad():
            if latents is None:
                latents = generation_latents(self.vae, images, labels)
            latents = getattr(self.unet, "module", self.unet).normalize_latents(latents)
            if states is None:
                states = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        context, mask = with_null_report(self.unet, states, attention_mask, drop)
        if fields is not None:  # a dropped report drops its parsed fields too
            fields = torch.where(drop[:, None], torch.zeros_like(fields), fields)
        extra = {"report_fields": fields} if fields is not None else {}
        noisy = noised_latents(self.scheduler, latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, context, encoder_attention_mask=mask, **extra).sample
        if is_flow_matching(self.scheduler):  # rectified flow: the velocity of the straight path to the noise
            target = noise - latents
        else:
            target = noise if self.scheduler.config.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        if self.snr_weighting is None:
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
            return loss, {"total": loss.detach()}
        error = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        loss = (snr_weights(self.scheduler, timesteps, self.snr_weighting, self.snr_gamma) * error).mean()
        return loss, {"total": loss.detach(), "mse": error.mean().detach()}


class DiffusionTrainer(StageTrainer):
    name = "diffusion"

    def setup(self) -> nn.Module:
        from transformers import AutoModel, AutoTokenizer

        c = self.stage_config
        if c.prediction_type not in PREDICTION_TYPES:
            raise TrainingError(f"training.diffusion.prediction_type must be one of {PREDICTION_TYPES}, got {c.prediction_type!r}")
        self.cases = load_cases(self.data_dir, self.config, train_fraction=self.train_fraction, seed=self.config.training.seed,
                                synthetic=False)  # real CTs only: never the generator's own samples
        self.canonical_side = self.config.models.unet.canonical_side
        if self.canonical_side is not None:  # every lateralised case in the canonical side (mirrored once, here)
            from train.data import canonical_case

            self.cases = [canonical_case(case, self.canonical_side) for case in self.cases]
        self.batcher = self.batches(self.cases)
        self.paired = bool(self.config.models.vae.mask_channels)
        if self.paired and any(case.label is None for case in self.cases):
            raise TrainingError("models.vae.mask_channels > 0 (paired CT + structures) needs labels for every training case")
        self.augment = augmentation(self.config, with_label=self.paired)
        self.vae = self.frozen_upstream(CTAutoencoderKL.from_pretrained(load_upstream(self.output_dir, "vae", "vae")))
        self.text_encoder = self.frozen_upstream(AutoModel.from_pretrained(
            load_upstream(self.output_dir, "contrastive", "text_encoder"), local_files_only=True))
        self.tokenizer = AutoTokenizer.from_pretrained(load_upstream(self.output_dir, "contrastive", "tokenizer"), local_files_only=True)
        roi = self.config.data.preprocess.roi_size
        self.unet = build_unet(self.config.models, int(self.text_encoder.config.hidden_size),
                               template_size=[int(v) // self.vae.compression for v in roi])
        self.fields = int(self.unet.config.report_fields)
        self.scheduler = training_scheduler(c.num_train_timesteps, c.prediction_type)
        self.ema = EMAModel(self.unet.parameters(), decay=c.ema_decay)
        self.checkpoint_objects.append(self.ema)
        self.mirror = self.mirror_prob()
        self.cache = self._precompute() if c.cache_latents else None
        if self.unet.config.template_size is not None or self.unet.config.prior_rank:
            # the training cases (and their mirror images) as learned
            latents = self.cache["latents"] if self.cache is not None else self._precompute()["latents"]
            if self.unet.config.template_size is not None:
                # the CT latent only: a structure channel is standardised per channel already, and per voxel its
                # rare lesions would be outliers of a near-zero spread
                self.unet.set_template(latents, channels=self.vae.config.latent_channels)
            if self.unet.config.prior_rank:  # a linear model of the latents as learned: the anatomy samples start from
                self.unet.set_prior(self.unet.normalize_latents(latents[self._learned_rows(len(latents))]))
        return DiffusionLoss(self.unet, self.vae, self.text_encoder, self.scheduler, c.snr_weighting, c.snr_gamma)

    def _learned_rows(self, rows: int) -> list[int]:
        """Rows of the precomputed latents that training draws: every case, and the mirror image (rows N..2N-1)
        of those ``lateral_mirror`` may mirror (in a canonical side, only cases without a side)."""
        from train.data import has_side

        n = len(self.cases)
        mirrored = [n + i for i, case in enumerate(self.cases)
                    if rows > n and not (self.canonical_side is not None and has_side(case))]
        return list(range(n)) + mirrored

    @torch.no_grad()
    def _precompute(self) -> dict:
        """Latents (VAE posterior mode, scaled) and report token states of every training case, once; with
        ``lateral_mirror`` also of every case's mirror image (rows N..2N-1), drawn per step like the
        augmentation of uncached training (with ``canonical_side`` only for cases without a side)."""
        from tqdm.auto import tqdm

        from train.data import mirror_case

        cases = self.cases + ([mirror_case(c) for c in self.cases] if self.mirror else [])
        # one padding length for all cases (the longest prompt), so cached token states stack into batches
        tokens = tokenize_reports(self.tokenizer, [c.prompt for c in cases], self.config.text.max_length)
        latents, states = [], []
        for number, case in enumerate(tqdm(cases, desc="diffusion: caching latents",
                                           disable=not self.accelerator.is_local_main_process)):
            label = case.label[None].to(self.device) if self.paired else None
            latents.append(generation_latents(self.vae, case.image[None].to(self.device), label)[0].cpu())
            states.append(self.text_encoder(input_ids=tokens["input_ids"][number:number + 1].to(self.device),
                                            attention_mask=tokens["attention_mask"][number:number + 1].to(self.device)
                                            ).last_hidden_state[0].cpu())
        fields = report_fields(torch.as_tensor(np.stack([c.labels for c in cases])), self.fields)
        return {"latents": torch.stack(latents), "states": torch.stack(states), "mask": tokens["attention_mask"],
                "fields": fields}

    def _noise(self, index: int, latent_shape) -> dict:
        """Noise, timesteps and report dropout of global step ``index``, the same on every process."""
        generator = self.step_generator(index)
        rows = self.global_rows(latent_shape[0])
        c = self.stage_config
        return {"noise": self.share(torch.randn((rows, *latent_shape[1:]), generator=generator)),
                "timesteps": self.share(torch.randint(0, c.num_train_timesteps, (rows,), generator=generator)),
                "drop": self.share(torch.rand(rows, generator=generator) < c.report_dropout)}

    def make_inputs(self, index: int) -> dict:
        if self.cache is not None:
            indices = self.batcher.indices(index)
            if self.mirror:  # the cached mirror image of a case, drawn as train.data.mirrored draws it
                n, seed, epoch = len(self.cases), self.config.training.seed, self.batcher.epoch(index)
                keep = self.canonical_side is not None
                indices = [i + n if is_mirrored(self.cases[i], self.mirror, seed, epoch, int(i), keep) else i for i in indices]
            latents = self.cache["latents"][indices]
            inputs = {"latents": latents, "states": self.cache["states"][indices],
                      "attention_mask": self.cache["mask"][indices], **self._noise(index, latents.shape)}
            if self.cache["fields"] is not None:
                inputs["fields"] = self.cache["fields"][indices]
            return inputs
        batch = collate(self.cases, self.batcher.indices(index), self.augment, self.config.training.seed, self.batcher.epoch(index),
                        mirror_prob=self.mirror, keep_side=self.canonical_side is not None)
        images = batch["image"]
        factor = self.vae.compression
        shape = (images.shape[0], self.vae.generation_channels, *(s // factor for s in images.shape[2:]))
        tokens = tokenize_reports(self.tokenizer, batch["prompt"], self.config.text.max_length)
        inputs = {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                  **self._noise(index, shape)}
        if self.paired:
            inputs["labels"] = batch["label"]
        fields = report_fields(batch["labels"], self.fields)
        if fields is not None:
            inputs["fields"] = fields
        return inputs

    @torch.no_grad()
    def _structure_levels(self, unet, count: int = 8, steps: int = 25) -> list[float]:
        """Levels at which this model's structure channels read as the training cases' mean structure volumes:
        ``count`` samples of the first training reports (seeds 0..count-1, DDIM ``steps`` steps)."""
        from medvlm.models.factory import sampling_scheduler
        from pipelines.pipeline_report_to_ct import ReportToCTPipeline

        c = self.stage_config
        cases = self.cases[:count]
        pipe = ReportToCTPipeline(vae=self.vae, unet=unet.eval(), text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                  scheduler=sampling_scheduler(c.num_train_timesteps, c.prediction_type),
                                  preprocess=preprocess_to_dict(self.config.data.preprocess),
                                  max_report_tokens=self.config.text.max_length)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe([case.prompt for case in cases], num_inference_steps=steps, output_type="latent",
                       generator=[torch.Generator().manual_seed(i) for i in range(len(cases))]).ct
        volumes = torch.stack([case.label.float().flatten(1).sum(1) for case in cases]).mean(0)
        levels = self.vae.levels_matching_volumes(self.vae.split_latents(latents.cpu())[1], cases[0].label.shape[1:],
                                                  volumes.tolist())
        unet.train()
        return levels

    def after_optimizer_step(self, step: int) -> None:
        self.ema.to(self.device)
        self.ema.step(self.unwrap(self.unet).parameters())

    def export(self, folder: Path) -> None:
        unet = self.unwrap(self.unet)
        self.ema.copy_to(unet.parameters())  # the EMA weights are the ones that sample well
        if self.paired and self.vae.config.mask_encoding == "distance":
            unet.register_to_config(structure_levels=self._structure_levels(unet))
        unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
