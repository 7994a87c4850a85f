"""Stage 3: the report-conditioned latent diffusion UNet (frozen VAE and text encoder; EMA weights;
epsilon or v prediction; report dropout for classifier-free guidance; optionally on latents and report
token states computed once per case)."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import nn

from medvlm.models import CTAutoencoderKL
from medvlm.models.factory import build_unet, training_scheduler
from train.common import StageTrainer, TrainingError
from train.data import augmentation, collate, load_cases


def load_upstream(output_dir: Path, stage: str, component: str) -> Path:
    folder = output_dir / stage / "final" / component
    if not folder.is_dir():
        raise TrainingError(f"stage needs the {stage!r} stage's {component!r}, not found at {folder}; train {stage} first")
    return folder


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


class DiffusionLoss(nn.Module):
    """Noise-prediction (or v-prediction) MSE. Takes CT ``images`` and report ``input_ids`` (encoded here by
    the frozen VAE and text encoder) or their precomputed ``latents`` and token ``states``."""

    def __init__(self, unet, vae, text_encoder, scheduler: DDPMScheduler):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.scheduler = unet, vae, text_encoder, scheduler

    def forward(self, attention_mask, noise, timesteps, drop, images=None, input_ids=None, latents=None, states=None):
        with torch.no_grad():
            if latents is None:
                latents = self.vae.encode(images).latent_dist.mode() * float(self.vae.config.scaling_factor)
            if states is None:
                states = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        context, mask = with_null_report(self.unet, states, attention_mask, drop)
        prediction = self.unet(noisy, timesteps, context, encoder_attention_mask=mask).sample
        target = noise if self.scheduler.config.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        return loss, {"total": loss.detach()}


class DiffusionTrainer(StageTrainer):
    name = "diffusion"

    def setup(self) -> nn.Module:
        from transformers import AutoModel, AutoTokenizer

        c = self.stage_config
        if c.prediction_type not in ("epsilon", "v_prediction"):
            raise TrainingError(f"training.diffusion.prediction_type must be 'epsilon' or 'v_prediction', got {c.prediction_type!r}")
        self.cases = load_cases(self.data_dir, self.config, train_fraction=self.train_fraction, seed=self.config.training.seed)
        self.batcher = self.batches(len(self.cases))
        self.augment = augmentation(self.config, with_label=False)
        self.vae = self.frozen_upstream(CTAutoencoderKL.from_pretrained(load_upstream(self.output_dir, "vae", "vae")))
        self.text_encoder = self.frozen_upstream(AutoModel.from_pretrained(
            load_upstream(self.output_dir, "contrastive", "text_encoder"), local_files_only=True))
        self.tokenizer = AutoTokenizer.from_pretrained(load_upstream(self.output_dir, "contrastive", "tokenizer"), local_files_only=True)
        self.unet = build_unet(self.config.models, int(self.text_encoder.config.hidden_size))
        self.scheduler = training_scheduler(c.num_train_timesteps, c.prediction_type)
        self.ema = EMAModel(self.unet.parameters(), decay=c.ema_decay)
        self.checkpoint_objects.append(self.ema)
        self.mirror = self.mirror_prob("cache_latents encodes every case once, unaugmented" if c.cache_latents else None)
        self.cache = self._precompute() if c.cache_latents else None
        return DiffusionLoss(self.unet, self.vae, self.text_encoder, self.scheduler)

    @torch.no_grad()
    def _precompute(self) -> dict:
        """Latents (VAE posterior mode, scaled) and report token states of every training case, once."""
        from tqdm.auto import tqdm

        # one padding length for all cases (the longest prompt), so cached token states stack into batches
        tokens = self.tokenizer([c.prompt for c in self.cases], padding=True, truncation=True,
                                max_length=self.config.text.max_length, return_tensors="pt")
        latents, states = [], []
        scale = float(self.vae.config.scaling_factor)
        for number, case in enumerate(tqdm(self.cases, desc="diffusion: caching latents",
                                           disable=not self.accelerator.is_local_main_process)):
            latents.append((self.vae.encode(case.image[None].to(self.device)).latent_dist.mode() * scale)[0].cpu())
            states.append(self.text_encoder(input_ids=tokens["input_ids"][number:number + 1].to(self.device),
                                            attention_mask=tokens["attention_mask"][number:number + 1].to(self.device)
                                            ).last_hidden_state[0].cpu())
        return {"latents": torch.stack(latents), "states": torch.stack(states), "mask": tokens["attention_mask"]}

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
            latents = self.cache["latents"][indices]
            return {"latents": latents, "states": self.cache["states"][indices],
                    "attention_mask": self.cache["mask"][indices], **self._noise(index, latents.shape)}
        batch = collate(self.cases, self.batcher.indices(index), self.augment, self.config.training.seed, self.batcher.epoch(index),
                        mirror_prob=self.mirror)
        images = batch["image"]
        factor = self.vae.compression
        shape = (images.shape[0], self.config.models.vae.latent_channels, *(s // factor for s in images.shape[2:]))
        tokens = self.tokenizer(batch["prompt"], padding=True, truncation=True, max_length=self.config.text.max_length,
                                return_tensors="pt")
        return {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                **self._noise(index, shape)}

    def after_optimizer_step(self, step: int) -> None:
        self.ema.to(self.device)
        self.ema.step(self.unwrap(self.unet).parameters())

    def export(self, folder: Path) -> None:
        unet = self.unwrap(self.unet)
        self.ema.copy_to(unet.parameters())  # the EMA weights are the ones that sample well
        unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
