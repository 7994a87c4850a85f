"""Stage 2: the 3D VAE (L1 reconstruction + KL), on random patches when volumes are large.

MONAI's perceptual and adversarial losses are not used by default: the perceptual networks' weights
would have to be downloaded at run time, which this project does not do.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medvlm.models.factory import build_vae
from train.common import StageTrainer
from train.data import augmentation, collate, load_cases


class VAELoss(nn.Module):
    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, images, eps):
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * eps  # reparameterised sample, noise drawn by the trainer
        reconstruction = self.vae.decode(z).sample
        l1 = (reconstruction - images).abs().mean()
        # per-element KL to N(0, I) (diffusers' .kl() sums over 2D image axes only)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = l1 + self.kl_weight * kl
        return loss, {"total": loss.detach(), "l1": l1.detach(), "kl": kl.detach()}


class VAETrainer(StageTrainer):
    name = "vae"

    def setup(self) -> nn.Module:
        self.cases = load_cases(self.data_dir, self.config, train_fraction=self.train_fraction, seed=self.config.training.seed)
        self.batcher = self.batches(len(self.cases))
        self.patch = tuple(self.stage_config.patch_size)
        self.augment = augmentation(self.config, with_label=False, patch_size=self.patch)
        self.mirror = self.mirror_prob()
        self.vae = build_vae(self.config.models)
        return VAELoss(self.vae, self.stage_config.kl_weight)

    def make_inputs(self, index: int) -> dict:
        batch = collate(self.cases, self.batcher.indices(index), self.augment, self.config.training.seed, self.batcher.epoch(index),
                        mirror_prob=self.mirror)
        images = batch["image"]
        factor = 2 ** (len(self.config.models.vae.channels) - 1)
        latent_shape = (self.global_rows(images.shape[0]), self.config.models.vae.latent_channels,
                        *(s // factor for s in images.shape[2:]))
        return {"images": images, "eps": self.share(torch.randn(latent_shape, generator=self.step_generator(index)))}

    @torch.no_grad()
    def export(self, folder: Path) -> None:
        """Save the VAE with its latent scaling factor (1 / std of training latents), as in latent diffusion."""
        vae = self.unwrap(self.vae).eval()
        means = [vae.encode(c.image[None].to(self.device)).latent_dist.mean for c in self.cases[:32]]
        std = float(torch.cat([m.flatten() for m in means]).std())
        vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
        vae.save_pretrained(folder / "vae")

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        vae = self.unwrap(self.vae).eval()
        reconstructions = [vae(c.image[None].to(self.device)).sample.cpu() for c in self.cases[:8]]
        errors = [float((r - c.image[None]).abs().mean()) for r, c in zip(reconstructions, self.cases)]
        self.log_slices("reconstruction", {"input": self.cases[0].image[0], "output": reconstructions[0][0, 0]}, step)
        return {"l1_training_cases": sum(errors) / len(errors)}
