"""Diffusers pipelines of medvlm (inference only), one per file. Load each with its own class:
``ContourPipeline.from_pretrained(folder)``; folders are local, components come from medvlm,
diffusers or transformers only."""
from pipelines.pipeline_contour import ContourPipeline, ContourPipelineOutput
from pipelines.pipeline_report_generation import ReportGenerationOutput, ReportGenerationPipeline
from pipelines.pipeline_report_to_ct import ReportToCTPipeline, ReportToCTPipelineOutput
from pipelines.pipeline_zero_shot import ZeroShotClassificationOutput, ZeroShotClassificationPipeline

__all__ = ["ContourPipeline", "ContourPipelineOutput", "ReportToCTPipeline", "ReportToCTPipelineOutput",
           "ZeroShotClassificationPipeline", "ZeroShotClassificationOutput", "ReportGenerationPipeline",
           "ReportGenerationOutput"]
