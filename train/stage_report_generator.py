"""Stage 5: the PaliGemma2 report drafter on CT renderings and the de-identified reports' structured form.

The target text is the structured prompt of each (de-identified) report: a complete report in the
standard layout, short enough for a CPU-sized model, and what the other pipelines read. A local
``paligemma2-*`` folder (``models.report_generator.pretrained_path``) replaces the tiny model.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from medvlm.models.report_generator import build_tiny_paligemma, drafting_batch, load_report_generator, render_ct, train_report_tokenizer
from train.common import StageTrainer
from train.data import load_cases


class DraftingLoss(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        loss = self.model(**batch).loss
        return loss, {"total": loss.detach()}


class ReportGeneratorTrainer(StageTrainer):
    name = "report_generator"

    def setup(self) -> nn.Module:
        rg = self.config.models.report_generator
        self.mirror_prob("the report generator trains on fixed CT renderings")
        self.cases = load_cases(self.data_dir, self.config, train_fraction=self.train_fraction, seed=self.config.training.seed,
                                synthetic=False)  # real CTs only: never the generator's own samples
        self.batcher = self.batches(self.cases)
        if rg.pretrained_path:
            self.model, self.processor = load_report_generator(rg.pretrained_path)
        else:
            tokenizer = train_report_tokenizer([c.prompt for c in self.cases], rg.tokenizer_vocab_size)
            self.model, self.processor = build_tiny_paligemma(tokenizer, rg, seed=self.config.training.seed)
        size = self.processor.image_processor.size["height"]
        preprocess = self.config.data.preprocess
        self.images = [render_ct(c.image[0], image_size=size, input_is_hu=False, value_range=tuple(preprocess.hu_window),
                                 model_range=tuple(preprocess.output_range)) for c in self.cases]
        return DraftingLoss(self.model)

    def make_inputs(self, index: int) -> dict:
        indices = self.batcher.indices(index)
        batch = drafting_batch(self.processor, [self.images[i] for i in indices], [self.cases[i].prompt for i in indices])
        return dict(batch)

    def export(self, folder: Path) -> None:
        model = self.unwrap(self.model)
        model.save_pretrained(folder / "report_generator")
        self.processor.save_pretrained(folder / "report_processor")
