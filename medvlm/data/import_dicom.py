"""DICOM-RT cohorts in: CT series + RTSTRUCTs -> a medvlm dataset (NIfTI images and masks, reports, datalist).

``medvlm data import-dicom SRC --out DATA [--reports DIR] [--records CSV] [--synonyms FILE]``: every CT series
under SRC with the RTSTRUCT(s) drawn on it becomes one case: the CT in HU (``images/``), the structures mapped to
this project's TG-263 names and rasterised on the CT grid (``labels/``, one channel per structure of
:data:`~medvlm.vocabulary.STRUCTURE_NAMES`), the patient's report, de-identified (``reports/``), and the patient's
row of a clinical records CSV as the item's ``record`` (fields of the records table; identifiers dropped).
Cases are named by keyed pseudonyms of the PatientID (the ``medvlm deid dicom`` pseudonyms), never by an
identifier; the DICOM headers are de-identified on reading (:func:`~medvlm.data.dicom.read_dicom_series`).

A bad item (a series that cannot be read, an RTSTRUCT drawn on another series, an empty contour, a report
that cannot be read) is one line naming the pseudonymised patient, the file and the problem; the import
goes on with the other cases. Names that map to no structure are listed per case, not dropped silently.
Everything is written to a staging folder and moved into place at the end, the datalist last.

Written here because no library maps planning-system ROI names to TG-263 or assembles a cohort: pydicom reads
the files, :mod:`medvlm.data.dicom` turns series and RTSTRUCTs into arrays.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from medvlm.errors import InputError
from medvlm.vocabulary import COLUMN_VOCABULARY, CSV_COLUMNS, STRUCTURE_NAMES

logger = logging.getLogger(__name__)

# Planning-system names of each structure (compared after normalising case, spaces, '-', '_' and '.').
# Several ROIs mapping to one structure (CTV_Neck_L and CTV_Neck_R) are merged into one mask.
DEFAULT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "GTVp": ("GTVp", "GTV_p", "GTV-P", "GTV_T", "GTV-T", "GTVt", "GTV_primary", "GTV primary", "GTV_prim", "GTV_Tumor",
             "GTV_Tumour", "GTV"),
    "GTVn": ("GTVn", "GTV_n", "GTV-N", "GTV_N", "GTV_node", "GTV_nodes", "GTV nodal", "GTV_LN", "GTVln", "GTV_Nodes_L",
             "GTV_Nodes_R", "GTVn_L", "GTVn_R"),
    "CTVn": ("CTVn", "CTV_n", "CTV-N", "CTV_N", "CTV_neck", "CTV neck", "CTV_Neck_L", "CTV_Neck_R", "CTVn_L", "CTVn_R",
             "CTV_elective", "CTV_elective_neck", "CTV_LN", "CTV_LN_L", "CTV_LN_R", "CTV_nodal"),
    "SpinalCord": ("SpinalCord", "Spinal_Cord", "Spinal Cord", "Cord", "SpinalCanal", "Spinal_Canal"),
    "Brainstem": ("Brainstem", "Brain_Stem", "Brain Stem", "BrainStem"),
    "Parotid_L": ("Parotid_L", "Parotid L", "L_Parotid", "Lt_Parotid", "Left_Parotid", "Left Parotid", "Parotid_Lt",
                  "Parotid_Left", "ParotidL", "Glnd_Parotid_L"),
    "Parotid_R": ("Parotid_R", "Parotid R", "R_Parotid", "Rt_Parotid", "Right_Parotid", "Right Parotid", "Parotid_Rt",
                  "Parotid_Right", "ParotidR", "Glnd_Parotid_R"),
    "Bone_Mandible": ("Bone_Mandible", "Mandible", "Mandibula", "Bone Mandible"),
    "Larynx": ("Larynx", "Larynx_Glottic", "Larynx_SG", "Glottis", "Larynx_Supraglottic"),
}


def normalise_name(name: str) -> str:
    """``"GTV-primary "`` -> ``"gtv primary"``: lower case, separators as single spaces."""
    return re.sub(r"[\s_\-.]+", " ", str(name)).strip().lower()


def load_synonyms(path: str | os.PathLike | None = None) -> dict[str, tuple[str, ...]]:
    """:data:`DEFAULT_SYNONYMS` extended by a JSON or YAML file ``{TG-263 name: [names...]}``."""
    table = {k: tuple(v) for k, v in DEFAULT_SYNONYMS.items()}
    if path is None:
        return table
    path = Path(path)
    if not path.is_file():
        raise InputError(f"synonym table not found: {path}")
    import yaml

    try:
        extra = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a JSON/YAML synonym table: {exc}") from None
    if not isinstance(extra, dict) or not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in extra.values()):
        raise InputError(f"{path}: expected a mapping {{structure: [names, ...]}}")
    unknown = sorted(set(extra) - set(STRUCTURE_NAMES))
    if unknown:
        raise InputError(f"{path}: unknown structure(s) {unknown}; medvlm's structures are {list(STRUCTURE_NAMES)}")
    for name, names in extra.items():
        table[name] = tuple(dict.fromkeys((*names, *table[name])))  # the file's names first
    return table


def structure_of(roi_name: str, synonyms: Mapping[str, Sequence[str]]) -> str | None:
    """The TG-263 structure an ROI name maps to, or None."""
    wanted = normalise_name(roi_name)
    for structure, names in synonyms.items():
        if wanted in {normalise_name(n) for n in names}:
            return structure
    return None


# Columns of a records CSV that name the patient, tried in this order (``--records-id-column`` names another).
RECORD_ID_COLUMNS = ("PatientID", "Patient ID", "patient_id", "MRN", "Unit No")
# Record fields a records CSV may give (the records table's columns but its row number and identifier);
# free-text fields are de-identified on the way in.
RECORD_FIELDS = tuple(c for c in CSV_COLUMNS if c not in ("Number", "Unit No"))
FREE_TEXT_FIELDS = ("Remark", "Pathology", "Chemotherapy")


def read_cohort_records(path: str | os.PathLike, id_column: str | None = None) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``({PatientID: {field: value}}, problems)`` from a clinical records CSV joined to a cohort by patient.

    Column names are matched case-insensitively to the records table's fields (``Subsite``, ``icT``, ``icN``,
    ``icM``, ``Laterality``, ``HPV``, ``Elective neck``, ...); values to its vocabulary (``Left`` -> ``left``). An
    unknown column, a value outside the vocabulary or a repeated patient is a problem line (with the CSV's row
    number, never the patient's identifier) and that field or row is left out; empty cells are unknown fields.
    """
    import csv
    import io

    path = Path(path)
    if not path.is_file():
        raise InputError(f"records CSV not found: {path}")
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))
        header = list(reader.fieldnames or [])
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable UTF-8 CSV ({type(exc).__name__})") from None
    candidates = (id_column,) if id_column else RECORD_ID_COLUMNS
    id_name = next((c for c in candidates if c in header), None)
    if id_name is None:
        raise InputError(f"{path}: no patient column ({' or '.join(candidates)}) among the columns {header}; name it "
                         "with --records-id-column")
    by_lower = {name.lower(): name for name in RECORD_FIELDS}
    columns = {column: by_lower.get(column.strip().lower()) for column in header if column != id_name}
    problems = []
    unknown = [c for c, name in columns.items() if name is None and c.strip().lower() not in ("number", "unit no")]
    if unknown:
        problems.append(f"records CSV: column(s) {unknown} are not record fields (known: {list(RECORD_FIELDS)}); left out")
    records: dict[str, dict[str, str]] = {}
    for row_number, row in enumerate(rows, start=2):  # row 1 is the header, as a spreadsheet shows it
        patient = (row.get(id_name) or "").strip()
        if not patient:
            problems.append(f"records CSV, row {row_number}: no patient identifier; row left out")
            continue
        if patient in records:
            problems.append(f"records CSV, row {row_number}: a second row of the same patient; left out")
            continue
        record: dict[str, str] = {}
        for column, name in columns.items():
            value = (row.get(column) or "").strip()
            if name is None or not value:
                continue
            allowed = COLUMN_VOCABULARY.get(name)
            if allowed is not None:
                match = next((a for a in allowed if a and a.lower() == value.lower()), None)
                if match is None:
                    problems.append(f"records CSV, row {row_number}, field {name!r}: {value!r} is not one of "
                                    f"{[a for a in allowed if a]}; left out")
                    continue
                value = match
            record[name] = value
        records[patient] = record
    return records, problems


@dataclass
class ImportSummary:
    """What an import wrote and what it skipped (every line names a pseudonymised patient or a file)."""

    cases: int = 0
    problems: list[str] = field(default_factory=list)
    unmapped: dict[str, list[str]] = field(default_factory=dict)  # case -> ROI names mapped to no structure
    missing: dict[str, list[str]] = field(default_factory=dict)  # case -> structures with no contour
    out_dir: str = ""

    def lines(self) -> list[str]:
        out = [f"imported {self.cases} case(s) into {self.out_dir}"]
        out += [f"skipped: {p}" for p in self.problems]
        out += [f"{case}: ROI names not mapped to a structure (add them with --synonyms): {', '.join(names)}"
                for case, names in self.unmapped.items() if names]
        return out


def _scan_cohort(source: Path) -> tuple[dict[str, dict], list[tuple[Path, object]], list[str]]:
    """CT series (uid -> folder, patient id) and RTSTRUCT files (path, header) under ``source``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, dict] = {}
    structures: list[tuple[Path, object]] = []
    unreadable: list[Path] = []
    identities: set[tuple[str, str]] = set()
    for root, _, names in os.walk(source):
        for name in sorted(names):
            path = Path(root) / name
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError):
                if path.suffix.lower() == ".dcm":
                    unreadable.append(path)
                continue
            modality = str(header.get("Modality", ""))
            identities.add((str(header.get("PatientID", "")), str(header.get("PatientName", ""))))
            if modality == "RTSTRUCT":
                structures.append((path, header))
            elif modality == "CT" and "ImagePositionPatient" in header:
                uid = str(header.get("SeriesInstanceUID", ""))
                entry = series.setdefault(uid, {"folders": set(), "patient": str(header.get("PatientID", "")),
                                                "study": str(header.get("StudyInstanceUID", ""))})
                entry["folders"].add(path.parent)
    return series, structures, unreadable, identities


class _Scrubber:
    """Problem lines name files by their base name, with every PatientID and patient-name part seen in the
    cohort's headers replaced by the patient's pseudonym or [NAME]: folder and file names of exports often
    hold them, and these lines are written into the dataset."""

    def __init__(self, identities: set[tuple[str, str]], pseudonyms):
        self.replacements: list[tuple[re.Pattern, str]] = []
        for patient_id, name in identities:
            if len(patient_id) >= 3:
                self.replacements.append((re.compile(re.escape(patient_id), re.IGNORECASE),
                                          pseudonyms.pseudonym(patient_id)))
            for part in re.split(r"[\^\s,]+", name):
                if len(part) >= 3:
                    self.replacements.append((re.compile(rf"\b{re.escape(part)}\b", re.IGNORECASE), "[NAME]"))

    def __call__(self, text: str) -> str:
        for pattern, replacement in self.replacements:
            text = pattern.sub(replacement, text)
        return text

    def file(self, path: Path) -> str:
        return self(path.name)


def _referenced_series(header) -> set[str]:
    return {str(s.SeriesInstanceUID) for frame in header.get("ReferencedFrameOfReferenceSequence", [])
            for study in frame.get("RTReferencedStudySequence", []) for s in study.get("RTReferencedSeriesSequence", [])
            if "SeriesInstanceUID" in s}


def _common_folder(folders: set[Path]) -> Path:
    return Path(os.path.commonpath([str(f) for f in folders]))


def import_dicom_cohort(source: str | os.PathLike, out_dir: str | os.PathLike, *, reports_dir: str | os.PathLike | None = None,
                        records_csv: str | os.PathLike | None = None, records_id_column: str | None = None,
                        synonyms: Mapping[str, Sequence[str]] | None = None, secret: str = "medvlm",
                        validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                        overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> ImportSummary:
    """Import every CT series under ``source`` with its RTSTRUCT(s), ``reports_dir/<PatientID>.txt`` and the
    patient's row of ``records_csv`` (:func:`read_cohort_records`).

    Returns an :class:`ImportSummary`; raises :class:`InputError` only when nothing can be imported (no source,
    no CT series, an output folder that holds other files without ``overwrite``).
    """
    from medvlm.data.dicom import read_dicom_series, read_rtstruct
    from medvlm.data.io import atomic_write_text, save_labels, save_nifti
    from medvlm.data.writer import split_indices
    from medvlm.text.deid import Deidentifier
    from medvlm.data.dicom_deid import DicomDeidentifier

    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise InputError(f"DICOM cohort folder not found: {source}")
    if reports_dir is not None and not Path(reports_dir).is_dir():
        raise InputError(f"reports folder not found: {reports_dir}")
    if not (0.0 <= validation_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and validation_fraction + test_fraction < 1.0):
        raise InputError(f"validation and test fractions must be in [0, 1) and leave training cases, got "
                         f"{validation_fraction} and {test_fraction}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{out_dir} is not empty; choose another --out, or pass --overwrite to replace it")
    synonyms = dict(synonyms or DEFAULT_SYNONYMS)
    pseudonyms = DicomDeidentifier(secret)
    deidentifier = Deidentifier()
    records, record_problems = read_cohort_records(records_csv, records_id_column) if records_csv else ({}, [])
    series, structures, unreadable, identities = _scan_cohort(source)
    if not series:
        raise InputError(f"{source}: no CT series found ({len(unreadable)} unreadable .dcm file(s))")
    scrub = _Scrubber(identities, pseudonyms)
    summary = ImportSummary(out_dir=str(out_dir))
    summary.problems += [f"{scrub.file(path)}: not a readable DICOM file" for path in unreadable]
    summary.problems += [scrub(line) for line in record_problems]
    by_series: dict[str, list[tuple[Path, object]]] = {}
    for path, header in structures:
        targets = _referenced_series(header)
        matched = [uid for uid in targets if uid in series]
        if not matched:
            patient = pseudonyms.pseudonym(str(header.get("PatientID", "")) or "unknown")
            summary.problems.append(f"patient {patient}, {scrub.file(path)}: the RTSTRUCT references no CT series "
                                    "of this cohort")
        for uid in matched:
            by_series.setdefault(uid, []).append((path, header))

    staging = out_dir.with_name(f".{out_dir.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    for sub in ("images", "labels", "reports"):
        (staging / sub).mkdir(parents=True)
    written: list[dict] = []
    used_ids: dict[str, int] = {}
    try:
        ordered = sorted(series.items(), key=lambda item: (pseudonyms.pseudonym(item[1]["patient"] or "unknown"), item[0]))
        for number, (uid, entry) in enumerate(ordered):
            patient = pseudonyms.pseudonym(entry["patient"] or "unknown")
            used_ids[patient] = used_ids.get(patient, 0) + 1
            case_id = patient if used_ids[patient] == 1 else f"{patient}-{used_ids[patient]}"
            if progress is not None:
                progress(number + 1, len(ordered))
            try:
                ct = read_dicom_series(_common_folder(entry["folders"]), uid, secret=secret)
            except InputError as exc:
                summary.problems.append(scrub(f"patient {patient}, series {number + 1}: {exc}".replace(str(source), "")))
                continue
            item = {"id": case_id, "image": f"images/{case_id}.nii.gz"}
            rtstructs = by_series.get(uid, [])
            if rtstructs:
                masks = {name: np.zeros(ct.volume.shape, dtype=bool) for name in STRUCTURE_NAMES}
                unmapped: list[str] = []
                for path, _ in rtstructs:
                    where = f"patient {patient}, {scrub.file(path)}"
                    try:
                        rois = read_rtstruct(path, ct)
                    except InputError as exc:
                        summary.problems.append(scrub(f"{where}: {str(exc).replace(str(path), path.name)}"))
                        continue
                    for roi_name, mask in rois.items():
                        structure = structure_of(roi_name, synonyms)
                        if structure is None:
                            unmapped.append(roi_name)
                        elif not mask.any():
                            summary.problems.append(scrub(f"{where}: ROI {roi_name!r} ({structure}) has an empty contour"))
                        else:
                            masks[structure] |= mask
                summary.unmapped[case_id] = sorted({scrub(name) for name in unmapped})
                summary.missing[case_id] = [name for name, mask in masks.items() if not mask.any()]
                save_labels(staging / "labels" / f"{case_id}.nii.gz",
                            np.stack([masks[n] for n in STRUCTURE_NAMES]).astype(np.uint8), ct.affine, STRUCTURE_NAMES)
                item["label"] = f"labels/{case_id}.nii.gz"
            else:
                summary.problems.append(f"patient {patient}: no RTSTRUCT drawn on its CT series; imported without labels")
            if reports_dir is not None:
                report = Path(reports_dir) / f"{entry['patient']}.txt"
                if report.is_file():
                    try:
                        text = report.read_text(encoding="utf-8")
                    except (OSError, UnicodeDecodeError) as exc:
                        summary.problems.append(f"patient {patient}, its report: cannot be read ({type(exc).__name__})")
                    else:
                        atomic_write_text(staging / "reports" / f"{case_id}.txt", deidentifier.deidentify(text).text)
                        item["report"] = f"reports/{case_id}.txt"
                else:
                    summary.problems.append(f"patient {patient}: no report file in the reports folder")
            if records_csv is not None:
                record = records.get(entry["patient"])
                if record is None:
                    summary.problems.append(f"patient {patient}: no row in the records CSV")
                elif record:  # free text de-identified; identifier columns were never read
                    item["record"] = {name: deidentifier.deidentify(value).text if name in FREE_TEXT_FIELDS else value
                                      for name, value in record.items()}
            save_nifti(staging / "images" / f"{case_id}.nii.gz", ct.volume, ct.affine, description="medvlm import (HU)")
            written.append(item)
        if not written:
            raise InputError(f"{source}: no case could be imported: " + "; ".join(summary.problems[:5]))
        imported_patients = {entry["patient"] for entry in series.values()}
        strays = [patient for patient in records if patient not in imported_patients]
        if strays:
            summary.problems.append(f"records CSV: {len(strays)} row(s) name no patient of the cohort")
        splits = split_indices(len(written), seed, validation_fraction, test_fraction)
        datalist = {"description": f"imported from DICOM-RT ({len(written)} cases; patients named by keyed pseudonyms)",
                    "labels": list(STRUCTURE_NAMES)}
        datalist.update({name: [written[i] for i in indices] for name, indices in splits.items()})
        atomic_write_text(staging / "import_report.json", json.dumps(
            {"problems": summary.problems, "unmapped_roi_names": summary.unmapped,
             "structures_without_contour": summary.missing}, indent=1))
        atomic_write_text(staging / "datalist.json", json.dumps(datalist, indent=1))  # last: the dataset is complete
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or overwrite=True
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary.cases = len(written)
    return summary
