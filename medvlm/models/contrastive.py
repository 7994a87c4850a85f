"""MedCLIP-style contrastive CT-report model: a 3D CT tower, a report text tower, one shared space.

open_clip provides the losses (``ClipLoss``, ``SigLipLoss``). Its model classes (``CLIP``,
``CustomTextCLIP``) are not used: their vision towers are 2D (timm/ViT) and cannot take a CT volume,
so the towers are a MONAI 3D ResNet and a transformers text encoder, each with a linear projection and a
shared learnable temperature, as in CLIP. MedCLIP's semantic-matching loss (soft targets from report
label similarity) is written here because no library provides it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the base class in this module when loading

from medvlm.models.base import AlignedModelMixin
from medvlm.models.windows import CTWindows, coordinate_channels
from medvlm.text.encoders import masked_mean
from diffusers.utils import BaseOutput
from monai.networks.nets import ResNet
from torch import nn


@dataclass
class ContrastiveOutput(BaseOutput):
    image_embeds: torch.Tensor | None
    text_embeds: torch.Tensor | None
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None


def buildable_text_config(config: dict) -> dict:
    """A transformers config dict without the bookkeeping keys that ``AutoConfig.for_model`` rejects."""
    skip = ("architectures", "transformers_version", "dtype", "torch_dtype")
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in skip}


class MedCLIPModel(AlignedModelMixin, ConfigMixin):
    """CT tower + text tower projected to ``embed_dim`` with L2-normalised outputs.

    Args:
        text_config: a transformers config as a dict (``model_type`` included), e.g. MiniLM's; build
            with :meth:`from_text_encoder` to start from pretrained text weights.
        image_block_inplanes / image_layers: MONAI ``ResNet`` widths and blocks per stage (3D, basic blocks).
        text_pooling: ``"mean"`` (encoders) or ``"cls"``.
        frozen_text_layers: the lowest N transformer layers (and embeddings) are frozen.
        freeze_text_embeddings: freeze the embeddings also when ``frozen_text_layers`` is 0.
        image_pool: the CT tower first averages ``image_pool``^3 voxel blocks (2: a 64^3 ROI is seen at
            32^3, eight times less compute; laterality and subsite are coarse findings).
        ct_windows / input_hu_window / input_range: fixed CT windows as extra input channels
            (:class:`medvlm.models.windows.CTWindows`); empty: the preprocessed CT alone.
        image_coordinates: append the voxel coordinates as three input channels
            (:func:`~medvlm.models.windows.coordinate_channels`), so that the globally pooled CT embedding can
            say on which side a finding lies; without them laterality is learned only from padding effects.
    """

    @register_to_config
    def __init__(self, text_config: dict | None = None, embed_dim: int = 128,
                 image_block_inplanes: Sequence[int] = (16, 32, 64, 128), image_layers: Sequence[int] = (1, 1, 1, 1),
                 image_in_channels: int = 1, text_pooling: str = "mean", frozen_text_layers: int = 0,
                 init_logit_scale: float = math.log(1 / 0.07), init_logit_bias: float | None = None,
                 image_pool: int = 1, ct_windows: Sequence[Sequence[float]] = (),
                 input_hu_window: Sequence[float] = (-1000.0, 1500.0), input_range: Sequence[float] = (-1.0, 1.0),
                 image_coordinates: bool = False, freeze_text_embeddings: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if text_config is None:
            raise ValueError("text_config is required (use MedCLIPModel.from_text_encoder('minilm'))")
        config = dict(text_config)
        model_type = config.pop("model_type")
        self.text_model = AutoModel.from_config(AutoConfig.for_model(model_type, **config))
        if getattr(self.text_model, "pooler", None) is not None:
            # unused (we pool ourselves): frozen so DDP does not wait for its gradients, kept so the text
            # tower saves as a complete model for the pipelines
            self.text_model.pooler.requires_grad_(False)
        hidden = int(self.text_model.config.hidden_size)
        if image_pool < 1:
            raise ValueError(f"image_pool must be >= 1, got {image_pool}")
        self.windows = CTWindows(input_hu_window, input_range, ct_windows) if ct_windows else None
        channels = image_in_channels * (self.windows.out_channels if self.windows is not None else 1)
        channels += 3 if image_coordinates else 0
        self.image_model = ResNet(block="basic", layers=list(image_layers), block_inplanes=list(image_block_inplanes),
                                  spatial_dims=3, n_input_channels=channels, feed_forward=False,
                                  conv1_t_size=3, conv1_t_stride=1)
        self.image_projection = nn.Linear(int(image_block_inplanes[-1]), embed_dim, bias=False)
        self.text_projection = nn.Linear(hidden, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        self.freeze_text_layers(frozen_text_layers, embeddings=freeze_text_embeddings)

    @classmethod
    def from_text_encoder(cls, name_or_path: str = "minilm", **kwargs) -> "MedCLIPModel":
        """Build the model with its text tower initialised from a local/embedded pretrained encoder."""
        from medvlm.text.encoders import TextEncoder

        encoder = TextEncoder.from_pretrained(name_or_path)
        text_config = encoder.model.config.to_dict()
        model = cls(text_config=buildable_text_config(text_config), **kwargs)
        missing, unexpected = model.text_model.load_state_dict(encoder.model.state_dict(), strict=False)
        if unexpected or [m for m in missing if "position_ids" not in m]:
            raise RuntimeError(f"text weights do not fit: missing {missing}, unexpected {unexpected}")
        return model

    def freeze_text_layers(self, count: int, embeddings: bool = False) -> None:
        """Freeze the embeddings and the lowest ``count`` transformer layers (0: all trainable, or all but
        the embeddings when ``embeddings``). Works on BERT-like encoders (``embeddings``, ``encoder.layer``) and on
        decoder LMs (the input token embeddings, ``layers`` as in Llama/Mistral/Gemma or ``h`` as in GPT-2)."""
        if count <= 0 and not embeddings:
            return
        # BERT-like: word, position and type embeddings; others: the token embeddings
        module = getattr(self.text_model, "embeddings", None) or self.text_model.get_input_embeddings()
        module.requires_grad_(False)
        if count <= 0:
            return
        layers = None
        for path in ("encoder.layer", "layers", "h", "encoder.layers", "transformer.layer"):
            layers = self.text_model
            for name in path.split("."):
                layers = getattr(layers, name, None)
            if isinstance(layers, torch.nn.ModuleList):
                break
            layers = None
        if layers is None:
            raise ValueError(f"frozen_text_layers: no transformer layer list found in {type(self.text_model).__name__} "
                             "(looked for encoder.layer, layers, h); set models.contrastive.frozen_text_layers: 0")
        for layer in list(layers)[:count]:
            layer.requires_grad_(False)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """CT volumes (B, 1, X, Y, Z) in the preprocessed intensity range -> embeddings (B, embed_dim)."""
        if self.windows is not None:
            images = self.windows(images)
        if self.config.image_pool > 1:
            images = F.avg_pool3d(images, self.config.image_pool, ceil_mode=True)
        if self.config.image_coordinates:
            images = torch.cat([images, coordinate_channels(images)], dim=1)
        features = self.image_model(images)
        embeds = self.image_projection(features)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.text_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = masked_mean(hidden, attention_mask)
        embeds = self.text_projection(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def forward(self, images: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        image_embeds = self.encode_image(images) if images is not None else None
        text_embeds = self.encode_text(input_ids, attention_mask) if input_ids is not None else None
        scale = self.logit_scale.exp().clamp(max=100.0)
        out = ContrastiveOutput(image_embeds, text_embeds, scale, self.logit_bias)
        return out if return_dict else out.to_tuple()


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip ``ClipLoss``, single process; DDP gathers happen in the trainer)."""
    from open_clip import ClipLoss

    return ClipLoss()(image_embeds, text_embeds, logit_scale)


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """Sigmoid pairwise loss (open_clip ``SigLipLoss``)."""
    from open_clip.loss import SigLipLoss

    return SigLipLoss()(image_embeds, text_embeds, logit_scale, logit_bias)


def semantic_targets(labels: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """Soft targets from label vectors: non-negative cosine similarity, rows normalised to sum to one.

    Square case (``other`` is None, image-report pairs): each sample always matches itself, so an
    all-unknown label vector falls back to the CLIP target. MedCLIP takes a softmax of label dot products;
    row normalisation is used here so that one-hot identity labels give exactly the CLIP (identity) targets.
    Rectangular case (``other`` given, e.g. label phrases): rows without any match are all zero.
    """
    normed = F.normalize(labels.float(), dim=-1)
    similarity = (normed @ F.normalize((labels if other is None else other).float(), dim=-1).T).clamp_min(0.0)
    if other is None:
        similarity.fill_diagonal_(1.0)
    return similarity / similarity.sum(dim=1, keepdim=True).clamp_min(1e-12)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the rows that have a target (rows of zeros have nothing to match)."""
    rows = targets.sum(1) > 0
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return -(targets[rows] * F.log_softmax(logits[rows], dim=1)).sum(1).mean()


def semantic_matching_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                           labels: torch.Tensor, text_labels: torch.Tensor | None = None) -> torch.Tensor:
    """MedCLIP's decoupled semantic-matching loss: cross-entropy against soft targets, both directions,
    so that two patients with the same findings are not pushed apart as negatives.

    ``text_labels``: label vectors of the texts when they are not the images' own reports (MedCLIP's
    text-label pairs, e.g. :func:`medvlm.text.prompts.label_phrases`); ``image_embeds`` may then be any
    embeddings labelled by ``labels`` (CT or report).
    """
    logits = logit_scale * image_embeds @ text_embeds.T
    targets = semantic_targets(labels, text_labels).to(logits.dtype)
    if text_labels is None:
        return (_soft_cross_entropy(logits, targets) + _soft_cross_entropy(logits.T, targets.T)) / 2
    reverse = semantic_targets(text_labels, labels).to(logits.dtype)
    return (_soft_cross_entropy(logits, targets) + _soft_cross_entropy(logits.T, reverse)) / 2
