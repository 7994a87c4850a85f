"""Diffusers pipelines of medvlm (inference only), one per file. Load each with its own class:
``ContourPipeline.from_pretrained(folder)``; folders are local, components come from medvlm,
diffusers or transformers only."""
from pipelines.pipeline_contour import ContourPipeline, ContourPipelineOutput

__all__ = ["ContourPipeline", "ContourPipelineOutput"]
