"""Error types that name the offending input, so users see a sentence instead of a deep traceback."""
from __future__ import annotations


class MedVLMError(Exception):
    """Base class of every error medvlm raises on purpose."""


class InputError(MedVLMError, ValueError):
    """An input (file, array, text, table) that cannot be used as given; the message says why."""


class ConfigError(MedVLMError, ValueError):
    """A configuration file or value that does not match the expected schema."""


class DatalistError(InputError):
    """A datalist JSON or records CSV entry that is missing or malformed (names file, row and field)."""

