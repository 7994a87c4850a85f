"""Stage 1, modality alignment: MedCLIP semantic matching + CLIP InfoNCE on (CT, report) pairs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medvlm.models.contrastive import clip_loss, semantic_matching_loss
from medvlm.models.factory import build_contrastive
from medvlm.text.prompts import label_phrases
from train.common import StageTrainer
from train.data import augmentation, collate, load_cases
from medvlm.text.encoders import tokenize_reports


class ContrastiveLoss(nn.Module):
    def __init__(self, model, semantic_weight: float, clip_weight: float, phrase_weight: float = 0.0):
        super().__init__()
        self.model, self.semantic_weight, self.clip_weight = model, semantic_weight, clip_weight
        self.phrase_weight = phrase_weight

    def forward(self, images, input_ids, attention_mask, labels, phrase_ids=None, phrase_mask=None, phrase_labels=None):
        out = self.model(images, input_ids, attention_mask)
        # Negatives are this process's batch (open_clip's ClipLoss gathers across processes only when
        # built with world_size > 1; kept local so 1 and N processes optimise the same objective per shard).
        semantic = semantic_matching_loss(out.image_embeds, out.text_embeds, out.logit_scale, labels)
        infonce = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)
        loss = self.semantic_weight * semantic + self.clip_weight * infonce
        parts = {"semantic": semantic.detach(), "clip": infonce.detach()}
        if self.phrase_weight and phrase_ids is not None:
            # MedCLIP's text-label pairs: each label phrase matches the CTs and the reports carrying its label
            phrases = self.model.encode_text(phrase_ids, phrase_mask)
            phrase = (semantic_matching_loss(out.image_embeds, phrases, out.logit_scale, labels, phrase_labels)
                      + semantic_matching_loss(out.text_embeds, phrases, out.logit_scale, labels, phrase_labels)) / 2
            loss = loss + self.phrase_weight * phrase
            parts["phrase"] = phrase.detach()
        return loss, {"total": loss.detach(), **parts}


class ContrastiveTrainer(StageTrainer):
    name = "contrastive"

    def setup(self) -> nn.Module:
        from transformers import AutoTokenizer

        from medvlm.text.encoders import resolve_text_encoder_path

        self.cases = load_cases(self.data_dir, self.config, train_fraction=self.train_fraction, seed=self.config.training.seed,
                                synthetic=False)  # real CTs only: never the generator's own samples
        self.batcher = self.batches(self.cases)
        self.augment = augmentation(self.config, with_label=False)
        self.mirror = self.mirror_prob()
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder_path(self.config.text.encoder), local_files_only=True)
        self.model = build_contrastive(self.config.models, self.config.text, preprocess=self.config.data.preprocess)
        c = self.stage_config
        return ContrastiveLoss(self.model, c.semantic_weight, c.clip_weight, c.phrase_weight)

    def make_inputs(self, index: int) -> dict:
        indices = self.batcher.indices(index)
        batch = collate(self.cases, indices, self.augment, self.config.training.seed, self.batcher.epoch(index),
                        mirror_prob=self.mirror)
        tokens = tokenize_reports(self.tokenizer, batch["prompt"], self.config.text.max_length)
        inputs = {"images": batch["image"], "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                  "labels": batch["labels"]}
        c = self.stage_config
        if c.phrase_weight and c.phrases_per_case > 0:
            pairs = []
            for case_index, labels in zip(indices, batch["labels"].numpy()):  # drawn from (seed, step, case): the same whatever the process count
                rng = np.random.default_rng([self.config.training.seed, index, case_index, 7])
                pairs += label_phrases(labels, rng, c.phrases_per_case)
            if pairs:
                phrase_tokens = self.tokenizer([p for p, _ in pairs], padding=True, return_tensors="pt")
                inputs.update(phrase_ids=phrase_tokens["input_ids"], phrase_mask=phrase_tokens["attention_mask"],
                              phrase_labels=torch.as_tensor(np.stack([v for _, v in pairs])))
        return inputs

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """Zero-shot laterality accuracy on the validation split (reports and CT)."""
        from medvlm.models.zero_shot import ZeroShotClassifier
        from medvlm.text.parse import parse_report
        from train.data import load_cases as load

        try:
            cases = load(self.data_dir, self.config, "validation")
        except Exception:  # no validation split: nothing to report
            return {}
        truth = [parse_report(c.report).laterality if c.report else None for c in cases]
        keep = [i for i, t in enumerate(truth) if t in ("left", "right", "midline")]
        if not keep:
            return {}
        model = self.unwrap(self.model).eval()
        classifier = ZeroShotClassifier(model, self.tokenizer, max_length=self.config.text.max_length, deidentify=False)
        names, report_probs = classifier.classify_reports([cases[i].prompt for i in keep], ["left", "right", "midline"], "laterality")
        images = torch.stack([cases[i].image for i in keep]).to(self.device)
        _, ct_probs = classifier.classify_images(images, ["left", "right", "midline"], "laterality")
        report_acc = sum(names[int(p)] == truth[i] for p, i in zip(report_probs.argmax(1), keep)) / len(keep)
        ct_acc = sum(names[int(p)] == truth[i] for p, i in zip(ct_probs.argmax(1), keep)) / len(keep)
        return {"zero_shot_laterality_report": float(report_acc), "zero_shot_laterality_ct": float(ct_acc)}

    def export(self, folder: Path) -> None:
        model = self.unwrap(self.model)
        model.save_pretrained(folder / "contrastive")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        model.text_model.save_pretrained(folder / "text_encoder")  # the aligned text tower conditions the rest
