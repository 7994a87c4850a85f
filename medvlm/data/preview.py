"""PNG previews: axial, coronal and sagittal slices through a point of interest with coloured contours.

Slices are shown in radiological convention (patient's right on the image's left, anterior/superior up).
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from medvlm.vocabulary import STRUCTURE_COLOURS

SOFT_TISSUE_WINDOW_HU = (40.0, 400.0)  # level, width


def window(image_hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map HU to [0, 1] with a display window."""
    return np.clip((image_hu - (level - width / 2.0)) / width, 0.0, 1.0)


def focus_point(labels: np.ndarray, names: Sequence[str], image_shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel to slice through: the primary tumour's centroid, else the nodes', else the volume centre."""
    for name in ("GTVp", "GTVn", "CTVn"):
        if name in names:
            mask = labels[list(names).index(name)]
            if mask.any():
                return tuple(int(round(v)) for v in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
    return tuple(n // 2 for n in image_shape)  # type: ignore[return-value]


# The patient direction at the (left, right, top, bottom) edge of each view of ``_views`` (RAS arrays: +x points to
# the patient's Right, +y Anterior, +z Superior; radiological display), written on every view so that a reader
# can judge a tumour's side without knowing the convention.
VIEW_EDGES = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}


def _views(volume: np.ndarray, point: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices of a RAS-ordered array through ``point``, oriented as ``VIEW_EDGES``."""
    i, j, k = point
    return [volume[::-1, ::-1, k].T, volume[::-1, j, ::-1].T, volume[i, ::-1, ::-1].T]


def _mark_edges(ax, edges: tuple[str, str, str, str]) -> None:
    """Orientation letters at the middle of each edge of a view (left, right, top, bottom)."""
    style = dict(color="yellow", fontsize=9, fontweight="bold", transform=ax.transAxes)
    ax.text(0.01, 0.5, edges[0], ha="left", va="center", **style)
    ax.text(0.99, 0.5, edges[1], ha="right", va="center", **style)
    ax.text(0.5, 0.99, edges[2], ha="center", va="top", **style)
    ax.text(0.5, 0.01, edges[3], ha="center", va="bottom", **style)


def save_preview(path: str | os.PathLike, image_hu: np.ndarray, labels: np.ndarray | None, names: Sequence[str],
                 spacing_mm: Sequence[float], *, title: str = "", point: Sequence[int] | None = None) -> Path:
    """Write a three-view PNG (atomically) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels if labels is not None else np.zeros((0,) + image_hu.shape, dtype=np.uint8)
    point = point or focus_point(labels, names, image_hu.shape)
    sx, sy, sz = spacing_mm
    aspects = [sy / sx, sz / sx, sz / sy]  # row spacing over column spacing for each view
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100)
    shown = window(image_hu, *SOFT_TISSUE_WINDOW_HU)
    present = []
    for ax, view, aspect, label in zip(axes, _views(shown, point), aspects, ("axial", "coronal", "sagittal")):
        ax.imshow(view, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
        _mark_edges(ax, VIEW_EDGES[label])
    for c, name in enumerate(names):
        mask_views = _views(labels[c].astype(np.float32), point)
        colour = np.array(STRUCTURE_COLOURS.get(name, (255, 255, 255))) / 255.0
        drawn = False
        for ax, mask in zip(axes, mask_views):
            if mask.any() and mask.min() < 1:
                ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.0)
                drawn = True
        if drawn:
            present.append((name, colour))
    handles = [plt.Line2D([0], [0], color=colour, lw=2, label=name) for name, colour in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 9), fontsize=8, frameon=False)
    title = textwrap.fill(title, width=110, max_lines=2, placeholder=" ...")  # a whole report prompt fits
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.93 if "\n" in title else 0.95))
    return save_figure(fig, path)


def save_figure(figure, path: str | os.PathLike, *, dpi: float | None = None) -> Path:
    """Write a matplotlib figure as PNG atomically (never a half-written file), close it, return the path."""
    import matplotlib.pyplot as plt

    from medvlm.data.io import atomic_path

    with atomic_path(Path(path)) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    plt.close(figure)
    return Path(path)
