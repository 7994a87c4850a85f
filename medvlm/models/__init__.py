"""Networks of medvlm. diffusers records a component by its module path, so these classes stay
importable from ``medvlm.models`` (and their defining modules) for saved pipelines to load."""
from medvlm.models.baseline import ImageOnlySegmenter
from medvlm.models.contrastive import MedCLIPModel, clip_loss, semantic_matching_loss, siglip_loss
from medvlm.models.segmentation import FusedSegmentationDecoder
from medvlm.models.unet import ReportConditionedUNet3D
from medvlm.models.vae import CTAutoencoderKL
from medvlm.models.zero_shot import ZeroShotClassifier

__all__ = ["CTAutoencoderKL", "ReportConditionedUNet3D", "FusedSegmentationDecoder", "MedCLIPModel",
           "ZeroShotClassifier", "ImageOnlySegmenter", "clip_loss", "semantic_matching_loss", "siglip_loss"]
