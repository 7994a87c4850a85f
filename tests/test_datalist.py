"""Bring-your-own-data: datalists and records CSVs load, and every malformed entry is named precisely."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from medvlm.data.clinical import read_records_csv
from medvlm.vocabulary import CSV_COLUMNS, ClinicalRecord
from medvlm.data.datalist import load_datalist
from medvlm.errors import DatalistError


@pytest.fixture()
def dataset(small_dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(small_dataset, copy)
    return copy


def _edit_datalist(folder, change):
    path = folder / "datalist.json"
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))
    return path


def _edit_records(folder, change):
    path = folder / "records.csv"
    rows = list(csv.DictReader(path.open()))
    columns = change(rows) or list(CSV_COLUMNS)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_phantom_datalist_loads_with_reports_and_records(dataset):
    datalist = load_datalist(dataset)
    assert sum(len(v) for v in datalist.values()) == 10
    item = datalist["training"][0]
    assert item["image"].endswith(".nii.gz") and item["label"].endswith(".nii.gz")
    assert isinstance(item["record"], ClinicalRecord)
    assert "FINDINGS" in item["report"] or "Findings" in item["report"]


def test_missing_image_file_names_section_item_and_field(dataset):
    def change(payload):
        payload["training"][1]["image"] = "images/missing.nii.gz"

    path = _edit_datalist(dataset, change)
    with pytest.raises(DatalistError, match=r"training\[1\], field 'image': file not found: .*missing.nii.gz") as info:
        load_datalist(path)
    assert str(path) in str(info.value)


def test_an_image_that_is_not_nifti_is_named_with_the_way_to_convert_it(dataset):
    (dataset / "images" / "scan.mha").write_bytes(b"ObjectType = Image\n")

    def change(payload):
        payload["validation"][0]["image"] = "images/scan.mha"

    with pytest.raises(DatalistError, match=r"validation\[0\], field 'image': expected a NIfTI file .*scan.mha.*import-dicom"):
        load_datalist(_edit_datalist(dataset, change))


def test_malformed_json_reports_line_and_column(dataset):
    (dataset / "datalist.json").write_text('{"training": [ {"image": "a.nii.gz",, } ]}')
    with pytest.raises(DatalistError, match=r"not valid JSON \(line 1, column"):
        load_datalist(dataset / "datalist.json")


def test_item_without_image_is_named(dataset):
    _edit_datalist(dataset, lambda p: p["validation"].append({"label": "labels/x.nii.gz"}))
    with pytest.raises(DatalistError, match=r"validation\[\d+\]: missing field 'image'"):
        load_datalist(dataset)


def test_records_csv_with_a_missing_column_is_named(dataset):
    def change(rows):
        return [c for c in CSV_COLUMNS if c != "icT"]

    _edit_records(dataset, change)
    with pytest.raises(DatalistError, match=r"records.csv: missing column\(s\) \['icT'\]"):
        read_records_csv(dataset / "records.csv")


def test_unknown_t_stage_names_row_and_field(dataset):
    def change(rows):
        rows[2]["icT"] = "T9"

    _edit_records(dataset, change)
    with pytest.raises(DatalistError, match=r"records.csv, row 4, field 'icT': unknown value 'T9'"):
        load_datalist(dataset)


def test_record_number_absent_from_csv_is_named(dataset):
    def change(payload):
        payload["test"][0]["record"] = 999

    _edit_datalist(dataset, change)
    with pytest.raises(DatalistError, match=r"test\[0\], field 'record': no row with Number 999"):
        load_datalist(dataset)


def test_partial_record_mapping_is_checked_against_the_vocabulary(dataset):
    def change(payload):
        payload["training"][0]["record"] = {"Laterality": "sideways"}

    _edit_datalist(dataset, change)
    with pytest.raises(DatalistError, match=r"field 'Laterality': unknown value 'sideways'"):
        load_datalist(dataset)


def test_empty_and_enormous_reports_are_refused(dataset):
    def empty(payload):
        payload["training"][0]["report"] = "   "

    _edit_datalist(dataset, empty)
    with pytest.raises(DatalistError, match="report is empty"):
        load_datalist(dataset)

    def enormous(payload):
        payload["training"][0]["report"] = "tumour " * 200_000

    _edit_datalist(dataset, enormous)
    with pytest.raises(DatalistError, match="larger than any report"):
        load_datalist(dataset)


def test_missing_datalist_is_named(tmp_path):
    with pytest.raises(DatalistError, match="datalist not found"):
        load_datalist(tmp_path / "nowhere")


def test_reports_are_deidentified_on_the_way_in(dataset):
    raw = load_datalist(dataset, deidentify_reports=False)["training"][0]["report"]
    clean = load_datalist(dataset)["training"][0]["report"]
    assert raw != clean and "[NAME]" in clean and "[DATE]" in clean
    unit_no = next(line for line in raw.splitlines() if "Unit No" in line or "MRN" in line)
    assert unit_no not in clean
