"""Assemble the four pipelines from components (trained, or freshly built from a configuration).

Training writes its pipeline folders with this; tests and ``medvlm demo --quick`` use it with untrained
components. The text encoder is the configured one (MiniLM by default) unless one is given.
"""
from typing import Iterable

from medvlm.config import MedVLMConfig, preprocess_to_dict
from pipelines.pipeline_contour import ContourPipeline
from pipelines.pipeline_report_generation import ReportGenerationPipeline
from pipelines.pipeline_report_to_ct import ReportToCTPipeline
from pipelines.pipeline_zero_shot import ZeroShotClassificationPipeline


def build_pipelines(config: MedVLMConfig, *, components: dict | None = None, text_encoder=None, tokenizer=None,
                    report_texts: Iterable[str] | None = None, scheduler=None) -> dict:
    """``{"contour", "report_to_ct", "zero_shot", "report_generation"}`` pipelines.

    ``components`` may hold any of ``vae``, ``unet``, ``segmentation``, ``contrastive``,
    ``report_generator``, ``report_processor``; missing ones are built untrained from ``config``.
    ``report_texts`` train the report tokenizer when a report generator has to be built.
    """
    from transformers import AutoModel, AutoTokenizer

    from medvlm.models.factory import build_contrastive, build_segmentation, build_unet, build_vae, sampling_scheduler
    from medvlm.models.report_generator import build_tiny_paligemma, train_report_tokenizer
    from medvlm.text.encoders import resolve_text_encoder_path

    components = dict(components or {})
    if text_encoder is None or tokenizer is None:
        path = resolve_text_encoder_path(config.text.encoder)
        text_encoder = text_encoder or AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, local_files_only=True)
    context_dim = int(text_encoder.config.hidden_size)
    vae = components.get("vae") or build_vae(config.models, config.data.preprocess)
    unet = components.get("unet") or build_unet(config.models, context_dim)
    segmentation = components.get("segmentation") or build_segmentation(config.models, context_dim, config.data.preprocess)
    contrastive = components.get("contrastive") or build_contrastive(config.models, config.text, preprocess=config.data.preprocess)
    generator, processor = components.get("report_generator"), components.get("report_processor")
    if generator is None or processor is None:
        texts = list(report_texts or ["head and neck cancer report"])
        generator, processor = build_tiny_paligemma(
            train_report_tokenizer(texts, config.models.report_generator.tokenizer_vocab_size), config.models.report_generator)
    if scheduler is None:
        stage = config.training.diffusion
        scheduler = sampling_scheduler(stage.num_train_timesteps, stage.prediction_type)
    for module in (vae, unet, segmentation, contrastive, generator, text_encoder):
        module.eval()  # inference: no dropout, BatchNorm running statistics (from_pretrained does the same)
    preprocess = preprocess_to_dict(config.data.preprocess)
    max_tokens = config.text.max_length
    return {
        "contour": ContourPipeline(vae=vae, unet=unet, segmentation=segmentation, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, report_generator=generator,
                                   report_processor=processor, preprocess=preprocess, max_report_tokens=max_tokens,
                                   max_new_tokens=config.models.report_generator.max_new_tokens),
        "report_to_ct": ReportToCTPipeline(vae=vae, unet=unet, segmentation=segmentation, text_encoder=text_encoder,
                                           tokenizer=tokenizer, scheduler=scheduler, preprocess=preprocess,
                                           max_report_tokens=max_tokens, mask_decoding=config.models.vae.mask_decoding,
                                           prior_strength=config.models.unet.prior_strength),
        "zero_shot": ZeroShotClassificationPipeline(contrastive=contrastive, tokenizer=tokenizer, preprocess=preprocess,
                                                    max_report_tokens=max_tokens),
        "report_generation": ReportGenerationPipeline(report_generator=generator, report_processor=processor,
                                                      preprocess=preprocess,
                                                      max_new_tokens=config.models.report_generator.max_new_tokens),
    }
