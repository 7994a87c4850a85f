"""Diffusers pipelines of medvlm (inference only), one per file. Load each with its own class:
``ContourPipeline.from_pretrained(folder)``; folders are local, components come from medvlm,
diffusers or transformers only.

The classes are imported on first use (PEP 562), as diffusers does, so ``import pipelines.cli`` (the
``medvlm`` command's registration) does not load torch, diffusers and transformers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_MODULE_OF = {
    "ContourPipeline": "pipeline_contour", "ContourPipelineOutput": "pipeline_contour",
    "ReportGenerationPipeline": "pipeline_report_generation", "ReportGenerationOutput": "pipeline_report_generation",
    "ReportToCTPipeline": "pipeline_report_to_ct", "ReportToCTPipelineOutput": "pipeline_report_to_ct",
    "ZeroShotClassificationPipeline": "pipeline_zero_shot", "ZeroShotClassificationOutput": "pipeline_zero_shot",
}
__all__ = list(_MODULE_OF)

if TYPE_CHECKING:
    from pipelines.pipeline_contour import ContourPipeline, ContourPipelineOutput  # noqa: F401
    from pipelines.pipeline_report_generation import ReportGenerationOutput, ReportGenerationPipeline  # noqa: F401
    from pipelines.pipeline_report_to_ct import ReportToCTPipeline, ReportToCTPipelineOutput  # noqa: F401
    from pipelines.pipeline_zero_shot import ZeroShotClassificationOutput, ZeroShotClassificationPipeline  # noqa: F401


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pipelines.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
