"""Zero-shot classification in the contrastive space: CT volumes or reports against class prompts.

Class embeddings average the normalised embeddings of a prompt ensemble and re-normalise (as MedCLIP's
PromptClassifier); probabilities are a softmax over ``logit_scale * cosine`` across the classes of one
label set. Any text works as a class, including labels never seen in training.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from medvlm.models.contrastive import MedCLIPModel
from medvlm.text.deid import Deidentifier, check_text
from medvlm.text.prompts import class_prompts
from medvlm.text.encoders import tokenize_reports


class ZeroShotClassifier:
    """Wraps a :class:`MedCLIPModel` and its tokenizer."""

    def __init__(self, model: MedCLIPModel, tokenizer, *, max_length: int = 128, deidentify: bool = True,
                 report_format: str = "structured"):
        if report_format not in ("structured", "raw"):
            raise ValueError(f"report_format must be 'structured' or 'raw', got {report_format!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.deidentifier = Deidentifier() if deidentify else None
        # "structured": reports become the standard prompt the encoder was trained on (as in training and
        # in ContourPipeline); "raw": the (de-identified) text as written
        self.report_format = report_format

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        batch = tokenize_reports(self.tokenizer, list(texts), self.max_length)
        return self.model.encode_text(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))

    @torch.no_grad()
    def class_embeddings(self, labels: Sequence[str] | Mapping[str, Sequence[str]], label_set: str | None = None
                         ) -> tuple[list[str], torch.Tensor]:
        """Names and (C, D) normalised embeddings of the classes (prompt ensembles averaged)."""
        prompts = class_prompts(label_set, labels if isinstance(labels, Mapping) else list(labels))
        if len(prompts) < 2:
            raise ValueError(f"a label set needs at least two classes, got {list(prompts)}")
        names, embeddings = [], []
        for name, ensemble in prompts.items():
            if not ensemble:
                raise ValueError(f"class {name!r} has no prompts")
            embedded = self._encode_texts([check_text(p, what=f"prompt of class {name!r}") for p in ensemble])
            embeddings.append(F.normalize(embedded.mean(0), dim=-1))
            names.append(name)
        return names, torch.stack(embeddings)

    def _probabilities(self, embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.exp().clamp(max=100.0)
        return (scale * embeds @ class_embeds.T).softmax(dim=-1)

    @torch.no_grad()
    def classify_reports(self, reports: Sequence[str], labels, label_set: str | None = None) -> tuple[list[str], torch.Tensor]:
        """Class names and probabilities (N, C) for reports (de-identified first)."""
        names, class_embeds = self.class_embeddings(labels, label_set)
        return names, self._probabilities(self.encode_reports(reports), class_embeds)

    @torch.no_grad()
    def encode_reports(self, reports: Sequence[str]) -> torch.Tensor:
        """(N, D) normalised embeddings of reports: de-identified, then put in ``report_format``."""
        from medvlm.text.prompts import process_report

        texts = [check_text(r, what=f"report {i}") for i, r in enumerate(reports)]
        processed = [process_report(t, deidentifier=self.deidentifier) for t in texts]
        return self._encode_texts([report.model_text(self.report_format) for report in processed])

    @torch.no_grad()
    def classify_images(self, images: torch.Tensor, labels, label_set: str | None = None) -> tuple[list[str], torch.Tensor]:
        """Class names and probabilities (N, C) for preprocessed CT volumes (N, 1, X, Y, Z)."""
        names, class_embeds = self.class_embeddings(labels, label_set)
        embeds = self.model.encode_image(images.to(self.device, dtype=next(self.model.parameters()).dtype))
        return names, self._probabilities(embeds, class_embeds)
