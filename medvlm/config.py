"""Configuration as data: YAML presets in ``configs/`` mapped onto dataclasses with strict checking.

An unknown key or a value of the wrong type is an error that names the key and the file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medvlm.errors import ConfigError


MASK_DECODINGS = ("joint", "fields")  # how generated contours are read (models.vae.mask_decoding)
BACKBONES = ("compact", "monai_kl", "maisi")  # models.vae.backbone


@dataclass
class PhantomDataConfig:
    """How the built-in phantom dataset is generated (sizes along x, y, z)."""

    n_cases: int = 120
    seed: int = 0
    shape: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    previews: int = 6


@dataclass
class PreprocessConfig:
    """The MONAI preprocessing chain: target spacing, HU window, foreground crop and ROI (x, y, z voxels)."""

    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    hu_window: tuple[float, float] = (-1000.0, 1500.0)
    output_range: tuple[float, float] = (-1.0, 1.0)
    roi_size: tuple[int, int, int] = (64, 64, 64)
    crop_foreground: bool = True
    foreground_threshold_hu: float = -500.0
    foreground_margin_mm: float = 9.0


def preprocess_to_dict(config: PreprocessConfig | None = None) -> dict:
    """JSON-ready form of the preprocessing settings (as pipelines store them in ``model_index.json``)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config or PreprocessConfig()).items()}


def preprocess_from_dict(values: dict) -> PreprocessConfig:
    """Inverse of :func:`preprocess_to_dict`, checked like a config file section."""
    return config_from_dict(dict(values), source="pipeline preprocess settings", cls=PreprocessConfig)


@dataclass
class DataConfig:
    phantom: PhantomDataConfig = field(default_factory=PhantomDataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


@dataclass
class TextConfig:
    """Report text: the encoder (``minilm`` or a local folder) and the token budget."""

    encoder: str = "minilm"
    max_length: int = 128


@dataclass
class ContrastiveModelConfig:
    embed_dim: int = 128
    image_block_inplanes: tuple[int, ...] = (16, 32, 64, 128)
    image_layers: tuple[int, ...] = (1, 1, 1, 1)
    text_pooling: str = "mean"
    frozen_text_layers: int = 4
    # freeze the text tower's token and position embeddings even when no layer is frozen (frozen_text_layers
    # > 0 always freezes them): the word embedding is half of MiniLM's weights; on the demo the stage took
    # 172 s instead of 188 s with it, at the same zero-shot laterality (1.00 on 150 fresh reports)
    freeze_text_embeddings: bool = False
    loss: str = "semantic"  # "semantic" (MedCLIP + CLIP), "clip" or "siglip"
    image_pool: int = 1  # the CT tower sees the ROI averaged over image_pool^3 voxel blocks
    ct_windows: tuple[tuple[float, float], ...] = ()  # fixed CT windows (level, width HU) as extra channels
    image_coordinates: bool = False  # voxel coordinates as three more CT channels (laterality survives pooling)


@dataclass
class VAEModelConfig:
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 32)  # compression 2 ** (len - 1): 4 here
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    with_nonlocal_attn: bool = False
    # structures decoded with the CT from one paired latent (the CT latent plus one channel per structure at
    # latent resolution): generated CTs come with their contours; 0 = a CT-only autoencoder
    mask_channels: int = 0
    # how a structure becomes its latent channel: "fraction" (voxel fraction per latent cell) or "distance"
    # (the fraction where the structure is, a decaying distance to it elsewhere; mask_distance latent cells)
    mask_encoding: str = "fraction"
    mask_distance: float = 4.0
    # how a generated sample's contours are read: "joint" (the autoencoder's decoder, from the structure channels
    # together with the CT latent) or "fields" (from the structure channels alone, interpolated to the CT grid
    # and cut at each structure's level chosen on the validation split; needs mask_encoding: distance)
    mask_decoding: str = "joint"
    # the decoder also reads the structures' masks at full resolution (a generated sample's own paired masks), so
    # the CT is drawn along its contours (compact backbone, paired structures)
    mask_guidance: bool = False
    # "compact" (norm-free MONAI convolutions and strided convolutions, fast to train), "monai_kl" (MONAI's
    # AutoencoderKL: GroupNorm residual blocks, optional attention) or "maisi" (MONAI's MAISI autoencoder, to load
    # its published weights: channels [64, 128, 256], num_res_blocks 2, norm_num_groups 32, latent_channels 4)
    backbone: str = "compact"
    # the HU window the network reads, scaled to [0, 1] and clipped; empty: MAISI's -1000..1000 for backbone maisi,
    # the preprocessing's model range as it is for the others
    network_hu_window: tuple[float, ...] = ()
    # start from these weights: a save_pretrained folder, the name of weights shipped in medvlm/weights, or (backbone
    # maisi) MAISI's .pt state dict
    pretrained_path: str = ""

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ConfigError(f"models.vae.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.network_hu_window and (len(self.network_hu_window) != 2
                                       or not self.network_hu_window[0] < self.network_hu_window[1]):
            raise ConfigError(f"models.vae.network_hu_window must be [low, high] HU, got {list(self.network_hu_window)}")
        if self.mask_guidance and (self.backbone != "compact" or not self.mask_channels):
            raise ConfigError("models.vae.mask_guidance needs backbone: compact and paired structures (mask_channels > 0)")
        if self.backbone == "maisi" and self.mask_channels and self.mask_decoding != "fields":
            raise ConfigError("models.vae.backbone: maisi keeps MAISI's decoder, which decodes the CT only: paired "
                              "structures are read from their channels; set models.vae.mask_decoding: fields")
        if self.mask_encoding not in ("fraction", "distance"):
            raise ConfigError(f"models.vae.mask_encoding must be 'fraction' or 'distance', got {self.mask_encoding!r}")
        if self.mask_decoding not in MASK_DECODINGS:
            raise ConfigError(f"models.vae.mask_decoding must be one of {MASK_DECODINGS}, got {self.mask_decoding!r}")
        if self.mask_decoding == "fields" and self.mask_encoding != "distance":
            raise ConfigError("models.vae.mask_decoding: fields reads masks from distance-encoded structure channels; "
                              "set models.vae.mask_encoding: distance")
        if not self.mask_distance > 0 or self.mask_channels < 0:
            raise ConfigError(f"models.vae: mask_distance must be > 0 and mask_channels >= 0, got "
                              f"{self.mask_distance} and {self.mask_channels}")


@dataclass
class UNetModelConfig:
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 1
    num_head_channels: int = 16
    norm_num_groups: int = 16
    transformer_num_layers: int = 1
    # the report's parsed fields (side, subsite, T, N, elective neck: medvlm.text.parse.label_vector) as one more
    # context token next to the report's token states
    fields_token: bool = False
    # the parsed fields also added to the timestep embedding (every residual block sees them; needs fields_token)
    fields_time: bool = False
    # three coordinate channels (-0.5..0.5 along x, y, z) at the UNet's input: where left is, for a symmetric anatomy
    coordinates: bool = False
    # "left" / "right": learn and generate every lateralised case in this side and mirror a report of the other
    # side back (CT, structures and text together), so a generated primary lies on the report's side by
    # construction; null: learn both sides (the side must then be learned from the report)
    canonical_side: str | None = None
    # the UNet models each latent voxel's deviation from the training cases' mean latent, in units of their spread
    # (a template measured on the training split)
    latent_template: bool = False
    # a linear (PCA) model of the training cases' latents with this many components, fitted by the diffusion stage;
    # with prior_strength < 1 a sample's anatomy (CT latent and organ-at-risk channels) is held to a draw from it,
    # noised to each step's level, until the last prior_strength of the sampling steps (the lesions and elective
    # target follow the report from pure noise throughout): the spread of the anatomy comes from the training
    # cases' own variation, which a UNet trained a few hundred steps does not learn (0: no prior)
    prior_rank: int = 0
    prior_strength: float = 1.0
    # null: a draw is a Gaussian over the cases' span (a blend of every case); a number >= 0: a draw is one
    # training case's coefficients plus this many standard deviations of Gaussian spread per component (a real
    # anatomy, varied). The prior then carries each case's rank-prior_rank coefficients: share a generator
    # trained on patient CTs only under the terms that cover those CTs
    prior_spread: float | None = None

    def __post_init__(self):
        if self.prior_spread is not None and (isinstance(self.prior_spread, bool)
                                              or not isinstance(self.prior_spread, (int, float))
                                              or not float(self.prior_spread) >= 0.0):
            raise ConfigError(f"models.unet.prior_spread must be null or a number >= 0, got {self.prior_spread!r}")
        if self.prior_spread is not None and not self.prior_rank:
            raise ConfigError("models.unet.prior_spread shapes draws from the latent prior: set models.unet.prior_rank > 0")
        if isinstance(self.prior_rank, bool) or not isinstance(self.prior_rank, int) or self.prior_rank < 0:
            raise ConfigError(f"models.unet.prior_rank must be an integer >= 0, got {self.prior_rank!r}")
        if not valid_prior_strength(self.prior_strength):
            raise ConfigError(f"models.unet.prior_strength must be in (0, 1] (1: no prior), got {self.prior_strength!r}")
        if self.prior_strength < 1.0 and not self.prior_rank:
            raise ConfigError("models.unet.prior_strength < 1 draws the anatomy from the latent prior: set models.unet.prior_rank > 0")
        if self.fields_time and not self.fields_token:
            raise ConfigError("models.unet.fields_time needs models.unet.fields_token: true (both read the parsed fields)")
        if self.canonical_side not in (None, "left", "right"):
            raise ConfigError(f"models.unet.canonical_side must be null, 'left' or 'right', got {self.canonical_side!r}")
        if self.canonical_side is not None and not self.fields_token:
            raise ConfigError("models.unet.canonical_side needs models.unet.fields_token: true (the side is read from the "
                              "parsed fields, also of given prompt embeddings)")


@dataclass
class SegmentationModelConfig:
    decoder_channels: tuple[int, ...] = (16, 32, 64, 128)  # image path: MONAI UNet channels (stride 2 between)
    num_res_units: int = 1
    num_heads: int = 4
    norm_num_groups: int = 8
    report_channels: int = 64  # report path at the latent scale: width and (residual block + cross-attention) layers
    report_layers: int = 2
    # fixed CT windows (level, width in HU) given to the image path as extra input channels
    ct_windows: tuple[tuple[float, float], ...] = ((40.0, 400.0), (400.0, 1800.0))
    # per-structure presence from the report (cN0: no GTVn; post-operative: no GTVp), multiplied into the
    # voxel probabilities (medvlm.models.segmentation)
    presence_head: bool = True
    # what the presence head reads: "fields" (the report's parsed fields: side, N stage, elective neck, ...),
    # "tokens" (its pooled token states) or "both"
    presence_input: str = "fields"
    # structures whose presence is judged per side of the patient's midline (an ipsilateral elective neck
    # rules out the contralateral CTVn); the band of side_margin_mm around the midline keeps the overall presence
    side_structures: tuple[str, ...] = ("CTVn",)
    side_margin_mm: float = 6.0

    def __post_init__(self):
        from medvlm.vocabulary import STRUCTURE_NAMES

        unknown = [name for name in self.side_structures if name not in STRUCTURE_NAMES]
        if unknown:
            raise ConfigError(f"models.segmentation.side_structures: unknown structure(s) {unknown}; "
                              f"known: {list(STRUCTURE_NAMES)}")
        if self.presence_input not in ("fields", "tokens", "both"):
            raise ConfigError(f"models.segmentation.presence_input must be 'fields', 'tokens' or 'both', got {self.presence_input!r}")
        if self.side_margin_mm < 0:
            raise ConfigError(f"models.segmentation.side_margin_mm must be >= 0, got {self.side_margin_mm}")


@dataclass
class BaselineModelConfig:
    """The image-only MONAI UNet the evaluation compares the report-conditioned decoder with."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 1


@dataclass
class ReportGeneratorModelConfig:
    pretrained_path: str = ""  # a local paligemma2-* folder; empty: the tiny model trained from scratch
    image_size: int = 64
    patch_size: int = 16
    vision_hidden_size: int = 64
    vision_layers: int = 2
    text_hidden_size: int = 64
    text_layers: int = 2
    num_heads: int = 2
    tokenizer_vocab_size: int = 512
    max_new_tokens: int = 160


@dataclass
class ModelsConfig:
    contrastive: ContrastiveModelConfig = field(default_factory=ContrastiveModelConfig)
    vae: VAEModelConfig = field(default_factory=VAEModelConfig)
    unet: UNetModelConfig = field(default_factory=UNetModelConfig)
    segmentation: SegmentationModelConfig = field(default_factory=SegmentationModelConfig)
    report_generator: ReportGeneratorModelConfig = field(default_factory=ReportGeneratorModelConfig)
    baseline: BaselineModelConfig = field(default_factory=BaselineModelConfig)


@dataclass
class StageConfig:
    """Optimisation of one training stage (AdamW, cosine schedule with linear warm-up)."""

    steps: int = 100
    batch_size: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 10
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # probability of the laterality-aware mirror image of a training case (CT flipped left-right, left and
    # right swapped in its report and paired structures: train.data.mirror_case); 0: off
    lateral_mirror: float = 0.0


@dataclass
class ContrastiveStageConfig(StageConfig):
    semantic_weight: float = 1.0  # MedCLIP semantic matching
    clip_weight: float = 1.0  # plain InfoNCE (open_clip ClipLoss)
    # MedCLIP text-label pairs: short label phrases (medvlm.text.prompts.label_phrases) matched, by
    # semantic matching, with the CTs and the reports that carry the label; 0 switches them off
    phrase_weight: float = 1.0
    phrases_per_case: int = 2


@dataclass
class VAEStageConfig(StageConfig):
    kl_weight: float = 1e-6
    patch_size: tuple[int, ...] = ()  # random patches (x, y, z) when volumes are large; empty: whole ROI
    windows: tuple[tuple[float, float], ...] = ()  # extra L1 terms in these CT windows (level, width HU)
    lesion_weight: float = 0.0  # extra L1 weight on GTVp/GTVn voxels (1 + lesion_weight)
    mask_weight: float = 1.0  # Dice + BCE of the paired structure logits
    sample_posterior: bool = False  # decode a posterior sample (else the mean) while training
    # train the decoder only: the encoder (and so every latent a diffusion model learned) stays as loaded
    freeze_encoder: bool = False
    # MAISI's patch adversarial loss (MONAI PatchDiscriminator, least squares) on the CT reconstructions, against
    # the smooth decoding an L1 alone gives; 0: off. The discriminator trains beside the autoencoder and is not
    # exported.
    adversarial_weight: float = 0.0
    discriminator_channels: int = 32
    discriminator_layers: int = 3

    def __post_init__(self):
        if not (math.isfinite(self.adversarial_weight) and self.adversarial_weight >= 0):
            raise ConfigError(f"training.vae.adversarial_weight must be a number >= 0, got {self.adversarial_weight!r}")
        if self.discriminator_channels < 1 or self.discriminator_layers < 1:
            raise ConfigError("training.vae.discriminator_channels and discriminator_layers must be >= 1, got "
                              f"{self.discriminator_channels!r} and {self.discriminator_layers!r}")


SNR_WEIGHTINGS = (None, "min_snr", "clipped")


@dataclass
class DiffusionStageConfig(StageConfig):
    prediction_type: str = "epsilon"  # "v_prediction", or "flow_matching" (rectified flow, as MAISI v2)
    report_dropout: float = 0.1  # null report for classifier-free guidance
    num_train_timesteps: int = 1000
    ema_decay: float = 0.999
    # encode every training case once (VAE latents, report token states) instead of every step: faster steps,
    # no augmentation
    cache_latents: bool = False
    # weights of the noise levels in the loss, as weights of the clean latent's error (diffusers' ``compute_snr``):
    # None: the prediction type's own (v-prediction: SNR + 1); "min_snr": min(SNR, snr_gamma) (Min-SNR-gamma,
    # Hang et al. 2023); "clipped" (v-prediction): min(SNR + 1, snr_gamma + 1), v-prediction's own weights
    # clipped, so the easy low-noise steps stop dominating while the high-noise steps, where a sample's side
    # and layout are decided, keep theirs (Min-SNR lowers those to SNR, close to 0)
    snr_weighting: str | None = None
    snr_gamma: float = 5.0

    def __post_init__(self):
        if self.snr_weighting not in SNR_WEIGHTINGS:
            raise ConfigError(f"training.diffusion.snr_weighting must be one of {list(SNR_WEIGHTINGS)}, "
                              f"got {self.snr_weighting!r}")
        if not (math.isfinite(self.snr_gamma) and self.snr_gamma > 0):
            raise ConfigError(f"training.diffusion.snr_gamma must be a number > 0, got {self.snr_gamma!r}")
        if self.snr_weighting is not None and self.prediction_type == "flow_matching":
            raise ConfigError("training.diffusion.snr_weighting weights a diffusion's noise levels; flow_matching has "
                              "no SNR schedule to weight (set snr_weighting: null)")
        if self.snr_weighting == "clipped" and self.prediction_type != "v_prediction":
            raise ConfigError("training.diffusion.snr_weighting: clipped clips v-prediction's own weights; use it "
                              "with prediction_type: v_prediction (or min_snr with epsilon)")


@dataclass
class SegmentationStageConfig(StageConfig):
    # "dice_ce" (MONAI DiceCELoss), "dice_bce" (Dice + a binary cross-entropy per structure) or "dice_focal"
    loss: str = "dice_ce"
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0  # dice_ce and dice_bce
    lambda_focal: float = 1.0  # dice_focal only
    validate_every: int = 50
    report_dropout: float = 0.0  # also learn the no-report case
    finetune_unet: bool = False
    # Precompute the frozen VAE/UNet/text features once per case (no augmentation then): each step only
    # runs the decoder, several times faster on CPU. Ignored when finetune_unet is true.
    cache_features: bool = False
    # Train on random sub-volumes (x, y, z) of the ROI, aligned to the latent grid; empty: the whole ROI.
    # The decoder is convolutional plus attention to report tokens, so it runs on any size at inference.
    patch_size: tuple[int, ...] = ()
    # with patch_size: the fraction of patches centred on a voxel of a structure the case has (one drawn
    # uniformly among them), the rest uniform; 0: all uniform. For ROIs much larger than the patch. On the
    # demo (32^3 of 64^3, 1500 steps) 0.5 lowered validation mean Dice 0.821 -> 0.810 (GTVp 0.57 -> 0.55),
    # and finding the structures' voxels in every centred patch's label took the stage from 292 s to 387 s
    foreground_patches: float = 0.0
    # weight of the presence head's loss (BCE against whether each structure occurs in the case); models.segmentation.presence_head
    presence_weight: float = 1.0
    # reports per step for the presence loss, drawn from the whole training set (the head reads only the
    # report; the voxel batch alone gave it too few examples)
    presence_batch_size: int = 16
    # image-quality augmentation of the training CT (the image alone; contours and any cached features stay):
    # the probability of a Gaussian blur (sigma drawn per axis from blur_sigma, in voxels; MONAI
    # RandGaussianSmoothd) and of a simulated lower resolution (down- then up-sampled by a zoom of 0.5..1; MONAI
    # RandSimulateLowResolutiond). Contouring models trained on sharp CTs alone fail on smoother ones (another
    # reconstruction kernel, thick slices resampled, an autoencoder's reconstruction or a generated CT).
    # Also trains the image-only baseline, which shares these settings. On the demo (validation) either alone at 0.3
    # kept the decoder's mean Dice within 0.03; both at 0.3 lost its brainstem (docs/experiments.md).
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    low_resolution_prob: float = 0.0
    # with synthetic cases in the training split (``medvlm augment``): the share of the drawn cases that are
    # synthetic, in [0, 1) (every real case once an epoch, synthetic ones in turn to fill the share); null: every
    # case drawn equally often, real or synthetic
    synthetic_share: float | None = None

    def __post_init__(self):
        share = self.synthetic_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not 0.0 <= share < 1.0):
            raise ConfigError(f"training.segmentation.synthetic_share must be null or in [0, 1), got {share!r}")
        if not 0.0 <= self.foreground_patches <= 1.0:
            raise ConfigError(f"training.segmentation.foreground_patches must be in [0, 1], got {self.foreground_patches}")
        for name in ("blur_prob", "low_resolution_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ConfigError(f"training.segmentation.{name} must be a probability in [0, 1], got {value!r}")
        sigma = tuple(self.blur_sigma) if isinstance(self.blur_sigma, (list, tuple)) else ()
        if len(sigma) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in sigma) \
                or not 0.0 < sigma[0] <= sigma[1]:
            raise ConfigError("training.segmentation.blur_sigma must be [low, high] in voxels with 0 < low <= high, "
                              f"got {self.blur_sigma!r}")
        self.blur_sigma = (float(sigma[0]), float(sigma[1]))


@dataclass
class TrainingConfig:
    """Shared mechanics and one section per stage (``medvlm train <stage>|all``)."""

    seed: int = 0
    mixed_precision: str = "auto"  # "auto": bf16 on GPU, no on CPU; or "no", "bf16", "fp16"
    # train with 3D convolution weights in channels-last layout (PyTorch's channels_last_3d; checkpoints and
    # exports are written contiguous)
    channels_last: bool = True
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    augment: bool = True
    contrastive: ContrastiveStageConfig = field(default_factory=ContrastiveStageConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    diffusion: DiffusionStageConfig = field(default_factory=DiffusionStageConfig)
    segmentation: SegmentationStageConfig = field(default_factory=SegmentationStageConfig)
    report_generator: StageConfig = field(default_factory=StageConfig)

    def __post_init__(self):
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ConfigError(f"training: checkpoint_every, keep_checkpoints and log_every must be >= 1, got "
                              f"{self.checkpoint_every}, {self.keep_checkpoints} and {self.log_every}")
        for name in ("contrastive", "vae", "diffusion", "segmentation", "report_generator"):
            stage = getattr(self, name)
            if not isinstance(stage, StageConfig):
                continue
            problems = [f"{key} must be {rule}, got {getattr(stage, key)!r}" for key, ok, rule in (
                ("steps", stage.steps >= 0, ">= 0 (0: use the weights as they are)"),
                ("batch_size", stage.batch_size >= 1, ">= 1"),
                ("learning_rate", math.isfinite(stage.learning_rate) and stage.learning_rate > 0, "a finite number > 0"),
                ("weight_decay", math.isfinite(stage.weight_decay) and stage.weight_decay >= 0, "a finite number >= 0"),
                ("warmup_steps", stage.warmup_steps >= 0, ">= 0"),
                ("gradient_accumulation_steps", stage.gradient_accumulation_steps >= 1, ">= 1"),
                ("max_grad_norm", math.isfinite(stage.max_grad_norm) and stage.max_grad_norm > 0, "a finite number > 0"),
            ) if not ok]
            if problems:
                raise ConfigError(f"training.{name}: " + "; ".join(problems))


@dataclass
class MedVLMConfig:
    """Root of a configuration file: data, text, models and training sections."""

    name: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: value {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _build(cls: type, mapping: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(known)}")
    kwargs = {key: _coerce(value, hints[key], f"{where}.{key}" if where else key) for key, value in mapping.items()}
    return cls(**kwargs)


def config_from_dict(mapping: dict, *, source: str = "<dict>", cls: type = MedVLMConfig):
    """Build a config dataclass from a mapping, naming ``source`` and the key path in every error."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(mapping).__name__}")
    try:
        return _build(cls, mapping, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {str(exc).lstrip(': ')}") from None


# The presets ship as package data: ``medvlm/presets`` is the repository's ``configs/`` folder (a link in the
# source tree, copied into wheels), so an installed medvlm resolves ``--config demo`` without a checkout.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    """Names of the shipped presets (``configs/<name>.yaml``, installed as ``medvlm/presets``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []


def valid_prior_strength(value) -> bool:
    """Whether ``value`` is a latent prior strength: a number in (0, 1] (1: no prior). The one test the config,
    the report-to-CT pipeline and the commands share."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML path as given, or the shipped preset of that name (``demo`` -> ``configs/demo.yaml``): the one
    place presets are resolved, for every command."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml") or os.sep in str(name_or_path):
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"no config file or preset named {str(name_or_path)!r}; presets: {', '.join(preset_names())}")
    return preset


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently, so a
    setting repeated further down a long config would override the one its reader sees)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # a complex key: the base loader decides
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str):
    """One YAML document through :class:`_UniqueKeyLoader` (what ``yaml.safe_load`` does with its own loader)."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: str | os.PathLike) -> MedVLMConfig:
    """Read a YAML config into a :class:`MedVLMConfig`: a path, or a preset name (``demo``, ``tiny``, ...)."""
    path = resolve_config_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        mapping = _read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if mapping is None:  # an empty file would silently train every default
        raise ConfigError(f"{path}: the config file is empty; start from a preset such as configs/demo.yaml")
    return config_from_dict(mapping, source=str(path))


def config_hash(config) -> str:
    """Short stable hash of a configuration (recorded with every training output)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(config_to_dict(config), sort_keys=True).encode()).hexdigest()[:12]


def config_to_dict(config) -> dict:
    """Plain-data view of a config (tuples become lists), e.g. for hashing or saving next to outputs."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
