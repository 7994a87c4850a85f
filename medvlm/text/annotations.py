"""Inline PHI annotations (``{{TYPE|value}}``) for labelled de-identification sets: text plus spans."""
from __future__ import annotations

import re

from medvlm.text.deid import PHI_TYPES, Span

_MARK = re.compile(r"\{\{([A-Z]+)\|(.*?)\}\}", re.DOTALL)


def parse_annotated(marked: str, *, source: str = "<text>") -> tuple[str, list[Span]]:
    """Turn ``"Seen by {{NAME|Jo Bloggs}}"`` into ``("Seen by Jo Bloggs", [Span(8, 17, "NAME")])``."""
    pieces, spans, cursor, length = [], [], 0, 0
    for m in _MARK.finditer(marked):
        kind, value = m.group(1), m.group(2)
        if kind not in PHI_TYPES:
            raise ValueError(f"{source}: unknown identifier type {kind!r} (allowed: {PHI_TYPES})")
        before = marked[cursor:m.start()]
        pieces.append(before)
        length += len(before)
        spans.append(Span(length, length + len(value), kind, "gold"))
        pieces.append(value)
        length += len(value)
        cursor = m.end()
    pieces.append(marked[cursor:])
    return "".join(pieces), spans
