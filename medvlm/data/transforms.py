"""The MONAI preprocessing chain (the reference study's): RAS orientation, resampling, body crop, ROI padding, HU window.

One visible ``Compose`` of dictionary transforms. It is invertible: predictions made on the processed
grid return to the input's own grid with :func:`invert_to_input`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medvlm.config import PreprocessConfig
from medvlm.data.io import validate_volume
from medvlm.errors import InputError


def _foreground_selector(threshold_hu: float):
    def select(image: torch.Tensor) -> torch.Tensor:
        return image > threshold_hu

    return select


def preprocessing_transforms(config: PreprocessConfig | None = None, *, image_key: str = "image",
                             label_keys: Sequence[str] = ("label",), load: bool = True) -> Compose:
    """Build the chain for ``image_key`` (CT in HU) and ``label_keys`` (multi-label masks, channel first).

    With ``load=True`` the values are file paths read by MONAI's ``LoadImaged``; otherwise they are
    channel-first :class:`~monai.data.MetaTensor` objects carrying their affine (see :func:`as_metatensor`).
    """
    config = config or PreprocessConfig()
    label_keys = list(label_keys)
    keys = [image_key] + label_keys
    margin = [int(round(config.foreground_margin_mm / s)) for s in config.spacing_mm]
    chain = []
    if load:
        chain += [
            # datalists hold NIfTI files (DICOM series are imported to NIfTI first, medvlm.data.datalist checks)
            LoadImaged(keys=keys, reader="NibabelReader", image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys=image_key, channel_dim="no_channel"),
        ]
        if label_keys:
            chain.append(EnsureChannelFirstd(keys=label_keys, channel_dim=-1, allow_missing_keys=True))
    chain += [
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True, allow_missing_keys=True),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
        Spacingd(keys=keys, pixdim=config.spacing_mm, mode=["bilinear"] + ["bilinear"] * len(label_keys),
                 padding_mode="border", allow_missing_keys=True),
    ]
    if config.crop_foreground:
        chain.append(CropForegroundd(keys=keys, source_key=image_key, select_fn=_foreground_selector(config.foreground_threshold_hu),
                                     margin=margin, allow_smaller=True, allow_missing_keys=True))
    chain.append(SpatialPadd(keys=image_key, spatial_size=config.roi_size, mode="constant", value=float(config.hu_window[0])))
    if label_keys:
        chain.append(SpatialPadd(keys=label_keys, spatial_size=config.roi_size, mode="constant", value=0.0, allow_missing_keys=True))
    chain += [
        ScaleIntensityRanged(keys=image_key, a_min=config.hu_window[0], a_max=config.hu_window[1],
                             b_min=config.output_range[0], b_max=config.output_range[1], clip=True),
    ]
    return Compose(chain)


# the body of a CT: every tissue lies above, air and lung below. The midline, the head-and-neck search and the
# evaluation use it; the preprocessing's body crop reads PreprocessConfig.foreground_threshold_hu (default the same)
BODY_HU = -500.0


def map_intensity(values, source: Sequence[float], target: Sequence[float], *, clip: bool = False):
    """The one linear intensity mapping of medvlm: the window ``source`` (low, high) onto ``target`` (low, high),
    for tensors, arrays and numbers; ``clip`` keeps the result inside ``target``. HU <-> the model range
    (:func:`to_hu`, :func:`from_hu`), the CT windows of the networks, a pretrained network's own range and the
    report generator's rendering all go through it. Written here: MONAI's ``ScaleIntensityRange`` is a transform
    over dictionaries and has no inverse for volumes a model makes."""
    (s0, s1), (t0, t1) = (float(v) for v in source), (float(v) for v in target)
    mapped = (values - s0) / (s1 - s0) * (t1 - t0) + t0
    if clip:
        low, high = min(t0, t1), max(t0, t1)
        mapped = mapped.clip(low, high) if hasattr(mapped, "clip") else min(max(mapped, low), high)
    return mapped


def to_hu(values, config: PreprocessConfig):
    """Inverse of the chain's intensity scaling: ``output_range`` back to HU over ``hu_window`` (tensors or
    arrays; values the chain clipped stay at the window's ends)."""
    return map_intensity(values, config.output_range, config.hu_window)


def from_hu(values, config: PreprocessConfig):
    """The chain's intensity scaling, HU over ``hu_window`` to ``output_range`` (clipped at the window's ends),
    for volumes already on the model grid (e.g. generated CTs)."""
    return map_intensity(values, config.hu_window, config.output_range, clip=True)


def body_midline(volume, affine=None, *, threshold: float = BODY_HU) -> float:
    """The patient's midline: x of the centroid of the body (voxels above ``threshold``, in the volume's units)
    of one (X, Y, Z) volume or tensor, as a voxel index, or in world millimetres with ``affine`` (4x4). A volume
    without body voxels gives its centre. The one midline of medvlm: the segmentation decoder's side map, the
    contour pipeline's report-consistency check and the evaluation's sides all use it. Written here: MONAI has
    no midline estimate."""
    volume = torch.as_tensor(volume)
    shape = torch.tensor(volume.shape[-3:], dtype=torch.float64)
    body = (volume.reshape(volume.shape[-3:]) > threshold).nonzero().to(torch.float64)
    centroid = body.mean(dim=0) if len(body) else (shape - 1) / 2
    if affine is None:
        return float(centroid[0])
    affine = torch.as_tensor(np.asarray(affine), dtype=torch.float64)
    return float(affine[0, :3] @ centroid + affine[0, 3])


def as_metatensor(volume: np.ndarray | torch.Tensor, affine: np.ndarray | None = None, *, name: str = "ct") -> MetaTensor:
    """Wrap a 3D volume (x, y, z) and its 4x4 affine as a channel-first MetaTensor for the chain."""
    if isinstance(volume, MetaTensor):
        array = volume.detach().cpu().numpy()
        affine = volume.affine.numpy() if affine is None else affine
    else:
        array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    array = validate_volume(array, name=name, allow_channel=True)
    if affine is None:
        raise InputError(f"{name}: an affine (or spacing) is needed to place the volume in space")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{name}: affine must be a finite, invertible 4x4 matrix, got {affine.tolist()}")
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=torch.as_tensor(affine))


def invert_to_input(transform: Compose, processed: dict, *, key: str, orig_key: str = "image",
                    nearest: bool = False) -> MetaTensor:
    """Map ``processed[key]`` (made on the processed grid of ``processed[orig_key]``) back to the input grid.

    Probabilities should be inverted with linear interpolation (``nearest=False``) and thresholded
    afterwards; label maps with ``nearest=True``.
    """
    inverter = Invertd(keys=key, transform=transform, orig_keys=orig_key, nearest_interp=nearest,
                       to_tensor=True)
    return inverter(processed)[key]
