"""Bring your own data: MONAI-style datalist JSON plus a records CSV, validated with precise errors.

Format: ``{"training": [...], "validation": [...], "test": [...]}``; each item has ``image`` (path),
optional ``label`` (path), ``report`` (text, or a path ending in ``.txt``) and ``record`` (a mapping of
record fields, or the ``Number`` of a row in the records CSV). Paths are relative to the datalist's folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medvlm.data.clinical import read_records_csv
from medvlm.vocabulary import CSV_COLUMNS, ClinicalRecord, validate_record_fields
from medvlm.errors import DatalistError

SECTIONS = ("training", "validation", "test")
MAX_REPORT_CHARS = 100_000  # a CT neck report is a few kB; anything larger is not a report


def _resolve(base: Path, value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatalistError(f"{where}, field {field!r}: expected a file path, got {value!r}")
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DatalistError(f"{where}, field {field!r}: file not found: {path}")
    return str(path)


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nifti(base: Path, value: Any, where: str, field: str) -> str:
    """A datalist image or label: an existing NIfTI file (training and evaluation read them with MONAI's
    ``NibabelReader``)."""
    path = _resolve(base, value, where, field)
    if not path.lower().endswith(NIFTI_SUFFIXES):
        raise DatalistError(f"{where}, field {field!r}: expected a NIfTI file (.nii or .nii.gz), got {Path(path).name}; "
                            "convert DICOM series with `medvlm data import-dicom`")
    return path


def _report(base: Path, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DatalistError(f"{where}, field 'report': expected text or a .txt path, got {type(value).__name__}")
    if value.endswith(".txt") and "\n" not in value:
        path = Path(_resolve(base, value, where, "report"))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DatalistError(f"{where}, field 'report': {path} is not UTF-8 text (byte {exc.start})") from None
    else:
        text = value
    if not text.strip():
        raise DatalistError(f"{where}, field 'report': the report is empty")
    if len(text) > MAX_REPORT_CHARS:
        raise DatalistError(f"{where}, field 'report': {len(text)} characters is larger than any report "
                            f"({MAX_REPORT_CHARS} allowed); is this the right file?")
    return text


class Datalist(dict):
    """``{section: [item, ...]}``; asking for a section that is not one of :data:`SECTIONS` (a mistyped
    ``--split``) is a :class:`DatalistError` naming the file and the sections, not a ``KeyError``."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __missing__(self, key):
        raise DatalistError(f"{self.path}: no section {key!r}; a datalist has the sections {', '.join(SECTIONS)}")


def load_datalist(path: str | os.PathLike, *, records_csv: str | os.PathLike | None = None,
                  require_labels: bool = False, read_reports: bool = True,
                  deidentify_reports: bool = True) -> dict[str, list[dict]]:
    """Load and validate a datalist; return ``{section: [item, ...]}`` with absolute paths.

    Items keep their other keys. ``report`` becomes the report text, de-identified unless
    ``deidentify_reports=False`` (``report_path`` keeps the file), and
    ``record`` becomes a :class:`ClinicalRecord` when the records CSV (or a full mapping) provides one.
    Errors name the file, the section, the item and the field.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "datalist.json"
    if not path.is_file():
        raise DatalistError(f"datalist not found: {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatalistError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise DatalistError(f"{path}: not UTF-8 text") from None
    if not isinstance(payload, dict) or not any(section in payload for section in SECTIONS):
        raise DatalistError(f"{path}: expected a mapping with at least one of {list(SECTIONS)}")
    base = path.parent
    deidentifier = None
    if deidentify_reports:
        from medvlm.text.deid import Deidentifier

        deidentifier = Deidentifier()
    records: dict[int, ClinicalRecord] = {}
    csv_path = records_csv or payload.get("records")
    if csv_path:
        csv_path = Path(csv_path)
        records = {r.number: r for r in read_records_csv(csv_path if csv_path.is_absolute() else base / csv_path)}

    out = Datalist(path)
    for section in SECTIONS:
        items = payload.get(section, [])
        if not isinstance(items, list):
            raise DatalistError(f"{path}: section {section!r} must be a list, got {type(items).__name__}")
        checked = []
        for index, item in enumerate(items):
            where = f"{path}, {section}[{index}]"
            if not isinstance(item, dict):
                raise DatalistError(f"{where}: expected a mapping with an 'image' path, got {item!r}")
            if "image" not in item:
                raise DatalistError(f"{where}: missing field 'image'")
            entry = dict(item)
            entry["image"] = _nifti(base, item["image"], where, "image")
            if "label" in item:
                entry["label"] = _nifti(base, item["label"], where, "label")
            elif require_labels:
                raise DatalistError(f"{where}: missing field 'label' (labels are required here)")
            if "report" in item and read_reports:
                if isinstance(item["report"], str) and item["report"].endswith(".txt"):
                    entry["report_path"] = _resolve(base, item["report"], where, "report")
                entry["report"] = _report(base, item["report"], where)
                if deidentifier is not None:  # identifiers never travel further than this loader
                    entry["report"] = deidentifier.deidentify(entry["report"]).text
            if "record" in item:
                entry["record"] = _record(item["record"], records, where)
            checked.append(entry)
        out[section] = checked
    return out


def _record(value: Any, records: dict[int, ClinicalRecord], where: str) -> ClinicalRecord | dict:
    if isinstance(value, bool):
        raise DatalistError(f"{where}, field 'record': expected a row Number or a mapping, got {value!r}")
    if isinstance(value, int):
        if not records:
            raise DatalistError(f"{where}, field 'record': row Number {value} given but no records CSV")
        if value not in records:
            raise DatalistError(f"{where}, field 'record': no row with Number {value} in the records CSV")
        return records[value]
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(CSV_COLUMNS))
        if unknown:
            raise DatalistError(f"{where}, field 'record': unknown record field(s) {unknown}; known: {list(CSV_COLUMNS)}")
        if all(column in value for column in CSV_COLUMNS):
            return ClinicalRecord.from_row({k: str(v) for k, v in value.items()}, source=where)
        validate_record_fields(value, where=f"{where}, record")
        return dict(value)  # a partial record: kept as given, validated by whoever needs a field
    raise DatalistError(f"{where}, field 'record': expected a row Number or a mapping, got {type(value).__name__}")
