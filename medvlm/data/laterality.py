"""Left-right mirroring of a case: CT, paired structures, report text and parsed fields together.

Used by training (the laterality-aware mirror augmentation) and by report-to-CT generation with a UNet trained
in a canonical side (``canonical_side``): a report whose primary is on the other side is generated in the
canonical frame and mirrored back, so the side of a generated tumour is the report's by construction.
Written here because MONAI's ``Flip`` flips arrays but knows nothing of report text, paired structure names
(``Parotid_L`` <-> ``Parotid_R``) or the parsed label vector.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from medvlm.vocabulary import STRUCTURE_NAMES

SIDES = ("left", "right")
_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_side_words(text: str) -> str:
    """'left' <-> 'right' (whole words, case kept); 'ipsilateral'/'bilateral'/'midline' are relative and stay."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
    return _SIDE_WORD.sub(swap, text)


def other_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return SIDES[1 - SIDES.index(side)]


def mirrored_label_index() -> list[int]:
    """Positions of the parsed label vector (:data:`medvlm.text.parse.LABEL_NAMES`) after mirroring: the
    laterality group's left and right entries trade places."""
    from medvlm.text.parse import LABEL_SPACE

    order, offset = [], 0
    for field_name, values in LABEL_SPACE.items():
        for value in values:
            if field_name == "laterality" and value in SIDES:
                value = other_side(value)
            order.append(offset + values.index(value))
        offset += len(values)
    return order


def mirrored_channels(names: Sequence[str] = STRUCTURE_NAMES) -> list[int]:
    """Structure channel order after mirroring: every ``*_L`` trades places with its ``*_R``."""
    names = list(names)

    def partner(name: str) -> str:
        return name[:-2] + {"_L": "_R", "_R": "_L"}[name[-2:]] if name[-2:] in ("_L", "_R") else name
    return [names.index(partner(n)) if partner(n) in names else i for i, n in enumerate(names)]


def side_of_labels(labels: np.ndarray | torch.Tensor) -> list[str | None]:
    """The primary's side ('left', 'right' or None: midline, unknown or no parsed vector) of each row of a batch
    of parsed label vectors (N, len(LABEL_NAMES)); a single vector gives a one-element list."""
    from medvlm.text.parse import LABEL_NAMES

    rows = torch.as_tensor(labels).detach().float().cpu().reshape(-1, torch.as_tensor(labels).shape[-1])
    if rows.shape[-1] != len(LABEL_NAMES):
        return [None] * rows.shape[0]
    left, right = LABEL_NAMES.index("laterality=left"), LABEL_NAMES.index("laterality=right")
    return ["left" if r[left] > 0.5 and r[right] <= 0.5 else "right" if r[right] > 0.5 and r[left] <= 0.5 else None
            for r in rows]


def mirror_labels(labels: torch.Tensor, rows: torch.Tensor | Sequence[bool] | None = None) -> torch.Tensor:
    """Parsed label vectors (N, L) with left and right swapped (in the ``rows`` given, default all)."""
    mirrored = labels[..., mirrored_label_index()]
    if rows is None:
        return mirrored
    rows = torch.as_tensor(rows, dtype=torch.bool, device=labels.device).view(-1, *([1] * (labels.ndim - 1)))
    return torch.where(rows, mirrored, labels)


def mirror_volumes(volumes: torch.Tensor, rows: torch.Tensor | Sequence[bool] | None = None, axis: int = 2,
                   channel_order: Sequence[int] | None = None) -> torch.Tensor:
    """A batch (N, C, X, Y, Z) flipped along ``axis`` (RAS x: left-right) in the ``rows`` given (default all),
    the channels of mirrored rows reordered by ``channel_order`` (:func:`mirrored_channels` for structures)."""
    mirrored = volumes.flip(axis)
    if channel_order is not None:
        mirrored = mirrored[:, list(channel_order)]
    if rows is None:
        return mirrored
    rows = torch.as_tensor(rows, dtype=torch.bool, device=volumes.device).view(-1, *([1] * (volumes.ndim - 1)))
    return torch.where(rows, mirrored, volumes)
