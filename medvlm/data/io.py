"""Image I/O: NIfTI volumes and multi-label masks that keep affine and spacing, written atomically.

Every write goes to a temporary file in the destination folder and is renamed into place, so a crash
never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np

from medvlm.errors import InputError

LABEL_NAMES_EXTENSION_KEY = "medvlm_label_names"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes); rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


OUTPUT_MANIFEST = ".medvlm-output.json"  # in an output folder: which command wrote it, and a digest of its inputs


def _plain(value):
    """A command input as JSON: paths that exist resolved (``out/`` and ``./out`` are the same), the rest as is."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, os.PathLike) or (isinstance(value, str) and len(value) < 4096 and os.path.exists(value)):
        return str(Path(value).resolve())
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def claim_output_folder(folder: str | os.PathLike, command: str, inputs: dict, *, overwrite: bool = False) -> Path:
    """Make ``folder`` this command's output folder, or refuse before anything is written.

    A missing or empty folder, or one holding this command's earlier output of the same ``inputs`` (a rerun), is
    claimed: created, and marked with :data:`OUTPUT_MANIFEST` (the command and a sha256 of its inputs, never the
    inputs themselves, which may hold a report's text). A folder holding anything else (another run's output, files
    medvlm did not write) is refused with an :class:`InputError` unless ``overwrite``; a path that is a file always.
    """
    import hashlib

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file, not a folder")
    digest = hashlib.sha256(json.dumps(_plain(inputs), sort_keys=True).encode("utf-8")).hexdigest()
    identity = {"command": command, "inputs_sha256": digest}
    manifest = folder / OUTPUT_MANIFEST
    held = sorted(p.name for p in folder.iterdir() if p.name != OUTPUT_MANIFEST) if folder.is_dir() else []
    if held and not overwrite:
        try:
            previous = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != identity:
            what = (f"the output of `{previous.get('command')}` with other inputs" if isinstance(previous, dict)
                    else f"{len(held)} file(s) medvlm did not write ({held[0]}, ...)")
            raise InputError(f"--out {folder} already holds {what}; choose another folder or pass --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, json.dumps(identity, indent=1) + "\n")
    return folder


# voxels of one input volume: 2^29 (2 GiB as float32, e.g. 1024 x 1024 x 512); a whole-body thin-slice CT of
# 512 x 512 x 2000 fits, a header or array larger than that is refused before it is read
MAX_INPUT_VOXELS = 2 ** 29


def check_voxel_count(shape: Sequence[int], name: str, limit: int | None = None, hint: str = "") -> None:
    """A clear error for a volume of more than ``limit`` (default :data:`MAX_INPUT_VOXELS`) voxels, before
    anything of that size is allocated."""
    limit = MAX_INPUT_VOXELS if limit is None else limit
    count = int(np.prod([int(s) for s in shape], dtype=np.float64))
    if count > limit:
        raise InputError(f"{name}: {' x '.join(str(int(s)) for s in shape)} = {count:,} voxels is more than the "
                         f"{limit:,} medvlm processes{'; ' + hint if hint else ''}")


def validate_volume(array: np.ndarray, *, name: str = "ct", allow_channel: bool = False) -> np.ndarray:
    """Check that ``array`` is a finite 3D volume (or 1 x 3D with ``allow_channel``) of at most
    :data:`MAX_INPUT_VOXELS` voxels; return it as 3D."""
    array = np.asarray(array)
    if allow_channel and array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3D volume, got an array of shape {tuple(array.shape)} ({array.ndim}D)")
    if min(array.shape) < 2:
        raise InputError(f"{name}: volume of shape {tuple(array.shape)} is only one voxel thick along an axis")
    check_voxel_count(array.shape, name)
    if array.dtype == bool or np.issubdtype(array.dtype, np.complexfloating) or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{name}: expected real-valued voxels in Hounsfield units, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise InputError(f"{name}: {int(bad.sum())} voxel(s) are NaN or infinite; clean the volume before use")
    return array


# voxel sizes a CT can have: below 0.1 mm or above 20 mm the numbers are not millimetres (or not a CT)
SPACING_RANGE_MM = (0.1, 20.0)


def check_spacing(spacing: Sequence[float], what: str) -> None:
    """A clear error for voxel sizes outside :data:`SPACING_RANGE_MM` (resampling them would produce
    empty masks or allocate terabytes)."""
    low, high = SPACING_RANGE_MM
    if not all(np.isfinite(v) and low <= float(v) <= high for v in spacing):
        raise InputError(f"{what}: voxel size {tuple(round(float(v), 4) for v in spacing)} mm is outside "
                         f"{low:g}-{high:g} mm; check the spacing or affine (metres or voxels instead of millimetres?)")


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in millimetres along the three array axes."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def _load_image(path: str | os.PathLike, what: str) -> nib.Nifti1Image:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; expected a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.load(str(path))
        image.get_fdata  # noqa: B018 - touch the proxy type
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputError(f"{what} {path} is not a readable NIfTI file: {exc}") from None
    return image


def load_nifti(path: str | os.PathLike, *, what: str = "CT image") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume as float32 with its 4x4 affine; bad files raise :class:`InputError`."""
    image = _load_image(path, what)
    check_voxel_count(image.shape[:3], f"{what} {path}")  # from the header, before the data are read
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated gzip streams fail only when the data are read
        raise InputError(f"{what} {path} is corrupted or truncated: {exc}") from None
    data = validate_volume(data if data.ndim != 4 or data.shape[-1] != 1 else data[..., 0], name=f"{what} {path}")
    return data, np.asarray(image.affine, dtype=np.float64)


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *, dtype=np.int16,
               description: str = "") -> Path:
    """Write a volume with its affine (sform and qform, scanner coordinates, mm) atomically."""
    array = np.asarray(array)
    if dtype is not None:
        array = np.round(array).astype(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else array.astype(dtype)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_slope_inter(1.0, 0.0)
    if description:
        image.header["descrip"] = description[:79].encode("ascii", "replace")
    with atomic_path(Path(path)) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


def save_labels(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray, names: Sequence[str]) -> Path:
    """Write multi-label masks ``(C, X, Y, Z)`` as a 4D uint8 NIfTI ``(X, Y, Z, C)`` with names in a header
    extension (JSON), since overlapping structures (CTVn contains GTVn) cannot share one label map."""
    labels = np.asarray(labels)
    if labels.ndim != 4 or labels.shape[0] != len(names):
        raise InputError(f"labels must have shape (C, X, Y, Z) with C={len(names)} names, got {labels.shape}")
    image = nib.Nifti1Image(np.moveaxis(labels.astype(np.uint8), 0, -1), np.asarray(affine, dtype=np.float64))
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_intent("vector")  # the 4th axis holds structures, not time
    content = json.dumps({LABEL_NAMES_EXTENSION_KEY: list(names)}).encode("utf-8")
    image.header.extensions.append(nib.nifti1.Nifti1Extension(6, content))  # 6 = NIFTI_ECODE_COMMENT
    image.header["descrip"] = ",".join(names)[:79].encode("ascii", "replace")
    with atomic_path(Path(path)) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


def label_names_from_header(image: nib.Nifti1Image) -> list[str] | None:
    for extension in image.header.extensions:
        try:
            raw = extension.get_content() if hasattr(extension, "get_content") else extension.content
            payload = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
        except (ValueError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(payload, dict) and LABEL_NAMES_EXTENSION_KEY in payload:
            return [str(n) for n in payload[LABEL_NAMES_EXTENSION_KEY]]
    return None


def load_labels(path: str | os.PathLike, names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read multi-label masks as ``(C, X, Y, Z)`` uint8, the affine and the structure names.

    Names come from the file's header extension, else from ``names``; a 3D file holds one structure.
    """
    image = _load_image(path, "label file")
    try:
        data = np.asarray(image.dataobj)
    except Exception as exc:
        raise InputError(f"label file {path} is corrupted or truncated: {exc}") from None
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise InputError(f"label file {path}: expected 3D or 4D (X, Y, Z, C) masks, got shape {data.shape}")
    stored = label_names_from_header(image)
    found = stored or (list(names) if names is not None else [f"label_{c}" for c in range(data.shape[-1])])
    if len(found) != data.shape[-1]:
        raise InputError(f"label file {path}: {data.shape[-1]} channel(s) but {len(found)} structure names {found}")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise InputError(f"label file {path}: contains NaN or infinite values")
    return np.moveaxis((data > 0.5).astype(np.uint8), -1, 0), np.asarray(image.affine, dtype=np.float64), found
