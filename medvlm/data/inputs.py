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
from medvlm.data.io import check_spacing, load_nifti, spacing_from_affine, validate_volume
from medvlm.data.transforms import as_metatensor, invert_to_input, preprocessing_transforms
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

    @property
    def image(self) -> MetaTensor:
        return self.data["image"]

    def to_input_grid(self, prediction: torch.Tensor, *, nearest: bool = False) -> np.ndarray:
        """Map a (C, X, Y, Z) prediction on the processed grid back to the input grid (C, ...)."""
        image = self.data["image"]
        meta = MetaTensor(prediction.detach().cpu().float(), affine=image.affine, meta=dict(image.meta))
        meta.applied_operations = list(image.applied_operations)
        restored = invert_to_input(self.transform, {"image": image, "pred": meta}, key="pred", nearest=nearest)
        return np.asarray(restored.detach().cpu().numpy())


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


def prepare_ct(ct: Any, config: PreprocessConfig, *, spacing_mm=None, affine=None, what: str = "ct") -> PreparedCT:
    """Preprocess one CT given as a NIfTI path, a DICOM folder or :class:`DicomSeries`, an array (+ spacing
    or affine) or a MetaTensor."""
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
    check_spacing(spacing_from_affine(tensor.affine.numpy()), what)
    volume = tensor[0]
    if not bool((volume > config.foreground_threshold_hu).any()):
        raise InputError(f"{what}: no voxel above {config.foreground_threshold_hu:g} HU (an all-air volume, or not in "
                         "Hounsfield units); nothing to contour")
    chain = preprocessing_transforms(config, label_keys=(), load=False)
    data = chain({"image": tensor})
    return PreparedCT(data=data, transform=chain, input_shape=tuple(int(s) for s in volume.shape),
                      input_affine=tensor.affine.numpy().astype(np.float64), source=source, dicom=dicom)


def as_list(value: Any) -> list:
    """A single item or a list/tuple of items as a list (arrays are single items)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
