"""CT inputs as users hand them over: a NIfTI path, an array with spacing/affine, a MetaTensor, or a list.

Each becomes a preprocessed MetaTensor (through the MONAI chain) that remembers how to go back to the
input's own grid. Bad inputs raise :class:`~medvlm.errors.InputError` naming the problem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medvlm.config import PreprocessConfig
from medvlm.data.io import check_spacing, check_voxel_count, load_nifti, spacing_from_affine, validate_volume
from medvlm.data.transforms import BODY_HU, as_metatensor, invert_to_input, preprocessing_transforms
from medvlm.errors import InputError


@dataclass
class PreparedCT:
    """One CT after preprocessing, with what is needed to return predictions to its grid."""

    data: dict  # {"image": MetaTensor (1, X, Y, Z)} after the chain
    transform: Compose
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    source: str
    dicom: Any = None  # the DicomSeries when the CT came from a DICOM folder (outputs reference it)
    crop: tuple[slice, slice, slice] | None = None  # the head-and-neck part of the input that was processed
    note: str = ""  # how the processed region was chosen (for warnings)

    @property
    def image(self) -> MetaTensor:
        return self.data["image"]

    def to_input_grid(self, prediction: torch.Tensor, *, nearest: bool = False) -> np.ndarray:
        """Map a (C, X, Y, Z) prediction on the processed grid back to the input grid (C, ...)."""
        image = self.data["image"]
        meta = MetaTensor(prediction.detach().cpu().float(), meta=dict(image.meta))  # the image's affine with its meta
        meta.applied_operations = list(image.applied_operations)
        restored = invert_to_input(self.transform, {"image": image, "pred": meta}, key="pred", nearest=nearest)
        restored = np.asarray(restored.detach().cpu().numpy())
        if self.crop is None:
            return restored
        full = np.zeros((restored.shape[0], *self.input_shape), dtype=restored.dtype)  # zeros outside the region
        full[(slice(None), *self.crop)] = restored
        return full


# The head and neck, unlike the shoulders, chest, abdomen and pelvis, are narrower than this from left to right
# (an adult neck is 100-150 mm wide, a head 140-180 mm; shoulders and trunk 300 mm or more).
HEAD_NECK_MAX_WIDTH_MM = 220.0
# A CT whose body ends in the skull's vertex (its most superior slice under VERTEX_WIDTH_FRACTION of the widest)
# and reaches less than this far below it holds no neck: in adults the mandible's angle and C2-C3 lie about
# 200 mm below the vertex (the hard palate about 150-170 mm).
VERTEX_WIDTH_FRACTION = 0.6
NECK_BELOW_VERTEX_MM = 200.0
# voxels of the region a pipeline processes, at the model's spacing: 2^25 (a 320^3 grid; 960 mm a side at the
# demo's 3 mm). Contouring holds a few float copies of it plus the sliding-window outputs, so this bounds its
# memory; a larger region is refused with its size (choose a region, or a coarser spacing)
MAX_PROCESSED_VOXELS = 2 ** 25


def head_neck_region(volume: np.ndarray, affine: np.ndarray, extent_mm: float, *, threshold_hu: float = BODY_HU,
                     max_width_mm: float = HEAD_NECK_MAX_WIDTH_MM) -> tuple[tuple[slice, slice, slice] | None, str]:
    """The part of a CT of any extent that holds the neck: ``(index slices, note)``, ``(None, note)`` when the
    whole volume is head and neck within ``extent_mm``.

    Per axial slice, the left-right width of the largest connected body region (voxels above ``threshold_hu``;
    the couch and the arms are separate regions) is measured; slices narrower than ``max_width_mm`` are head and
    neck. The region is the ``extent_mm`` above the lowest such slice of the longest narrow run (the neck sits
    on the shoulders). Raises :class:`InputError` when no slice is narrow enough (a chest or abdomen CT). A CT
    that ends at the skull's vertex and reaches less than :data:`NECK_BELOW_VERTEX_MM` below it gets a note that
    it holds no neck.
    Rule-based on purpose: it needs no model, and a user can pass the region instead (``region_mm``).
    """
    from nibabel.orientations import io_orientation
    from scipy import ndimage

    orientation = io_orientation(affine)  # per array axis: (RAS axis, direction)
    axis_of = {int(ras): index for index, (ras, _) in enumerate(orientation)}
    lr, si = axis_of[0], axis_of[2]
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    body = volume > threshold_hu
    widths = np.zeros(volume.shape[si])
    for k in range(volume.shape[si]):
        plane = np.take(body, k, axis=si)
        labels, count = ndimage.label(plane)
        if not count:
            continue
        largest = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
        plane_lr = lr if lr < si else lr - 1  # the left-right axis within the slice
        columns = np.flatnonzero(largest.any(axis=1 - plane_lr))
        widths[k] = (columns[-1] - columns[0] + 1) * spacing[lr]
    narrow = (widths > 0) & (widths < max_width_mm)
    if not narrow.any():
        raise InputError(f"the CT holds no head-and-neck region: its body is at least {max_width_mm:g} mm wide in every "
                         f"axial slice (widest {widths.max():.0f} mm); pass region_mm=(inferior, superior) to contour "
                         "a region anyway")
    runs, start = [], None
    for k, value in enumerate(np.append(narrow, False)):
        if value and start is None:
            start = k
        elif not value and start is not None:
            runs.append((start, k))
            start = None
    first, last = max(runs, key=lambda r: r[1] - r[0])
    superior = orientation[si][1] > 0  # array index grows towards the head
    count = int(round(extent_mm / spacing[si]))
    if superior:  # the lowest narrow slice is `first`; take the extent above it
        low, high = first, min(first + count, volume.shape[si])
    else:
        low, high = max(last - count, 0), last
    occupied = np.flatnonzero(widths > 0)
    top = occupied[-1] if superior else occupied[0]  # the body's most superior slice
    reach_mm = (occupied[-1] - occupied[0] + 1) * spacing[si]
    head_only = ""
    if widths[top] < VERTEX_WIDTH_FRACTION * widths.max() and reach_mm < NECK_BELOW_VERTEX_MM:
        head_only = (f"this CT ends at the top of the head and reaches only {reach_mm:.0f} mm below it (the neck begins "
                     f"about {NECK_BELOW_VERTEX_MM:g} mm below the vertex): it holds no neck, and the contours are where "
                     "a neck would be, not a neck; pass region_mm to choose the slices")
    if occupied[0] >= low and occupied[-1] < high:  # every slice with a body is inside: the whole CT
        return None, head_only
    crop = [slice(None)] * 3
    crop[si] = slice(low, high)
    shoulders = first > occupied[0] if superior else last - 1 < occupied[-1]  # a wider body below the narrow run
    if shoulders:
        note = (f"contoured the head-and-neck region only: {high - low} of {volume.shape[si]} axial slices above the "
                f"shoulders (body narrower than {max_width_mm:g} mm); masks are empty elsewhere")
    else:  # narrow down to the CT's inferior end: a head-only scan, or a neck scan that stops above the shoulders
        note = (f"no shoulders in this CT (the body is narrower than {max_width_mm:g} mm down to its inferior end): "
                f"contoured its inferior {high - low} of {volume.shape[si]} axial slices; if the scan stops above the "
                "neck, the neck is not in it (pass region_mm to choose the slices); masks are empty elsewhere")
    return tuple(crop), f"{head_only}; {note}" if head_only else note


def region_from_mm(affine: np.ndarray, shape: Sequence[int], region_mm: Sequence[float]) -> tuple[slice, slice, slice]:
    """Index slices of the axial slices whose superior coordinate (mm, RAS world) lies in ``region_mm``."""
    from nibabel.orientations import io_orientation

    low, high = sorted(float(v) for v in region_mm)
    si = [int(ras) for ras, _ in io_orientation(affine)].index(2)
    index = np.arange(shape[si])
    points = np.zeros((len(index), 4))
    points[:, si], points[:, 3] = index, 1.0
    z = (np.asarray(affine) @ points.T)[2]
    inside = np.flatnonzero((z >= low) & (z <= high))
    if inside.size < 2:
        raise InputError(f"region_mm {tuple(region_mm)} holds {inside.size} axial slice(s) of this CT "
                         f"(it spans {z.min():.0f} to {z.max():.0f} mm superior)")
    crop = [slice(None)] * 3
    crop[si] = slice(int(inside[0]), int(inside[-1]) + 1)
    return tuple(crop)


def _affine_from(spacing_mm: Sequence[float] | None, affine: np.ndarray | None, what: str) -> np.ndarray:
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError(f"{what}: affine must be a finite, invertible 4 x 4 matrix, got shape {affine.shape}")
        if spacing_mm is not None and not np.allclose(spacing_from_affine(affine), np.asarray(spacing_mm, float), rtol=1e-3):
            raise InputError(f"{what}: spacing_mm {tuple(spacing_mm)} disagrees with the affine's voxel size "
                             f"{tuple(round(v, 4) for v in spacing_from_affine(affine))}; pass one of them")
        return affine
    if spacing_mm is None:
        raise InputError(f"{what}: a numpy array needs `spacing_mm=(x, y, z)` or `affine=` to be placed in space")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{what}: spacing_mm must be three positive numbers, got {spacing_mm!r}")
    return np.diag([*spacing, 1.0])


def prepare_ct(ct: Any, config: PreprocessConfig, *, spacing_mm=None, affine=None, what: str = "ct",
               region: str | Sequence[float] | None = None) -> PreparedCT:
    """Preprocess one CT given as a NIfTI path, a DICOM folder or :class:`DicomSeries`, an array (+ spacing
    or affine) or a MetaTensor.

    ``region``: ``None`` processes the whole volume; ``"head_neck"`` finds the neck in a CT of any extent
    (:func:`head_neck_region`) and processes the ROI's extent above the shoulders; ``(inferior, superior)`` in
    millimetres (RAS world coordinate) processes those axial slices. Predictions return to the whole input grid.
    """
    from medvlm.data.dicom import DicomSeries, read_dicom_series

    dicom = None
    if isinstance(ct, (str, os.PathLike)) and Path(ct).is_dir():
        ct = read_dicom_series(ct)
    if isinstance(ct, DicomSeries):
        dicom = ct
        tensor = as_metatensor(validate_volume(ct.volume, name=what), ct.affine, name=what)
        source = ct.source or "DICOM series"
    elif isinstance(ct, (str, os.PathLike)):
        path = Path(ct)
        volume, file_affine = load_nifti(path, what=f"{what} {path.name}")
        source = str(path)
        tensor = as_metatensor(volume, file_affine, name=what)
    elif isinstance(ct, MetaTensor):
        tensor = as_metatensor(ct, affine if affine is not None else None, name=what)
        source = "MetaTensor"
    elif isinstance(ct, (np.ndarray, torch.Tensor)):
        array = ct.detach().cpu().numpy() if isinstance(ct, torch.Tensor) else ct
        array = validate_volume(array, name=what, allow_channel=True)
        tensor = as_metatensor(array, _affine_from(spacing_mm, affine, what), name=what)
        source = "array"
    else:
        raise InputError(f"{what}: expected a NIfTI path, a DICOM folder, a numpy array, a torch tensor or a MetaTensor, got {type(ct).__name__}")
    input_affine = tensor.affine.numpy().astype(np.float64)
    check_spacing(spacing_from_affine(input_affine), what)
    volume = tensor[0]
    if not bool((volume > config.foreground_threshold_hu).any()):
        raise InputError(f"{what}: no voxel above {config.foreground_threshold_hu:g} HU (an all-air volume, or not in "
                         "Hounsfield units); nothing to contour")
    crop, note = None, ""
    if isinstance(region, str):
        if region != "head_neck":
            raise InputError(f"{what}: region must be None, 'head_neck' or (inferior_mm, superior_mm), got {region!r}")
        extent = float(config.roi_size[2]) * float(config.spacing_mm[2])
        try:
            crop, note = head_neck_region(volume.numpy(), input_affine, extent, threshold_hu=config.foreground_threshold_hu)
        except InputError as exc:
            raise InputError(f"{what}: {exc}") from None
    elif region is not None:
        if len(region) != 2 or not all(np.isfinite(float(v)) for v in region):
            raise InputError(f"{what}: region_mm must be two finite numbers (inferior, superior), got {region!r}")
        crop = region_from_mm(input_affine, volume.shape, region)
        note = f"contoured the region {tuple(float(v) for v in region)} mm only; masks are empty elsewhere"
    if crop is not None:
        offset = np.asarray(input_affine) @ np.array([c.start or 0 for c in crop] + [1.0])
        cropped_affine = input_affine.copy()
        cropped_affine[:3, 3] = offset[:3]
        tensor = as_metatensor(volume.numpy()[crop], cropped_affine, name=what)
    spacing = spacing_from_affine(np.asarray(tensor.affine, dtype=np.float64))
    resampled = [int(np.ceil(n * s / t)) for n, s, t in zip(tensor.shape[1:], spacing, config.spacing_mm)]
    check_voxel_count(resampled, f"{what} at {tuple(float(t) for t in config.spacing_mm)} mm", MAX_PROCESSED_VOXELS,
                      "pass region=(inferior_mm, superior_mm) (CLI --region-mm) to process part of it")
    chain = preprocessing_transforms(config, label_keys=(), load=False)
    data = chain({"image": tensor})
    return PreparedCT(data=data, transform=chain, input_shape=tuple(int(s) for s in volume.shape),
                      input_affine=input_affine, source=source, dicom=dicom, crop=crop, note=note)


def as_list(value: Any) -> list:
    """A single item or a list/tuple of items as a list (arrays are single items)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
