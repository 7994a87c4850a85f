"""Radiotherapy DICOM in and out: CT series -> volume, RTSTRUCT <-> masks, DICOM-SEG <-> masks.

Volumes use the same convention as the NIfTI path: array axes (x, y, z) = (DICOM columns, rows, slices)
and a 4x4 affine to RAS+ millimetres (DICOM patient coordinates are LPS+; the affine flips x and y).

Libraries: pydicom reads and writes files; ``highdicom`` encodes and decodes DICOM-SEG; ``rt-utils``
turns masks into RTSTRUCT polygons (OpenCV contour tracing, holes as separate contours). Two pieces are
written here, each saying why: the series geometry checks (no maintained library reports missing
slices and gantry tilt as errors while keeping the LPS -> RAS affine) and the RTSTRUCT rasteriser
(rt-utils reads only axial, square series from a folder path; ours works on the grid we already hold
and applies the even-odd rule, so holes stored as inner contours stay holes).

De-identification on the way in: a :class:`DicomSeries` keeps pixel data, geometry and the UIDs that
outputs must reference; the patient module is replaced by pseudonyms (PS3.15 basic profile, the same
keyed pseudonyms as ``medvlm deid dicom``) and dates are dropped before anything else sees the headers.
The series' own UIDs are kept: an RTSTRUCT must point at the images it contours. Run ``medvlm deid dicom``
on the series first when UIDs must be remapped too; the contours then reference the de-identified copy.
"""
from __future__ import annotations

import datetime
import tempfile
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from medvlm.data.io import atomic_path, spacing_from_affine
from medvlm.errors import InputError

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Attributes copied from each slice into the de-identified reference headers (geometry and references).
_REFERENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                       "Modality", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                       "SliceThickness", "InstanceNumber", "SeriesNumber")
_NON_IMAGE_MODALITIES = {"RTSTRUCT", "SEG", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG"}


@dataclass
class DicomSeries:
    """One image series as a volume, with de-identified per-slice reference headers (volume order)."""

    volume: np.ndarray  # (X, Y, Z) float32, Hounsfield units for CT
    affine: np.ndarray  # 4x4 voxel -> RAS+ mm
    references: list = field(repr=False)  # pydicom Datasets, one per slice along z
    series_uid: str = ""
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    modality: str = ""
    source: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def affine_lps(self) -> np.ndarray:
        return LPS_TO_RAS @ self.affine

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(r.SOPInstanceUID) for r in self.references]


def _files(folder: Path) -> Iterable[Path]:
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            yield Path(root) / name


def _scan(folder: Path) -> tuple[dict[str, list], int]:
    """Headers of every image file in ``folder`` grouped by SeriesInstanceUID; count of non-DICOM files."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list] = {}
    skipped = 0
    for path in _files(folder):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError):
            skipped += 1
            continue
        if str(header.get("Modality", "")) in _NON_IMAGE_MODALITIES or "ImagePositionPatient" not in header \
                or "Rows" not in header:
            continue
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))
    return series, skipped


def list_series(folder: str | os.PathLike) -> list[dict]:
    """The image series of a folder: uid, modality, number of slices, description."""
    series, _ = _scan(Path(folder))
    return [{"series_uid": uid, "modality": str(items[0][1].get("Modality", "")), "slices": len(items),
             "description": str(items[0][1].get("SeriesDescription", ""))} for uid, items in series.items()]


def _deidentified_reference(header, pseudonyms) -> "object":
    """A minimal header for one slice: geometry and UIDs, patient module pseudonymised, no dates."""
    from pydicom.dataset import Dataset

    reference = Dataset()
    for keyword in _REFERENCE_KEYWORDS:
        if keyword in header:
            setattr(reference, keyword, header.data_element(keyword).value)
    patient_id = str(header.get("PatientID", ""))
    reference.PatientName = pseudonyms.pseudonym(patient_id or "unknown")
    reference.PatientID = pseudonyms.pseudonym(patient_id or "unknown")
    for keyword in ("PatientBirthDate", "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
                    "SeriesDescription"):
        setattr(reference, keyword, "")
    return reference


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None, *, secret: str = "medvlm",
                      gap_tolerance: float = 0.2) -> DicomSeries:
    """Read one CT/MR series from a folder as a volume in HU with its RAS affine.

    Slices are sorted by ImagePositionPatient along the slice normal; spacing comes from positions, not
    SliceThickness. Raises :class:`InputError` for a folder without images, several series without
    ``series_uid``, mixed geometry, duplicate positions, missing slices (a gap more than
    ``gap_tolerance`` above the usual spacing) and gantry tilt.
    """
    import pydicom

    from medvlm.data.dicom_deid import DicomDeidentifier

    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"DICOM folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; pass the folder holding the DICOM series")
    groups, skipped = _scan(folder)
    if not groups:
        raise InputError(f"{folder}: no DICOM image series found ({skipped} file(s) were not DICOM)")
    if series_uid is None:
        if len(groups) > 1:
            listing = "; ".join(f"{uid} ({len(items)} slices, {items[0][1].get('Modality', '?')})" for uid, items in groups.items())
            raise InputError(f"{folder} holds {len(groups)} image series; choose one with series_uid= (--series-uid): {listing}")
        series_uid = next(iter(groups))
    if series_uid not in groups:
        raise InputError(f"{folder}: no series with SeriesInstanceUID {series_uid}; found {', '.join(groups)}")
    items = groups[series_uid]
    if len(items) < 2:
        raise InputError(f"{folder}: series {series_uid} has a single slice; a volume needs at least two")
    first = items[0][1]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(float(row_dir @ col_dir)) > 1e-3:
        raise InputError(f"{folder}: ImageOrientationPatient {list(orientation)} is not two orthonormal directions")
    for path, header in items:
        if int(header.get("SamplesPerPixel", 1)) != 1:
            raise InputError(f"{path.name}: {header.get('PhotometricInterpretation', 'colour')} pixels "
                             f"(SamplesPerPixel {header.SamplesPerPixel}); a CT series has one grey value per voxel")
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(f"{path.name}: multi-frame image ({header.NumberOfFrames} frames); enhanced multi-frame "
                             "CT is not supported, export the series as one file per slice")
        if not np.allclose(np.asarray(header.ImageOrientationPatient, dtype=np.float64), orientation, atol=1e-4):
            raise InputError(f"{path.name}: ImageOrientationPatient differs from the rest of series {series_uid}")
        if (header.Rows, header.Columns) != (first.Rows, first.Columns) or \
                not np.allclose(np.asarray(header.PixelSpacing, float), np.asarray(first.PixelSpacing, float), atol=1e-4):
            raise InputError(f"{path.name}: Rows/Columns/PixelSpacing differ from the rest of series {series_uid}")
    positions = np.asarray([np.asarray(h.ImagePositionPatient, dtype=np.float64) for _, h in items])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    items, positions, along = [items[i] for i in order], positions[order], along[order]
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        at = int(np.argmin(steps))
        raise InputError(f"{folder}: two slices share the position {along[at]:.2f} mm ({items[at][0].name}, "
                         f"{items[at + 1][0].name}); duplicate or mixed acquisitions in series {series_uid}")
    deltas = np.diff(positions, axis=0)
    sideways = np.linalg.norm(deltas - np.outer(deltas @ normal, normal), axis=1)
    if np.any(sideways > 0.01 * np.abs(steps) + 1e-3):
        angle = float(np.degrees(np.arctan2(np.median(sideways), np.median(steps))))
        raise InputError(f"{folder}: gantry tilt of about {angle:.1f} degrees (slice origins move sideways); "
                         "resample the series to an orthogonal grid before use")
    spacing = float(np.median(steps))
    gaps = np.nonzero(steps > spacing * (1.0 + gap_tolerance))[0]
    if len(gaps):
        g = int(gaps[0])
        raise InputError(f"{folder}: missing slice(s) in series {series_uid}: {steps[g]:.2f} mm between positions "
                         f"{along[g]:.2f} and {along[g + 1]:.2f} mm where slices are {spacing:.2f} mm apart "
                         f"({len(gaps)} gap(s))")
    if np.any(steps < spacing * (1.0 - gap_tolerance)):
        raise InputError(f"{folder}: uneven slice spacing in series {series_uid} ({steps.min():.2f} to {steps.max():.2f} mm)")

    pseudonyms = DicomDeidentifier(secret)
    slices, references = [], []
    for path, _ in items:
        dataset = pydicom.dcmread(path)
        try:
            pixels = dataset.pixel_array.astype(np.float32)
        except Exception as exc:  # pydicom raises many types for unsupported transfer syntaxes / damaged data
            raise InputError(f"{path}: pixel data cannot be decoded: {exc}") from None
        slope, intercept = float(dataset.get("RescaleSlope", 1.0)), float(dataset.get("RescaleIntercept", 0.0))
        slices.append((pixels * slope + intercept).T)  # (rows, columns) -> (x = columns, y = rows)
        references.append(_deidentified_reference(dataset, pseudonyms))
        del dataset
    volume = np.stack(slices, axis=-1).astype(np.float32)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)  # PixelSpacing = (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * column_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = positions[0]
    return DicomSeries(volume=volume, affine=LPS_TO_RAS @ lps, references=references, series_uid=series_uid,
                       study_uid=str(first.get("StudyInstanceUID", "")),
                       frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
                       modality=str(first.get("Modality", "")), source=str(folder))


# ----------------------------------------------------------------------------------------- RTSTRUCT

def _check_references(dataset, series: DicomSeries, what: str) -> None:
    """Refuse an object whose referenced images are not in ``series`` (it belongs to another series)."""
    referenced: set[str] = set()
    for frame in dataset.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for ref_series in study.get("RTReferencedSeriesSequence", []):
                if str(ref_series.get("SeriesInstanceUID", series.series_uid)) != series.series_uid:
                    raise InputError(f"{what} references series {ref_series.SeriesInstanceUID}, not the CT series "
                                     f"{series.series_uid}; load the series it was drawn on")
                for image in ref_series.get("ContourImageSequence", []):
                    referenced.add(str(image.ReferencedSOPInstanceUID))
    missing = referenced - set(series.sop_instance_uids)
    if missing:
        raise InputError(f"{what} references {len(missing)} image(s) that are not in series {series.series_uid}")


def read_rtstruct(path: str | os.PathLike, series: DicomSeries, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Rasterise the closed planar contours of an RTSTRUCT onto the series grid: ``{ROI name: bool (X, Y, Z)}``.

    Polygons are filled with the even-odd rule per slice (pixel centres inside, plus the pixels the line
    passes through), so holes drawn as inner contours stay empty. Contours off the image are reported
    with a warning and skipped.
    """
    import pydicom
    from matplotlib.path import Path as PolygonPath

    path = Path(path)
    if not path.is_file():
        raise InputError(f"RTSTRUCT not found: {path}")
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(f"{path} is not a readable DICOM file: {exc}") from None
    if str(dataset.get("Modality", "")) != "RTSTRUCT" or "ROIContourSequence" not in dataset:
        raise InputError(f"{path} is not an RT Structure Set (Modality {dataset.get('Modality', '?')})")
    _check_references(dataset, series, f"RTSTRUCT {path.name}")
    roi_names = {int(r.ROINumber): str(r.ROIName) for r in dataset.get("StructureSetROISequence", [])}
    inverse = np.linalg.inv(series.affine_lps)
    shape = series.volume.shape
    masks: dict[str, np.ndarray] = {}
    for roi in dataset.ROIContourSequence:
        name = roi_names.get(int(roi.ReferencedROINumber), f"ROI_{int(roi.ReferencedROINumber)}")
        if names is not None and name not in names:
            continue
        mask = np.zeros(shape, dtype=bool)
        outside = 0
        edges = []
        for contour in roi.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) not in ("CLOSED_PLANAR", "POINT") or \
                    len(contour.ContourData) < 9:
                continue
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            ijk = (inverse @ np.c_[points, np.ones(len(points))].T)[:3].T
            k = int(np.round(np.median(ijk[:, 2])))
            if not 0 <= k < shape[2] or np.ptp(ijk[:, 2]) > 0.5:
                outside += 1
                continue
            lo = np.maximum(np.floor(ijk[:, :2].min(0)).astype(int), 0)
            hi = np.minimum(np.ceil(ijk[:, :2].max(0)).astype(int) + 1, shape[:2])
            if np.any(hi <= lo):
                outside += 1
                continue
            ii, jj = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
            # closed=True makes the last vertex the CLOSEPOLY marker (its coordinates are ignored): repeat the first
            inside = PolygonPath(np.vstack([ijk[:, :2], ijk[:1, :2]]), closed=True).contains_points(np.c_[ii.ravel(), jj.ravel()]).reshape(ii.shape)
            mask[lo[0]:hi[0], lo[1]:hi[1], k] ^= inside  # even-odd: an inner contour cuts a hole
            edges.append((k, ijk[:, :2]))
        for k, polygon in edges:  # pixels the contour line passes through belong to the structure
            _draw_outline(mask[:, :, k], polygon)
        if outside:
            logger.warning("RTSTRUCT %s: %d contour(s) of %s lie outside the CT grid and were skipped", path.name, outside, name)
        masks[name] = mask
    return masks


def _draw_outline(plane: np.ndarray, polygon: np.ndarray) -> None:
    """Set the pixels whose centres the closed polygon passes through (half-pixel sampling).

    Contour tracers (OpenCV, and most planning systems) run the line through the centres of the
    boundary pixels, so a centre-inside test alone would lose the structure's outer ring of pixels.
    """
    closed = np.vstack([polygon, polygon[:1]])
    for start, end in zip(closed[:-1], closed[1:]):
        n = max(int(np.ceil(np.abs(end - start).max() * 2)), 1)
        points = np.rint(start + np.linspace(0.0, 1.0, n + 1)[:, None] * (end - start)).astype(int)
        keep = (points >= 0).all(1) & (points[:, 0] < plane.shape[0]) & (points[:, 1] < plane.shape[1])
        plane[points[keep, 0], points[keep, 1]] = True


def _rgb(name: str, colours: Mapping[str, Sequence[int]] | None) -> list[int]:
    from medvlm.vocabulary import STRUCTURE_COLOURS

    colour = (colours or {}).get(name) or STRUCTURE_COLOURS.get(name) or (255, 255, 0)
    return [int(c) for c in colour]


def _check_masks(masks: Mapping[str, np.ndarray], series: DicomSeries) -> None:
    if not masks:
        raise InputError("no masks to write")
    for name, mask in masks.items():
        if np.asarray(mask).shape != series.volume.shape:
            raise InputError(f"mask {name!r} has shape {np.asarray(mask).shape}, the CT series {series.volume.shape}")


def write_rtstruct(masks: Mapping[str, np.ndarray], series: DicomSeries, path: str | os.PathLike, *,
                   colours: Mapping[str, Sequence[int]] | None = None, description: str = "medvlm contours",
                   skip_empty: bool = True) -> Path:
    """Write masks (bool (X, Y, Z) on the series grid) as an RTSTRUCT that references ``series``; atomic.

    ROI names are kept (medvlm's are TG-263). Polygons come from rt-utils; the patient module carries the
    series' pseudonyms only, so no identifier of the input reaches the file.
    """
    from rt_utils import RTStruct
    from rt_utils import ds_helper

    _check_masks(masks, series)
    # rt-utils builds the RTSTRUCT from slice headers; it is given our de-identified references (volume
    # order = ascending along the normal, as rt-utils sorts) instead of re-reading the folder. rt-utils
    # 1.2.7 scales the row direction by PixelSpacing[0] (the spacing between rows), which misplaces
    # contours when pixels are not square; its copies get the two spacings swapped so that the polygons
    # land right (PixelSpacing is not written into the RTSTRUCT).
    headers = [_swapped_pixel_spacing(r) for r in series.references]
    dataset = ds_helper.create_rtstruct_dataset(headers)
    structure = RTStruct(headers, dataset)
    structure.set_series_description(description)
    written = 0
    for name, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            if skip_empty:
                logger.info("RTSTRUCT: %s is empty; not written", name)
                continue
        structure.add_roi(mask=np.transpose(mask, (1, 0, 2)), color=_rgb(name, colours), name=name)  # rt-utils: (rows, cols, slices)
        written += 1
    if not written:
        raise InputError("every mask is empty; nothing to write as RTSTRUCT")
    now = datetime.datetime.now()
    dataset.StructureSetLabel = "medvlm"
    dataset.StructureSetDate, dataset.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    dataset.SeriesDate, dataset.SeriesTime = dataset.StructureSetDate, dataset.StructureSetTime
    dataset.InstanceCreationDate, dataset.InstanceCreationTime = dataset.StructureSetDate, dataset.StructureSetTime
    dataset.Manufacturer = "medvlm"
    dataset.PatientIdentityRemoved = "YES"
    path = Path(path)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def _swapped_pixel_spacing(reference):
    copy = reference.copy()
    copy.PixelSpacing = [float(reference.PixelSpacing[1]), float(reference.PixelSpacing[0])]
    return copy


# ---------------------------------------------------------------------------------------- DICOM-SEG

def write_seg(masks: Mapping[str, np.ndarray], series: DicomSeries, path: str | os.PathLike, *,
              description: str = "medvlm contours") -> Path:
    """Write masks as a binary DICOM-SEG (highdicom) referencing ``series``; atomic."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    _check_masks(masks, series)
    names = [n for n, m in masks.items() if np.asarray(m).any()]
    if not names:
        raise InputError("every mask is empty; nothing to write as DICOM-SEG")
    descriptions = []
    for number, name in enumerate(names, start=1):
        category, kind = (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm) if name.startswith(("GTV", "CTV")) \
            else (codes.SCT.Organ, codes.SCT.Organ)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(name="medvlm", version="1", family=codes.DCM.ArtificialIntelligence)))
    # highdicom wants (frames, rows, columns, segments) in the order of source_images
    stacked = np.stack([np.transpose(np.asarray(masks[n], dtype=bool), (2, 1, 0)) for n in names], axis=-1)
    sources = [_with_pixels(r) for r in series.references]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=stacked.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="medvlm", manufacturer_model_name="medvlm", software_versions="medvlm",
        device_serial_number="0", series_description=description[:64], omit_empty_frames=True)
    seg.PatientIdentityRemoved = "YES"
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path


def _with_pixels(reference):
    """highdicom checks source images for image attributes; give the reference header the ones it reads."""
    copy = reference.copy()
    copy.SamplesPerPixel, copy.PhotometricInterpretation = 1, "MONOCHROME2"
    copy.BitsAllocated, copy.BitsStored, copy.HighBit, copy.PixelRepresentation = 16, 16, 15, 1
    return copy


def read_seg(path: str | os.PathLike, series: DicomSeries) -> dict[str, np.ndarray]:
    """Decode a DICOM-SEG onto the series grid: ``{segment label: bool (X, Y, Z)}``.

    When several segments share a label, the key is ``"label (description)"``, or ``"label #number"``.
    """
    import highdicom as hd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"DICOM-SEG not found: {path}")
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise InputError(f"{path} is not a readable DICOM-SEG: {exc}") from None
    referenced = {str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", [])}
    if referenced and series.series_uid not in referenced:
        raise InputError(f"DICOM-SEG {path.name} references series {', '.join(referenced)}, not {series.series_uid}")
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    descriptions = [str(s.get("SegmentDescription", "")) for s in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.sop_instance_uids, segment_numbers=numbers,
                                               ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    out = {}
    for index, (number, label, text) in enumerate(zip(numbers, labels, descriptions)):
        key = label
        if labels.count(label) > 1:
            key = f"{label} ({text})" if text and descriptions.count(text) == 1 else f"{label} #{number}"
        out[key] = np.transpose(pixels[..., index] > 0, (2, 1, 0))  # (slices, rows, cols) -> (x, y, z)
    return out


# ------------------------------------------------------------------------------------- CT series out

def write_dicom_series(volume: np.ndarray, affine: np.ndarray, folder: str | os.PathLike, *, patient_id: str = "ANON",
                       series_description: str = "medvlm CT", study_uid: str | None = None) -> DicomSeries:
    """Write a (X, Y, Z) HU volume with its RAS affine as a CT series (one file per slice, int16 pixels).

    For phantom or generated CTs going into DICOM tools; the folder is staged and renamed into place.
    Returns the series as :func:`read_dicom_series` reads it back.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"expected a 3D volume, got shape {volume.shape}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"{folder} is not empty; choose a new folder for the series")
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), generate_uid(), generate_uid()
    pixels = np.clip(np.round(volume), -32768, 32767).astype(np.int16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for k in range(volume.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.PatientName, ds.PatientID = "CT", patient_id, patient_id
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.StudyDate = ds.StudyTime = ds.StudyID = ds.AccessionNumber = ds.ReferringPhysicianName = ""
            ds.PatientBirthDate = ds.PatientSex = ""
            ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 1, k + 1, series_description
            ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
            ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]]
            ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (between rows, between columns)
            ds.SliceThickness = float(spacing[2])
            ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
            ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
            pydicom.dcmwrite(staging / f"CT_{k + 1:04d}.dcm", ds, enforce_file_format=True)
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    finally:
        if staging.exists():
            import shutil

            shutil.rmtree(staging)
    return read_dicom_series(folder)
