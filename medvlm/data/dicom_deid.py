"""De-identification of DICOM headers: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

Actions per attribute (Table E.1-1, basic profile column): ``D`` replace with a dummy value, ``Z`` make
empty (or a consistent pseudonym for patient name/ID), ``X`` remove, ``U`` replace UID consistently.
Where the table allows several actions (e.g. X/Z), the stricter one compliant with the attribute's
type is used. In addition every non-standard UID is remapped (deterministically from a secret, so all
files of a study map to the same new UIDs), private tags are removed, and PatientIdentityRemoved,
DeidentificationMethod and DeidentificationMethodCodeSequence (DCM 113100) are set.

Written here because pydicom ships no profile table and the maintained alternatives (``deid``,
``dicognito``) either need recipe files or make choices (e.g. random names) that break reproducibility.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from medvlm.errors import InputError

logger = logging.getLogger(__name__)

METHOD = "DICOM PS3.15 Annex E Basic Profile (medvlm)"  # LO: at most 64 characters

# (group, element): action. Basic profile column of PS3.15 Table E.1-1 (subset covering the attributes
# that occur in CT, RTSTRUCT, RTPLAN, RTDOSE and SEG objects, plus common free-text ones).
BASIC_PROFILE: dict[tuple[int, int], str] = {
    (0x0008, 0x0014): "U", (0x0008, 0x0015): "X", (0x0008, 0x0018): "U", (0x0008, 0x0020): "Z",
    (0x0008, 0x0021): "X", (0x0008, 0x0022): "X", (0x0008, 0x0023): "Z", (0x0008, 0x0024): "X",
    (0x0008, 0x0025): "X", (0x0008, 0x002A): "X", (0x0008, 0x0030): "Z", (0x0008, 0x0031): "X",
    (0x0008, 0x0032): "X", (0x0008, 0x0033): "Z", (0x0008, 0x0034): "X", (0x0008, 0x0035): "X",
    (0x0008, 0x0050): "Z", (0x0008, 0x0058): "U", (0x0008, 0x0080): "X", (0x0008, 0x0081): "X",
    (0x0008, 0x0082): "X", (0x0008, 0x0090): "Z", (0x0008, 0x0092): "X", (0x0008, 0x0094): "X",
    (0x0008, 0x0096): "X", (0x0008, 0x009C): "Z", (0x0008, 0x009D): "X", (0x0008, 0x0201): "X",
    (0x0008, 0x1010): "X", (0x0008, 0x1030): "X", (0x0008, 0x103E): "X", (0x0008, 0x1040): "X",
    (0x0008, 0x1041): "X", (0x0008, 0x1048): "X", (0x0008, 0x1049): "X", (0x0008, 0x1050): "X",
    (0x0008, 0x1052): "X", (0x0008, 0x1060): "X", (0x0008, 0x1062): "X", (0x0008, 0x1070): "X",
    (0x0008, 0x1072): "X", (0x0008, 0x1080): "X", (0x0008, 0x1084): "X", (0x0008, 0x1110): "X",
    (0x0008, 0x1111): "X", (0x0008, 0x1120): "X", (0x0008, 0x1155): "U", (0x0008, 0x1195): "U",
    (0x0008, 0x2111): "X", (0x0008, 0x4000): "X",
    (0x0010, 0x0010): "Z", (0x0010, 0x0020): "Z", (0x0010, 0x0021): "X", (0x0010, 0x0030): "Z",
    (0x0010, 0x0032): "X", (0x0010, 0x0040): "Z", (0x0010, 0x0050): "X", (0x0010, 0x0101): "X",
    (0x0010, 0x0102): "X", (0x0010, 0x1000): "X", (0x0010, 0x1001): "X", (0x0010, 0x1002): "X",
    (0x0010, 0x1005): "X", (0x0010, 0x1010): "X", (0x0010, 0x1020): "X", (0x0010, 0x1030): "X",
    (0x0010, 0x1040): "X", (0x0010, 0x1050): "X", (0x0010, 0x1060): "X", (0x0010, 0x1080): "X",
    (0x0010, 0x1081): "X", (0x0010, 0x1090): "X", (0x0010, 0x1100): "X", (0x0010, 0x2000): "X",
    (0x0010, 0x2110): "X", (0x0010, 0x2150): "X", (0x0010, 0x2152): "X", (0x0010, 0x2154): "X",
    (0x0010, 0x2155): "X", (0x0010, 0x2160): "X", (0x0010, 0x2180): "X", (0x0010, 0x21A0): "X",
    (0x0010, 0x21B0): "X", (0x0010, 0x21C0): "X", (0x0010, 0x21D0): "X", (0x0010, 0x21F0): "X",
    (0x0010, 0x2203): "X", (0x0010, 0x2297): "X", (0x0010, 0x2299): "X", (0x0010, 0x4000): "X",
    (0x0018, 0x1000): "X", (0x0018, 0x1002): "U", (0x0018, 0x1004): "X", (0x0018, 0x1005): "X",
    (0x0018, 0x1007): "X", (0x0018, 0x1008): "X", (0x0018, 0x1030): "X", (0x0018, 0x1200): "X",
    (0x0018, 0x1201): "X", (0x0018, 0x1400): "X", (0x0018, 0x4000): "X", (0x0018, 0x700A): "X",
    (0x0018, 0x9424): "X", (0x0018, 0xA003): "X",
    (0x0020, 0x000D): "U", (0x0020, 0x000E): "U", (0x0020, 0x0010): "Z", (0x0020, 0x0052): "U",
    (0x0020, 0x0200): "U", (0x0020, 0x3401): "X", (0x0020, 0x3406): "X", (0x0020, 0x4000): "X",
    (0x0020, 0x9158): "X", (0x0020, 0x9161): "U", (0x0020, 0x9164): "U",
    (0x0028, 0x4000): "X", (0x0032, 0x0012): "X", (0x0032, 0x1020): "X", (0x0032, 0x1021): "X",
    (0x0032, 0x1030): "X", (0x0032, 0x1032): "X", (0x0032, 0x1033): "X", (0x0032, 0x1060): "X",
    (0x0032, 0x1070): "X", (0x0032, 0x4000): "X",
    (0x0038, 0x0004): "X", (0x0038, 0x0010): "X", (0x0038, 0x0011): "X", (0x0038, 0x001E): "X",
    (0x0038, 0x0020): "X", (0x0038, 0x0021): "X", (0x0038, 0x0040): "X", (0x0038, 0x0050): "X",
    (0x0038, 0x0060): "X", (0x0038, 0x0061): "X", (0x0038, 0x0062): "X", (0x0038, 0x0300): "X",
    (0x0038, 0x0400): "X", (0x0038, 0x0500): "X", (0x0038, 0x4000): "X",
    (0x0040, 0x0001): "X", (0x0040, 0x0002): "X", (0x0040, 0x0003): "X", (0x0040, 0x0004): "X",
    (0x0040, 0x0005): "X", (0x0040, 0x0006): "X", (0x0040, 0x0007): "X", (0x0040, 0x000B): "X",
    (0x0040, 0x0010): "X", (0x0040, 0x0011): "X", (0x0040, 0x0241): "X", (0x0040, 0x0242): "X",
    (0x0040, 0x0243): "X", (0x0040, 0x0244): "X", (0x0040, 0x0245): "X", (0x0040, 0x0250): "X",
    (0x0040, 0x0251): "X", (0x0040, 0x0253): "X", (0x0040, 0x0254): "X", (0x0040, 0x0275): "X",
    (0x0040, 0x0280): "X", (0x0040, 0x0555): "X", (0x0040, 0x1001): "X", (0x0040, 0x1004): "X",
    (0x0040, 0x1005): "X", (0x0040, 0x1010): "X", (0x0040, 0x1011): "X", (0x0040, 0x1101): "X",
    (0x0040, 0x1102): "X", (0x0040, 0x1103): "X", (0x0040, 0x1400): "X", (0x0040, 0x2001): "X",
    (0x0040, 0x2008): "X", (0x0040, 0x2009): "X", (0x0040, 0x2010): "X", (0x0040, 0x2016): "Z",
    (0x0040, 0x2017): "Z", (0x0040, 0x2400): "X", (0x0040, 0x3001): "X", (0x0040, 0x4023): "U",
    (0x0040, 0xA027): "X", (0x0040, 0xA073): "X", (0x0040, 0xA075): "X", (0x0040, 0xA078): "X",
    (0x0040, 0xA07A): "X", (0x0040, 0xA07C): "X", (0x0040, 0xA124): "U", (0x0040, 0xA171): "U",
    (0x0040, 0xA172): "U", (0x0040, 0xA192): "X", (0x0040, 0xA193): "X", (0x0040, 0xA307): "X",
    (0x0040, 0xA352): "X", (0x0040, 0xA353): "X", (0x0040, 0xA354): "X", (0x0040, 0xA358): "X",
    (0x0040, 0xA402): "U", (0x0040, 0xA730): "X", (0x0040, 0xDB0C): "U", (0x0040, 0xDB0D): "U",
    (0x0070, 0x0084): "Z", (0x0070, 0x0086): "X", (0x0088, 0x0140): "U", (0x0088, 0x0200): "X",
    (0x0088, 0x0904): "X", (0x0088, 0x0906): "X", (0x0088, 0x0910): "X", (0x0088, 0x0912): "X",
    (0x3006, 0x0002): "D", (0x3006, 0x0004): "X", (0x3006, 0x0006): "X", (0x3006, 0x0008): "Z",
    (0x3006, 0x0009): "Z", (0x3006, 0x0024): "U", (0x3006, 0x0028): "X", (0x3006, 0x0038): "X",
    (0x3006, 0x0085): "X", (0x3006, 0x0088): "X", (0x3006, 0x00A6): "Z", (0x3006, 0x00C2): "U",
    (0x300A, 0x0002): "D", (0x300A, 0x0003): "X", (0x300A, 0x0004): "X", (0x300A, 0x0006): "X",
    (0x300A, 0x0007): "X", (0x300A, 0x000E): "X", (0x300A, 0x0013): "U", (0x300A, 0x0016): "X",
    (0x300A, 0x0072): "X", (0x300A, 0x00B2): "X", (0x300C, 0x0113): "X", (0x300E, 0x0004): "Z",
    (0x300E, 0x0005): "Z", (0x300E, 0x0008): "X", (0x4000, 0x0010): "X", (0x4000, 0x4000): "X",
    (0x4008, 0x0042): "X", (0x4008, 0x0100): "X", (0x4008, 0x0102): "X", (0x4008, 0x010A): "X",
    (0x4008, 0x010B): "X", (0x4008, 0x010C): "X", (0x4008, 0x0111): "X", (0x4008, 0x0114): "X",
    (0x4008, 0x0115): "X", (0x4008, 0x0118): "X", (0x4008, 0x0119): "X", (0x4008, 0x011A): "X",
    (0x4008, 0x0202): "X", (0x4008, 0x0300): "X", (0x4008, 0x4000): "X",
    (0xFFFA, 0xFFFA): "X", (0xFFFC, 0xFFFC): "X",
}
_PSEUDONYM_TAGS = {(0x0010, 0x0010), (0x0010, 0x0020)}  # Z, but a consistent pseudonym keeps cases apart


@dataclass
class DicomDeidReport:
    """What one run did: files written, files skipped (not DICOM) and action counts."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    actions: dict[str, int] = field(default_factory=dict)


class DicomDeidentifier:
    """Apply the basic profile to pydicom datasets. ``secret`` keys UID remapping and pseudonyms."""

    def __init__(self, secret: str = "medvlm", *, pseudonym_prefix: str = "ANON"):
        self.secret = secret.encode("utf-8")
        self.prefix = pseudonym_prefix
        self.actions: dict[str, int] = {}

    def _digest(self, *parts: str) -> str:
        return hmac.new(self.secret, "\x1f".join(parts).encode("utf-8"), hashlib.sha256).hexdigest()

    def new_uid(self, uid: str) -> str:
        """Deterministic replacement UID (2.25 form): the same input UID always maps to the same output."""
        return f"2.25.{int(self._digest('uid', str(uid))[:30], 16)}"

    def pseudonym(self, value: str) -> str:
        return f"{self.prefix}-{self._digest('patient', str(value))[:10].upper()}"

    def _count(self, action: str) -> None:
        self.actions[action] = self.actions.get(action, 0) + 1

    def _is_standard_uid(self, value: str) -> bool:
        from pydicom.uid import UID_dictionary

        return str(value) in UID_dictionary

    def _walk(self, dataset, patient_value: str) -> None:
        from pydicom.multival import MultiValue

        for element in list(dataset):
            key = (element.tag.group, element.tag.element)
            action = BASIC_PROFILE.get(key)
            if element.VR == "SQ" and action != "X":
                for item in element.value:
                    self._walk(item, patient_value)
                continue
            if action == "X":
                del dataset[element.tag]
                self._count("X")
            elif action == "Z":
                element.value = self.pseudonym(patient_value) if key in _PSEUDONYM_TAGS else ""
                self._count("Z")
            elif action == "D":
                element.value = "DEIDENTIFIED" if element.VR in ("LO", "SH", "LT", "ST", "UT", "PN", "CS") else ""
                self._count("D")
            elif element.VR == "UI" and element.value:
                values = element.value if isinstance(element.value, (list, MultiValue)) else [element.value]
                mapped = [v if self._is_standard_uid(v) else self.new_uid(v) for v in values]
                element.value = mapped if len(mapped) > 1 else mapped[0]
                self._count("U")

    def deidentify_dataset(self, dataset) -> None:
        """Apply the profile in place (file meta included)."""
        from pydicom.dataset import Dataset

        patient_value = str(dataset.get("PatientID", "")) or str(dataset.get("PatientName", "")) or "unknown"
        dataset.remove_private_tags()
        self._walk(dataset, patient_value)
        dataset.PatientIdentityRemoved = "YES"
        dataset.DeidentificationMethod = METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113100", "DCM", "Basic Application Confidentiality Profile"
        dataset.DeidentificationMethodCodeSequence = [code]
        meta = getattr(dataset, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in dataset:
            meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID


def read_dicom(path: Path):
    """Read a DICOM file, also one without the 128-byte preamble; ``None`` when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except (EOFError, OSError, ValueError, KeyError, TypeError):
        return None
    try:  # raw datasets without preamble (older RT exports) are valid DICOM too
        dataset = pydicom.dcmread(path, force=True)
        return dataset if "SOPClassUID" in dataset or "SOPInstanceUID" in dataset else None
    except Exception:  # force=True parses arbitrary bytes: any failure means "not DICOM"
        return None


def _ensure_file_meta(dataset) -> None:
    """Give a dataset read without file meta (no preamble) a valid one, so it is written as a Part 10 file."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian

    meta = getattr(dataset, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dataset.file_meta = meta


def _dicom_files(folder: Path) -> Iterable[Path]:
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            yield Path(root) / name


def deidentify_dicom_folder(source: str | os.PathLike, target: str | os.PathLike, *, secret: str = "medvlm",
                            overwrite: bool = False) -> DicomDeidReport:
    """De-identify every DICOM file under ``source`` into ``target`` (never in place).

    Output files are named by their new UIDs (``<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``) because
    input paths often carry names or dates. Non-DICOM files are skipped and listed in the report.
    """
    from medvlm.data.io import atomic_path

    source, target = Path(source).resolve(), Path(target).resolve()
    if not source.is_dir():
        raise InputError(f"DICOM folder not found: {source}")
    if target == source or source in target.parents or target in source.parents:
        raise InputError(f"output folder {target} must be outside the input folder {source} (inputs are never overwritten)")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise InputError(f"output folder {target} is not empty; choose another or pass --overwrite")
    deid = DicomDeidentifier(secret)
    report = DicomDeidReport()
    for path in _dicom_files(source):
        dataset = read_dicom(path)
        if dataset is None:
            report.skipped.append((path, "not a readable DICOM file"))
            continue
        deid.deidentify_dataset(dataset)
        out = target / str(dataset.get("StudyInstanceUID", "study")) / str(dataset.get("SeriesInstanceUID", "series")) / \
            f"{dataset.get('SOPInstanceUID', deid.new_uid(str(path)))}.dcm"
        _ensure_file_meta(dataset)
        with atomic_path(out) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
        report.written.append(out)
    if not report.written and report.skipped:
        raise InputError(f"no DICOM files in {source} ({len(report.skipped)} other file(s) skipped)")
    report.actions = dict(deid.actions)
    logger.info("de-identified %d DICOM file(s); skipped %d", len(report.written), len(report.skipped))
    return report


def deidentify_dicom_file(path: str | os.PathLike, secret: str = "medvlm"):
    """Read one file and return its de-identified dataset; a non-DICOM file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"DICOM file not found: {path}")
    dataset = read_dicom(path)
    if dataset is None:
        raise InputError(f"{path} is not a DICOM file")
    DicomDeidentifier(secret).deidentify_dataset(dataset)
    return dataset
