"""The image-only baseline (MONAI UNet, no report), trained under the segmentation stage's settings.

Same training cases, batches, patches (the same corners: ``train.data.aligned_corner``), steps,
optimiser, schedule and loss as the report-conditioned decoder, so the evaluation can put the two side
by side. Augmentation: as the segmentation stage (none when it trains on cached features), and the same
image-quality augmentation of the CT (``blur_prob``, ``low_resolution_prob``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medvlm.models.factory import build_baseline
from train.common import BestDiceMixin, StageTrainer, segmentation_loss
from train.data import ImageQuality, aligned_corner, augmentation, collate, cut_patch, load_cases


class BaselineLoss(nn.Module):
    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images, labels):
        loss = self.loss(self.model(images), labels)
        return loss, {"total": loss.detach()}


class BaselineTrainer(BestDiceMixin, StageTrainer):
    name = "baseline"
    settings_name = "segmentation"

    def setup(self) -> nn.Module:
        c = self.stage_config
        self.cases = load_cases(self.data_dir, self.config, train_fraction=self.train_fraction, seed=self.config.training.seed)
        self.batcher = self.batches(self.cases, share=c.synthetic_share)  # the segmentation stage's draws
        self.patch = tuple(c.patch_size)
        self.factor = 2 ** (len(self.config.models.vae.channels) - 1)
        cached = c.cache_features and not c.finetune_unet  # the decoder then trains without augmentation
        self.augment = None if cached else augmentation(self.config, with_label=True)
        self.quality = ImageQuality(c)
        self.mirror = self.mirror_prob("the segmentation stage it mirrors trains on cached features" if cached else None)
        self.model = build_baseline(self.config.models, self.config.data.preprocess)
        try:
            # cases without contours cannot be scored: validation uses the labelled ones
            self.validation_cases = [c for c in load_cases(self.data_dir, self.config, "validation") if c.label is not None]
        except Exception:  # a datalist without validation split
            self.validation_cases = []
        self.best = (-1.0, None)
        return BaselineLoss(self.model, segmentation_loss(c))

    def make_inputs(self, index: int) -> dict:
        indices = self.batcher.indices(index)
        batch = collate(self.cases, indices, self.augment, self.config.training.seed, self.batcher.epoch(index),
                        mirror_prob=self.mirror)
        images, labels = batch["image"], batch["label"]
        if self.patch:
            full = labels.shape[2]
            pairs = []
            for row, case_index in enumerate(indices):
                corner = aligned_corner(labels.shape[2:], self.patch, self.factor, (self.config.training.seed, index, case_index),
                                        labels[row], self.stage_config.foreground_patches)
                pairs.append((cut_patch(images[row], corner, self.patch, full), cut_patch(labels[row], corner, self.patch, full)))
            images, labels = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return {"images": self.quality(images, self.config.training.seed, index, indices), "labels": labels}

    def validate(self, step: int) -> dict:
        model = self.unwrap(self.model)
        return self.validation_dice(model, lambda number, case: model(case.image[None].to(self.device)), step)

    def export(self, folder: Path) -> None:
        self.restore_best(self.unwrap(self.model)).save_pretrained(folder / "baseline")
