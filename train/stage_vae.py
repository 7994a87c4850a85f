"""Stage 2: the 3D autoencoder (L1 in several CT windows + KL; with paired structure channels, Dice + BCE on
the decoded masks), on random patches when volumes are large, optionally from shipped weights.

MONAI's perceptual loss is not used: its networks' weights would have to be downloaded at run time, which this
project does not do. MAISI's patch adversarial loss (MONAI ``PatchDiscriminator`` + ``PatchAdversarialLoss``) is
the option ``adversarial_weight``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from medvlm.config import PreprocessConfig
from medvlm.data.transforms import to_hu
from medvlm.models import CTAutoencoderKL
from medvlm.models.factory import build_vae
from train.common import StageTrainer, TrainingError
from train.data import augmentation, collate, load_cases


def windowed(image: torch.Tensor, window: Sequence[float], preprocess: PreprocessConfig) -> torch.Tensor:
    """``image`` (model range of ``preprocess``) seen through a display window (level, width HU), in [0, 1]."""
    level, width = window
    return ((to_hu(image, preprocess) - level) / width + 0.5).clamp(0.0, 1.0)


class VAELoss(nn.Module):
    """Reconstruction loss of the autoencoder.

    * L1 in the model range and in each of ``windows`` (level, width HU): the -1000..1500 HU range compresses
      the 20-40 HU contrasts of tumour and glands to about 1 % of its span, so an L1 there alone lets the
      decoder wash them out (the tumour's contrast came back reversed); the bone window keeps bone.
    * ``lesion_weight``: extra weight on voxels of the ``lesion_channels`` (GTVp, GTVn), which are a few hundred
      of 262,144 voxels.
    * paired autoencoders: Dice + BCE of the decoded structure logits against the masks.
    * KL to N(0, I) with a small weight (MAISI uses about 1e-7); the latent is the posterior mean unless
      ``sample_posterior`` (the diffusion model is trained on posterior means).
    * ``adversarial_weight`` > 0: MAISI's patch adversarial loss (least squares) with a MONAI
      ``PatchDiscriminator`` that this module holds and trains in the same step: its own loss (real CTs against
      detached reconstructions) is added to the total, and the autoencoder's term reads the reconstruction
      through a detached copy of its weights, so each network's gradient comes from its own objective with one
      optimizer (``StageTrainer`` steps one).
    """

    def __init__(self, vae: CTAutoencoderKL, kl_weight: float, windows: Sequence[Sequence[float]] = (),
                 preprocess: PreprocessConfig | None = None, lesion_channels: Sequence[int] = (),
                 lesion_weight: float = 0.0, mask_weight: float = 1.0, sample_posterior: bool = False,
                 adversarial_weight: float = 0.0, discriminator_channels: int = 32, discriminator_layers: int = 3):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight
        self.windows, self.preprocess = tuple(windows), preprocess or PreprocessConfig()
        self.lesion_channels, self.lesion_weight = list(lesion_channels), float(lesion_weight)
        self.mask_weight, self.sample_posterior = float(mask_weight), bool(sample_posterior)
        self.adversarial_weight = float(adversarial_weight)
        self.discriminator = None
        if self.adversarial_weight > 0:
            from monai.losses import PatchAdversarialLoss
            from monai.networks.nets import PatchDiscriminator

            self.discriminator = PatchDiscriminator(spatial_dims=3, num_layers_d=int(discriminator_layers),
                                                    channels=int(discriminator_channels), in_channels=1,
                                                    out_channels=1, norm="INSTANCE")
            self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def adversarial_terms(self, reconstruction: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the autoencoder's term, the discriminator's loss). The first reaches the discriminator's weights
        detached, the second the reconstruction detached."""
        from torch.func import functional_call

        d = self.discriminator
        frozen = {name: p.detach() for name, p in d.named_parameters()} | dict(d.named_buffers())
        fooled = self.adversarial(functional_call(d, frozen, (reconstruction,))[-1], target_is_real=True,
                                  for_discriminator=False)
        fake = self.adversarial(d(reconstruction.detach())[-1], target_is_real=False, for_discriminator=True)
        real = self.adversarial(d(images)[-1], target_is_real=True, for_discriminator=True)
        return fooled, 0.5 * (fake + real)

    def forward(self, images, eps, labels=None):
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * eps if self.sample_posterior else posterior.mean
        paired = bool(self.vae.config.mask_channels)
        if paired and labels is None:
            raise TrainingError("a paired autoencoder (models.vae.mask_channels > 0) trains on cases with labels")
        decoded = self.vae.decode(z, self.vae.encode_masks(labels) if paired else None, masks=labels)
        reconstruction = decoded.sample
        weight = torch.ones_like(images)
        if labels is not None and self.lesion_weight and self.lesion_channels:
            weight = weight + self.lesion_weight * labels[:, self.lesion_channels].amax(dim=1, keepdim=True)
        weight = weight / weight.mean()
        l1 = ((reconstruction - images).abs() * weight).mean()
        logs = {"l1": l1.detach()}
        loss = l1
        for window in self.windows:
            term = ((windowed(reconstruction, window, self.preprocess)
                     - windowed(images, window, self.preprocess)).abs() * weight).mean()
            loss = loss + term
            logs[f"l1_w{int(window[0])}"] = term.detach()
        if paired:
            from monai.losses import DiceCELoss

            masks = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)(decoded.mask_logits, labels)
            loss = loss + self.mask_weight * masks
            logs["masks"] = masks.detach()
        if self.discriminator is not None:
            fooled, discriminator = self.adversarial_terms(reconstruction, images)
            loss = loss + self.adversarial_weight * (fooled + discriminator)
            logs |= {"adversarial": fooled.detach(), "discriminator": discriminator.detach()}
        # per-element KL to N(0, I) (diffusers' .kl() sums over 2D image axes only)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = loss + self.kl_weight * kl
        logs |= {"total": loss.detach(), "kl": kl.detach()}
        return loss, logs


class VAETrainer(StageTrainer):
    name = "vae"

    def setup(self) -> nn.Module:
        from medvlm.vocabulary import STRUCTURE_NAMES

        c = self.stage_config
        self.cases = load_cases(self.data_dir, self.config, train_fraction=self.train_fraction, seed=self.config.training.seed,
                                synthetic=False)  # real CTs only: never the generator's own samples
        paired = bool(self.config.models.vae.mask_channels)
        if paired and any(case.label is None for case in self.cases):
            raise TrainingError("models.vae.mask_channels > 0 (paired CT + structures) needs labels for every training case")
        self.batcher = self.batches(self.cases)
        self.patch = tuple(c.patch_size)
        self.augment = augmentation(self.config, with_label=paired or bool(c.lesion_weight), patch_size=self.patch)
        self.mirror = self.mirror_prob()
        self.vae = build_vae(self.config.models, self.config.data.preprocess)
        pretrained = self.config.models.vae.pretrained_path
        if pretrained:
            # an unguided autoencoder starts a mask-guided one: its guide starts at zero (decodes as loaded)
            missing, unexpected = self.vae.load_state_dict(load_pretrained_vae(pretrained, self.config).state_dict(),
                                                           strict=False)
            if unexpected or any(not k.startswith("decoder.guide.") for k in missing):
                raise TrainingError(f"models.vae.pretrained_path {pretrained} does not fit models.vae: missing "
                                    f"{missing[:5]}, unexpected {unexpected[:5]}")
        if c.freeze_encoder:
            self.vae.freeze_encoder()
        lesions = [STRUCTURE_NAMES.index(n) for n in ("GTVp", "GTVn")]
        return VAELoss(self.vae, c.kl_weight, windows=c.windows, preprocess=self.config.data.preprocess,
                       lesion_channels=lesions, lesion_weight=c.lesion_weight, mask_weight=c.mask_weight,
                       sample_posterior=c.sample_posterior, adversarial_weight=c.adversarial_weight,
                       discriminator_channels=c.discriminator_channels, discriminator_layers=c.discriminator_layers)

    def make_inputs(self, index: int) -> dict:
        batch = collate(self.cases, self.batcher.indices(index), self.augment, self.config.training.seed, self.batcher.epoch(index),
                        mirror_prob=self.mirror)
        images = batch["image"]
        factor = 2 ** (len(self.config.models.vae.channels) - 1)
        latent_shape = (self.global_rows(images.shape[0]), self.config.models.vae.latent_channels,
                        *(s // factor for s in images.shape[2:]))
        inputs = {"images": images, "eps": self.share(torch.randn(latent_shape, generator=self.step_generator(index)))}
        if batch["label"] is not None:
            inputs["labels"] = batch["label"]
        return inputs

    @torch.no_grad()
    def export(self, folder: Path) -> None:
        """Save the VAE with its latent scaling factor (1 / std of training latents), as in latent diffusion."""
        vae = self.unwrap(self.vae).eval()
        cases = self.cases[:32]
        means = [vae.encode(c.image[None].to(self.device)).latent_dist.mean for c in cases]
        std = float(torch.cat([m.flatten() for m in means]).std())
        vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
        if vae.config.mask_channels:  # each structure channel to zero mean and unit variance, as the CT latent
            channels = torch.cat([vae.encode_masks(c.label[None].to(self.device)) for c in cases]).transpose(0, 1).flatten(1)
            vae.register_to_config(mask_shift=[float(v) for v in channels.mean(1)],
                                   mask_scale=[max(float(v), 0.05) for v in channels.std(1)])
            # the level at which a structure channel alone reads as inside, decided on the validation split
            # (the training cases when there is none)
            held_out = [c for c in load_cases(self.data_dir, self.config, "validation") if c.label is not None] or cases
            vae.register_to_config(mask_field_thresholds=vae.fit_field_thresholds(
                [c.label[None].to(self.device) for c in held_out if c.label is not None]))
        vae.save_pretrained(folder / "vae")

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        vae = self.unwrap(self.vae).eval()
        cases = self.cases[:8]
        paired = bool(vae.config.mask_channels)  # a paired autoencoder decodes with the case's masks
        reconstructions = [vae(c.image[None].to(self.device), c.label[None].to(self.device) if paired else None).sample.cpu()
                           for c in cases]
        errors = [float((r - c.image[None]).abs().mean()) for r, c in zip(reconstructions, cases)]
        self.log_slices("reconstruction", {"input": cases[0].image[0], "output": reconstructions[0][0, 0]}, step)
        return {"l1_training_cases": sum(errors) / len(errors)}


def load_pretrained_vae(path: str | Path, config) -> CTAutoencoderKL:
    """Autoencoder weights to start from, checked against ``models.vae``: a ``save_pretrained`` folder (shipped or
    user-trained, safetensors) or, for ``backbone: maisi``, MONAI MAISI's ``.pt``/``.safetensors`` state dict.
    Another shape is a clear error, not a partial load."""
    from medvlm.errors import ConfigError, InputError
    from medvlm.models.factory import resolve_weights_path

    expected = build_vae(config.models, config.data.preprocess)
    file = Path(str(path)).expanduser()
    if file.is_file():
        if config.models.vae.backbone != "maisi":
            raise ConfigError(f"models.vae.pretrained_path {path} is a file: weights files are MAISI autoencoder state "
                              "dicts (set models.vae.backbone: maisi); other autoencoders load from a save_pretrained folder")
        try:
            return expected.load_maisi_checkpoint(file)
        except InputError as exc:
            raise ConfigError(f"models.vae.pretrained_path: {exc}") from None
    if file.suffix in (".pt", ".pth", ".ckpt", ".safetensors") and not file.exists():
        raise ConfigError(f"models.vae.pretrained_path {path}: weights file not found")
    folder = resolve_weights_path(path)
    try:
        vae = CTAutoencoderKL.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"models.vae.pretrained_path {path}: not a loadable CTAutoencoderKL folder ({exc})") from None
    differ = [k for k in ("backbone", "latent_channels", "channels", "num_res_blocks", "mask_channels", "norm_num_groups",
                        "mask_encoding", "mask_distance")
              if list(_listed(vae.config[k])) != list(_listed(expected.config[k]))]
    if differ:
        raise ConfigError(f"models.vae.pretrained_path {path} was built with other {', '.join(differ)} than models.vae "
                          f"({', '.join(f'{k}={vae.config[k]}' for k in differ)})")
    return vae


def _listed(value):
    return value if isinstance(value, (list, tuple)) else [value]
