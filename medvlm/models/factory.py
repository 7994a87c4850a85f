"""Build every network of medvlm from configuration (``configs/*.yaml``), and count its parameters."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from medvlm.config import MedVLMConfig, ModelsConfig, PreprocessConfig, TextConfig
from medvlm.vocabulary import STRUCTURE_NAMES
from medvlm.models.baseline import ImageOnlySegmenter
from medvlm.models.contrastive import MedCLIPModel, buildable_text_config
from medvlm.models.report_generator import SPECIAL_TOKENS, build_tiny_paligemma
from medvlm.models.segmentation import FusedSegmentationDecoder
from medvlm.models.unet import ReportConditionedUNet3D
from medvlm.models.vae import CTAutoencoderKL


def text_encoder_config(text: TextConfig) -> dict:
    """The text encoder's transformers config (read from its folder; no weights loaded)."""
    from medvlm.text.encoders import resolve_text_encoder_path

    return json.loads((resolve_text_encoder_path(text.encoder) / "config.json").read_text())


SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def resolve_weights_path(path: str | Path) -> Path:
    """A weights folder: an existing folder, or the name of one shipped in ``medvlm/weights``."""
    from medvlm.errors import ConfigError

    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    shipped = SHIPPED_WEIGHTS / str(path)
    if shipped.is_dir():
        return shipped
    names = sorted(p.name for p in SHIPPED_WEIGHTS.iterdir() if p.is_dir()) if SHIPPED_WEIGHTS.is_dir() else []
    raise ConfigError(f"weights folder {path} not found (neither a folder nor shipped weights; shipped: {names or 'none'})")


def build_vae(models: ModelsConfig, preprocess: PreprocessConfig | None = None) -> CTAutoencoderKL:
    """The autoencoder of ``models.vae``; ``preprocess`` (``data.preprocess``) fixes the model range it is given
    (a network that reads its own HU window, as MAISI's, converts from it)."""
    from medvlm.models.vae import MAISI_HU_WINDOW

    v = models.vae
    preprocess = preprocess or PreprocessConfig()
    window = tuple(v.network_hu_window) or (MAISI_HU_WINDOW if v.backbone == "maisi" else None)
    return CTAutoencoderKL(latent_channels=v.latent_channels, channels=v.channels, num_res_blocks=v.num_res_blocks,
                           norm_num_groups=v.norm_num_groups, with_nonlocal_attn=v.with_nonlocal_attn,
                           mask_channels=v.mask_channels, backbone=v.backbone,
                           mask_encoding=v.mask_encoding, mask_distance=v.mask_distance,
                           network_hu_window=window, input_hu_window=tuple(preprocess.hu_window),
                           input_range=tuple(preprocess.output_range), mask_guidance=v.mask_guidance)


def build_unet(models: ModelsConfig, context_dim: int, template_size=None) -> ReportConditionedUNet3D:
    """The diffusion UNet over generation latents: the CT latent plus the paired structure channels."""
    from medvlm.text.parse import LABEL_NAMES

    u = models.unet
    channels = models.vae.latent_channels + models.vae.mask_channels
    return ReportConditionedUNet3D(in_channels=channels, out_channels=channels,
                                   report_fields=len(LABEL_NAMES) if u.fields_token else 0, fields_time=u.fields_time,
                                   coordinates=u.coordinates, canonical_side=u.canonical_side,
                                   channels=u.channels, attention_levels=u.attention_levels, num_res_blocks=u.num_res_blocks,
                                   num_head_channels=u.num_head_channels, cross_attention_dim=context_dim,
                                   norm_num_groups=u.norm_num_groups, transformer_num_layers=u.transformer_num_layers,
                                   template_size=tuple(template_size) if u.latent_template and template_size else None,
                                   prior_rank=u.prior_rank if template_size else 0,
                                   prior_size=tuple(template_size) if u.prior_rank and template_size else None,
                                   prior_spread=u.prior_spread if u.prior_rank and template_size else None)


PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_matching")


def training_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon"):
    """The noise schedule of training. Diffusion (``epsilon``/``v_prediction``): diffusers ``DDPMScheduler``,
    scaled-linear betas 0.0015..0.0195 as in MONAI's latent diffusion tutorials, no sample clipping (latents
    are not bounded). ``flow_matching`` (rectified flow, as MAISI v2): diffusers
    ``FlowMatchEulerDiscreteScheduler``; the model predicts the velocity ``noise - latents``."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if prediction_type == "flow_matching":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear", beta_start=0.0015,
                         beta_end=0.0195, clip_sample=False, prediction_type=prediction_type)


def sampling_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon"):
    """The scheduler the pipelines ship with: DDIM on the training schedule for diffusion (deterministic and
    good in 25-50 steps; DDPM needs hundreds), the flow-matching Euler sampler for rectified flow. Any
    diffusers scheduler of the same family swaps in with ``Scheduler.from_config``."""
    from diffusers import DDIMScheduler

    scheduler = training_scheduler(num_train_timesteps, prediction_type)
    return scheduler if prediction_type == "flow_matching" else DDIMScheduler.from_config(scheduler.config)


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` samples a rectified flow (velocity model) rather than a diffusion."""
    return "FlowMatch" in type(scheduler).__name__


def noised_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``latents`` noised to ``timesteps`` (integers in [0, num_train_timesteps)): the diffusion's
    ``add_noise``, or for rectified flow the point ``sigma = t / T`` of the straight path to the noise (diffusers'
    flow-matching ``scale_noise`` accepts only the timesteps of a sampling schedule)."""
    if not is_flow_matching(scheduler):
        return scheduler.add_noise(latents, noise, timesteps)
    sigma = (timesteps.float() / scheduler.config.num_train_timesteps).view(-1, *[1] * (latents.dim() - 1))
    return (1.0 - sigma.to(latents.dtype)) * latents + sigma.to(latents.dtype) * noise


def _window_kwargs(windows, preprocess: PreprocessConfig | None) -> dict:
    """The CT-window arguments of a CT network: its windows and the preprocessing's HU -> range mapping."""
    preprocess = preprocess or PreprocessConfig()
    return dict(ct_windows=tuple(tuple(w) for w in windows), input_hu_window=tuple(preprocess.hu_window),
                input_range=tuple(preprocess.output_range))


def build_baseline(models: ModelsConfig, preprocess: PreprocessConfig | None = None) -> ImageOnlySegmenter:
    """The image-only baseline of ``models.baseline``, seeing the CT through the decoder's windows."""
    b = models.baseline
    return ImageOnlySegmenter(num_classes=len(STRUCTURE_NAMES), channels=tuple(b.channels), num_res_units=b.num_res_units,
                              **_window_kwargs(models.segmentation.ct_windows, preprocess))


def build_segmentation(models: ModelsConfig, context_dim: int, preprocess: PreprocessConfig | None = None
                       ) -> FusedSegmentationDecoder:
    """The decoder of ``models.segmentation``; ``preprocess`` (``data.preprocess``) fixes its CT windows' HU mapping."""
    from medvlm.text.parse import LABEL_NAMES

    s = models.segmentation
    spacing_x = float((preprocess or PreprocessConfig()).spacing_mm[0])
    return FusedSegmentationDecoder(num_classes=len(STRUCTURE_NAMES), fused_channels=models.unet.channels[0],
                                    skip_channels=models.vae.channels, decoder_channels=s.decoder_channels,
                                    context_dim=context_dim, num_heads=s.num_heads, norm_num_groups=s.norm_num_groups,
                                    num_res_units=s.num_res_units, report_channels=s.report_channels,
                                    report_layers=s.report_layers, presence_head=s.presence_head,
                                    report_fields=len(LABEL_NAMES) if s.presence_head and s.presence_input != "tokens" else 0,
                                    presence_tokens=s.presence_input != "fields",
                                    side_structures=tuple(s.side_structures) if s.presence_head else (),
                                    side_margin=s.side_margin_mm / spacing_x,
                                    **_window_kwargs(s.ct_windows, preprocess))


def build_contrastive(models: ModelsConfig, text: TextConfig, *, pretrained_text: bool = True,
                      preprocess: PreprocessConfig | None = None) -> MedCLIPModel:
    c = models.contrastive
    kwargs = dict(embed_dim=c.embed_dim, image_block_inplanes=c.image_block_inplanes, image_layers=c.image_layers,
                  text_pooling=c.text_pooling, frozen_text_layers=c.frozen_text_layers,
                  freeze_text_embeddings=c.freeze_text_embeddings,
                  init_logit_bias=-10.0 if c.loss == "siglip" else None, image_pool=c.image_pool,
                  image_coordinates=c.image_coordinates,
                  **_window_kwargs(c.ct_windows, preprocess))
    if pretrained_text:
        return MedCLIPModel.from_text_encoder(text.encoder, **kwargs)
    return MedCLIPModel(text_config=buildable_text_config(text_encoder_config(text)), **kwargs)


class _VocabularyStub:
    """Stands in for a tokenizer when only the model's shape matters (parameter counts)."""

    def __init__(self, size: int):
        self.size = size
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return SPECIAL_TOKENS.index(token)


def build_all(config: MedVLMConfig, *, pretrained_text: bool = True, tokenizer=None) -> dict[str, torch.nn.Module]:
    """Every network of a configuration: contrastive, vae, unet, segmentation, report_generator."""
    context_dim = int(text_encoder_config(config.text)["hidden_size"])
    models = config.models
    components: dict[str, torch.nn.Module] = {
        "contrastive": build_contrastive(models, config.text, pretrained_text=pretrained_text, preprocess=config.data.preprocess),
        "vae": build_vae(models, config.data.preprocess),
        "unet": build_unet(models, context_dim),
        "segmentation": build_segmentation(models, context_dim, config.data.preprocess),
    }
    vocabulary = tokenizer or _VocabularyStub(models.report_generator.tokenizer_vocab_size)
    components["report_generator"], _ = build_tiny_paligemma(vocabulary, models.report_generator, with_processor=False)
    return components


def parameter_counts(components: dict[str, torch.nn.Module]) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters()) for name, module in components.items()}


def count_parameters_on_meta(config: MedVLMConfig) -> dict[str, int]:
    """Instantiate every network on the meta device (no memory) and count parameters."""
    with torch.device("meta"):
        components = build_all(config, pretrained_text=False)
    return parameter_counts(components)
