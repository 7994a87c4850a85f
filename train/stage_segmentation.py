"""Stage 4: the segmentation decoder on the fused latent (MONAI DiceCELoss, Dice + BCE or DiceFocalLoss, sigmoid Dice),
validation Dice per structure, best checkpoint kept."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medvlm.vocabulary import STRUCTURE_NAMES
from medvlm.errors import ConfigError
from medvlm.models import CTAutoencoderKL, ReportConditionedUNet3D
from medvlm.models.factory import build_segmentation
from medvlm.models.segmentation import fused_features
from medvlm.models.windows import coordinate_channels
from train.common import BestDiceMixin, StageTrainer, load_upstream, segmentation_loss
from train.data import (ImageQuality, aligned_corner, augmentation, case_side_map, collate, cut_patch, load_cases,
                        report_fields, structure_presence)
from medvlm.text.encoders import tokenize_reports


def _moved(value, device):
    """A tensor, a list of tensors or None, on ``device``."""
    if value is None:
        return None
    return [v.to(device) for v in value] if isinstance(value, list) else value.to(device)


def presence_loss(segmentation, states: torch.Tensor, mask: torch.Tensor, fields: torch.Tensor | None,
                  present: torch.Tensor) -> torch.Tensor:
    """BCE of the decoder's presence logits for the reports of ``states``/``mask``/``fields`` against whether
    each structure occurs in those cases (per side for ``side_structures``; the other structures' side
    outputs are unused and untrained)."""
    logits = segmentation.presence_logits(states, mask, fields).float()
    present = present.to(logits.device).float()
    if logits.ndim == 3:
        used = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)
        used[:, 0] = True
        used[segmentation.sided, 1:] = True
        logits, present = logits[:, used], present[:, used]
    return nn.functional.binary_cross_entropy_with_logits(logits, present)


def _total(voxel_loss: torch.Tensor, segmentation, weight: float, rows: dict) -> tuple[torch.Tensor, dict]:
    """Voxel loss plus ``weight`` x the presence loss on ``rows`` (reports drawn from the whole training set
    each step, see ``presence_batch_size``); the same log keys every step."""
    if segmentation.presence is None or not weight or rows.get("present") is None:
        return voxel_loss, {"total": voxel_loss.detach()}
    presence = presence_loss(segmentation, rows["presence_states"], rows["presence_mask"], rows.get("presence_fields"),
                             rows["present"])
    total = voxel_loss + weight * presence
    return total, {"total": total.detach(), "voxel": voxel_loss.detach(), "presence": presence.detach()}


def _rows(tensor: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(keep.device)[keep]


class SegmentationLoss(nn.Module):
    def __init__(self, segmentation, unet, vae, text_encoder, loss: nn.Module, finetune_unet: bool,
                 presence_weight: float = 0.0):
        super().__init__()
        self.segmentation, self.unet, self.vae, self.text_encoder = segmentation, unet, vae, text_encoder
        self.finetune_unet = finetune_unet
        self.loss = loss
        self.presence_weight = presence_weight

    def _logits(self, images, states, mask, fields=None, side_map=None, coordinates=None):
        with torch.set_grad_enabled(self.finetune_unet):
            features, _, fused = fused_features(self.vae, self.unet, images, states, mask)
        features = [f.detach() for f in features]
        return self.segmentation(fused, features, states, mask, null_report=states is None, image=images,
                                 report_fields=fields, side_map=side_map, coordinates=coordinates)

    def forward(self, images, labels, input_ids, attention_mask, drop, fields=None, side_map=None, coordinates=None,
                **presence_rows):
        with torch.no_grad():
            states = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = torch.empty(labels.shape, device=images.device, dtype=images.dtype)
        keep = ~drop
        if bool(keep.any()):
            logits[keep] = self._logits(images[keep], states[keep], attention_mask[keep], _rows(fields, keep),
                                        _rows(side_map, keep), _rows(coordinates, keep)).to(logits.dtype)
        if bool(drop.any()):  # no report: the null report of both networks, as ContourPipeline uses it
            logits[drop] = self._logits(images[drop], None, None, coordinates=_rows(coordinates, drop)).to(logits.dtype)
        return _total(self.loss(logits, labels), self.segmentation, self.presence_weight, presence_rows)


class CachedSegmentationLoss(nn.Module):
    """The decoder's loss on precomputed frozen features (see ``cache_features``)."""

    def __init__(self, segmentation, loss: nn.Module, presence_weight: float = 0.0):
        super().__init__()
        self.segmentation = segmentation
        self.loss = loss
        self.presence_weight = presence_weight

    def forward(self, features, fused, fused_null, states, attention_mask, labels, drop, images, fields=None,
                side_map=None, coordinates=None, **presence_rows):
        device = fused.device
        features = [f.to(device) for f in features]
        logits = torch.empty(labels.shape, device=device, dtype=fused.dtype)
        keep = ~drop
        if bool(keep.any()):
            logits[keep] = self.segmentation(fused[keep], [f[keep] for f in features], states[keep], attention_mask[keep],
                                             image=images[keep], report_fields=_rows(fields, keep),
                                             side_map=_rows(side_map, keep), coordinates=_rows(coordinates, keep))
        if bool(drop.any()):
            logits[drop] = self.segmentation(fused_null[drop], [f[drop] for f in features], None, None, null_report=True,
                                             image=images[drop], coordinates=_rows(coordinates, drop))
        return _total(self.loss(logits, labels), self.segmentation, self.presence_weight, presence_rows)


class SegmentationTrainer(BestDiceMixin, StageTrainer):
    name = "segmentation"

    def setup(self) -> nn.Module:
        from transformers import AutoModel, AutoTokenizer

        c = self.stage_config
        self.cases = load_cases(self.data_dir, self.config, train_fraction=self.train_fraction, seed=self.config.training.seed)
        self.batcher = self.batches(self.cases, share=c.synthetic_share)
        self.patch = self._checked_patch(tuple(c.patch_size))
        self.mirror = self.mirror_prob("cache_features computes the frozen features once per case, unaugmented"
                                       if c.cache_features and not c.finetune_unet else None)
        self.vae = self.frozen_upstream(CTAutoencoderKL.from_pretrained(load_upstream(self.output_dir, "vae", "vae")))
        self.unet = ReportConditionedUNet3D.from_pretrained(load_upstream(self.output_dir, "diffusion", "unet")).eval()
        if c.finetune_unet:
            self.unet.requires_grad_(True)  # trained with the decoder: the training loop sets its layout
        else:
            self.unet = self.frozen_upstream(self.unet)
        self.text_encoder = self.frozen_upstream(AutoModel.from_pretrained(
            load_upstream(self.output_dir, "contrastive", "text_encoder"), local_files_only=True))
        self.tokenizer = AutoTokenizer.from_pretrained(load_upstream(self.output_dir, "contrastive", "tokenizer"), local_files_only=True)
        self.segmentation = build_segmentation(self.config.models, int(self.text_encoder.config.hidden_size),
                                               self.config.data.preprocess)
        # side presence targets and midline distances come from the whole (mirrored, unaugmented) case
        self.side_margin = float(self.segmentation.config.side_margin) if self.segmentation.has_sides else None
        self.fields = int(self.segmentation.config.report_fields)
        self.augment = augmentation(self.config, with_label=True, patch_size=self.patch,
                                    with_side=self.side_margin is not None, with_coordinates=bool(self.patch))
        # blur / lower resolution of the CT; on cached features it reaches the decoder's image path alone
        self.quality = ImageQuality(c)
        # a patch's voxel coordinates are those of the whole ROI it was cut from, as the pipelines contour whole ROIs
        self.coordinates = coordinate_channels(self.cases[0].image[None])[0] if self.patch else None
        # each training case's whole-volume midline distances, once (feature cache and presence targets)
        self.sides = [case_side_map(case.image, self.config) if self.side_margin is not None else None
                      for case in self.cases]
        self.best = (-1.0, None)
        try:
            # cases without contours cannot be scored: validation uses the labelled ones
            self.validation_cases = [c for c in load_cases(self.data_dir, self.config, "validation") if c.label is not None]
        except Exception:  # a datalist without validation split: validate on nothing
            self.validation_cases = []
        self.presence_pool = self._presence_pool()
        self._validation_inputs: dict[int, tuple] = {}
        self.cache = None
        if c.cache_features and not c.finetune_unet:
            self.cache = self._precompute()
            return CachedSegmentationLoss(self.segmentation, segmentation_loss(c), c.presence_weight)
        return SegmentationLoss(self.segmentation, self.unet, self.vae, self.text_encoder, segmentation_loss(c),
                                c.finetune_unet, c.presence_weight)

    def _checked_patch(self, patch: tuple[int, ...]) -> tuple[int, ...]:
        if not patch:
            return ()
        # the VAE's downsampling and the decoder's image-path UNet both need whole multiples
        factor = math.lcm(2 ** (len(self.config.models.vae.channels) - 1),
                          2 ** (len(self.config.models.segmentation.decoder_channels) - 1))
        roi = tuple(self.cases[0].image.shape[1:])
        if len(patch) != 3 or any(p % factor or p <= 0 or p > r for p, r in zip(patch, roi)):
            raise ConfigError(f"training.segmentation.patch_size {list(patch)} must be 3 sizes, each a multiple of "
                              f"{factor} (VAE and decoder downsampling) and at most the ROI {list(roi)}")
        return patch

    def _aligned_crop(self, entry: dict, label: torch.Tensor, case_seed) -> tuple[dict, torch.Tensor]:
        """One random patch cut consistently from every cached scale and the label."""
        factor = 2 ** (len(self.config.models.vae.channels) - 1)
        corner = aligned_corner(label.shape[1:], self.patch, factor, case_seed, label, self.stage_config.foreground_patches)

        def cut(volume: torch.Tensor) -> torch.Tensor:
            return cut_patch(volume, corner, self.patch, label.shape[1])

        cropped = {"features": [cut(f) for f in entry["features"]], "fused": cut(entry["fused"]), "image": cut(entry["image"]),
                   "fused_null": cut(entry["fused_null"]), "states": entry["states"], "mask": entry["mask"],
                   "side": cut(entry["side"]) if entry["side"] is not None else None,
                   "coordinates": cut(self.coordinates)}
        return cropped, cut(label)

    # cases per forward pass of the frozen networks while caching: on 2 CPU cores the 3D UNet takes 0.10 s for
    # one 64^3 case and 0.05 s a case in pairs or fours; the VAE encoder gains nothing from larger batches there
    cache_batch = 2

    @torch.no_grad()
    def _precompute(self) -> list[dict]:
        """Frozen features of every training case, with its report and with the null report."""
        from tqdm.auto import tqdm

        cache = []
        # one padding length for all cases (the longest prompt), so cached token states stack into batches
        everything = tokenize_reports(self.tokenizer, [c.prompt for c in self.cases], self.config.text.max_length)
        starts = range(0, len(self.cases), self.cache_batch)
        for start in tqdm(starts, desc="segmentation: caching frozen features", unit="batch",
                          disable=not self.accelerator.is_local_main_process):
            numbers = list(range(start, min(start + self.cache_batch, len(self.cases))))
            tokens = {k: v[numbers].to(self.device) for k, v in everything.items()}
            states = self.text_encoder(**tokens).last_hidden_state
            images = torch.stack([self.cases[n].image for n in numbers]).to(self.device)
            features, latents, fused = fused_features(self.vae, self.unet, images, states, tokens["attention_mask"])
            fused_null = self.unet(latents, 0, None, return_features=True).features[-1]
            for row, number in enumerate(numbers):
                cache.append({"features": [f[row].cpu() for f in features], "fused": fused[row].cpu(),
                              "image": self.cases[number].image, "fused_null": fused_null[row].cpu(),
                              "states": states[row].cpu(), "mask": tokens["attention_mask"][row].cpu(),
                              "side": self.sides[number]})
        return cache

    def make_inputs(self, index: int) -> dict:
        if self.cache is not None:
            indices = self.batcher.indices(index)
            generator = self.step_generator(index)
            drop = self.share(torch.rand(self.global_rows(len(indices)), generator=generator) < self.stage_config.report_dropout)
            labels = [self.cases[i].label for i in indices]
            entries = [self.cache[i] for i in indices]
            if self.patch:
                # one stream per (seed, step, case): the same patches whatever the number of processes
                pairs = [self._aligned_crop(e, l, (self.config.training.seed, index, i))
                         for e, l, i in zip(entries, labels, indices)]
                entries, labels = [p[0] for p in pairs], [p[1] for p in pairs]
            return {"features": [torch.stack([e["features"][k] for e in entries]) for k in range(len(entries[0]["features"]))],
                    "fused": torch.stack([e["fused"] for e in entries]), "fused_null": torch.stack([e["fused_null"] for e in entries]),
                    "states": torch.stack([e["states"] for e in entries]), "attention_mask": torch.stack([e["mask"] for e in entries]),
                    "labels": torch.stack(labels), "drop": drop,
                    "images": self.quality(torch.stack([e["image"] for e in entries]), self.config.training.seed, index,
                                           indices),
                    "fields": self._fields([self.cases[i] for i in indices]),
                    "side_map": torch.stack([e["side"] for e in entries]) if self.side_margin is not None else None,
                    "coordinates": torch.stack([e["coordinates"] for e in entries]) if self.patch else None,
                    **self._presence_rows(index)}
        batch = collate(self.cases, self.batcher.indices(index), self.augment, self.config.training.seed, self.batcher.epoch(index),
                        mirror_prob=self.mirror, side_margin=self.side_margin, config=self.config,
                        coordinates=bool(self.patch))
        tokens = tokenize_reports(self.tokenizer, batch["prompt"], self.config.text.max_length)
        generator = self.step_generator(index)
        images = self.quality(batch["image"], self.config.training.seed, index, batch["index"])
        return {"images": images, "labels": batch["label"], "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"], **self._presence_rows(index),
                "fields": report_fields(batch["labels"], self.fields), "side_map": batch["side_map"],
                "coordinates": batch["coordinates"],
                "drop": self.share(torch.rand(self.global_rows(len(batch["index"])), generator=generator)
                                   < self.stage_config.report_dropout)}

    @torch.no_grad()
    def _presence_pool(self) -> dict | None:
        """Report token states, parsed fields and presence targets (whole case; per side where the decoder
        judges sides) of every training case, for the presence loss. The head is small and reads only the
        report, so each step trains it on ``presence_batch_size`` of these rather than on the voxel batch of
        2: drawn from 2 reports a step, it had not learned the elective neck's sides in 300 steps."""
        if self.segmentation.presence is None or not self.stage_config.presence_weight:
            return None
        if self.stage_config.presence_batch_size < 1:
            raise ConfigError(f"training.segmentation.presence_batch_size must be >= 1, got {self.stage_config.presence_batch_size}")
        tokens = tokenize_reports(self.tokenizer, [case.prompt for case in self.cases], self.config.text.max_length).to(self.device)
        states = self.text_encoder(**tokens).last_hidden_state.cpu()
        present = [structure_presence(case.label, side, self.side_margin or 0.0)
                   for case, side in zip(self.cases, self.sides)]
        return {"states": states, "mask": tokens["attention_mask"].cpu(), "fields": self._fields(self.cases),
                "present": torch.stack(present)}

    def _presence_rows(self, index: int) -> dict:
        """The presence loss's reports for step ``index``: a draw from (seed, step), the same on every process."""
        pool = self.presence_pool
        if pool is None:
            return {}
        count = len(pool["present"])
        rows = torch.as_tensor(np.random.default_rng([self.config.training.seed, index, 31]).choice(
            count, size=min(self.stage_config.presence_batch_size, count), replace=False))
        return {"presence_states": pool["states"][rows], "presence_mask": pool["mask"][rows],
                "presence_fields": pool["fields"][rows] if pool["fields"] is not None else None, "present": pool["present"][rows]}

    def _fields(self, cases) -> torch.Tensor | None:
        """The parsed report fields the decoder's presence head reads (None when it reads none)."""
        return report_fields(torch.as_tensor(np.stack([case.labels for case in cases])), self.fields)

    @torch.no_grad()
    def _validation_features(self, case) -> tuple:
        """:func:`fused_features` of one validation case with its report, and the report's states, mask and fields."""
        tokens = tokenize_reports(self.tokenizer, [case.prompt], self.config.text.max_length).to(self.device)
        states = self.text_encoder(**tokens).last_hidden_state
        fields = self._fields([case])
        features, _, fused = fused_features(self.vae, self.unwrap(self.unet), case.image[None].to(self.device), states,
                                            tokens["attention_mask"])
        return (fused, features, states, tokens["attention_mask"],
                fields.to(self.device) if fields is not None else None)

    def validate(self, step: int) -> dict:
        """Validation Dice per structure; keeps the best decoder weights and logs the first case's CTVn."""
        segmentation = self.unwrap(self.segmentation)

        def logits_of(number, case):
            kept = self._validation_inputs.get(number)
            if kept is None:
                inputs = self._validation_features(case)
                if self.cache is not None:  # frozen upstream networks: the same features at every validation,
                    # kept in host memory as the training cache is (the device holds one case's at a time)
                    self._validation_inputs[number] = tuple(_moved(v, "cpu") for v in inputs)
            else:
                inputs = tuple(_moved(v, self.device) for v in kept)
            fused, features, states, mask, fields = inputs
            return segmentation(fused, features, states, mask, image=case.image[None].to(self.device), report_fields=fields)

        def log_first(number, case, prediction):
            if number == 0:
                ctvn = STRUCTURE_NAMES.index("CTVn")
                self.log_slices("validation", {"ct": case.image[0], "CTVn_truth": case.label[ctvn],
                                               "CTVn_predicted": prediction[0, ctvn]}, step)

        return self.validation_dice(segmentation, logits_of, step, log_first)

    def export(self, folder: Path) -> None:
        self.restore_best(self.unwrap(self.segmentation)).save_pretrained(folder / "segmentation")
        if self.stage_config.finetune_unet:
            self.unwrap(self.unet).save_pretrained(folder / "unet")
