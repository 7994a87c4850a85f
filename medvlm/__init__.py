"""medvlm: report-conditioned CT generation and contouring for head-and-neck cancer radiotherapy.

Research software, not for clinical use. The library knows nothing of ``pipelines``, ``train`` or ``eval``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from medvlm.errors import ConfigError, DatalistError, InputError, MedVLMError

__all__ = ["__version__", "MedVLMError", "InputError", "ConfigError", "DatalistError"]
