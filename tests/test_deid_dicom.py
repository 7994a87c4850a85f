"""DICOM header de-identification (PS3.15 Annex E basic profile) on pydicom's bundled test files."""
from __future__ import annotations

import hashlib
import shutil

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medvlm.cli import main
from medvlm.errors import InputError
from medvlm.data.dicom_deid import DicomDeidentifier, deidentify_dicom_file, deidentify_dicom_folder


@pytest.fixture()
def dicom_folder(tmp_path):
    folder = tmp_path / "in" / "SMITH_JOHN_2021"
    folder.mkdir(parents=True)
    for name in ("CT_small.dcm", "rtstruct.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    (folder / "readme.txt").write_text("not dicom")
    return folder


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_identifiers_are_removed_and_the_profile_is_recorded(dicom_folder, tmp_path):
    original = pydicom.dcmread(dicom_folder / "CT_small.dcm")
    assert any(e.tag.is_private for e in original) and original.get("InstitutionName")
    report = deidentify_dicom_folder(dicom_folder, tmp_path / "out")
    assert len(report.written) == 3 and len(report.skipped) == 1
    for path in report.written:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert not any(e.tag.is_private for e in ds)
        assert str(ds.PatientName).startswith("ANON-") and ds.PatientID == str(ds.PatientName)
        assert ds.get("PatientBirthDate", "") == "" and ds.get("StudyDate", "") == ""
        assert "InstitutionName" not in ds and "ReferringPhysicianName" not in ds or ds.ReferringPhysicianName == ""
        assert "SMITH" not in str(path)
    ct = pydicom.dcmread(next(p for p in report.written if pydicom.dcmread(p).Modality == "CT"))
    assert ct.SOPClassUID == original.SOPClassUID  # standard class UIDs are kept
    assert ct.StudyInstanceUID != original.StudyInstanceUID and ct.StudyInstanceUID.startswith("2.25.")


def test_uid_remapping_is_consistent_across_files_and_nested_sequences():
    deid = DicomDeidentifier("k")
    rt = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    referenced_for = rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    study_ref = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].ReferencedSOPInstanceUID
    deid.deidentify_dataset(rt)
    assert rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == deid.new_uid(referenced_for)
    assert rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].ReferencedSOPInstanceUID == deid.new_uid(study_ref)
    assert DicomDeidentifier("k").new_uid("1.2.3") == deid.new_uid("1.2.3") != DicomDeidentifier("other").new_uid("1.2.3")


def test_inputs_are_never_modified_and_outputs_never_inside_inputs(dicom_folder, tmp_path):
    before = _digest(dicom_folder)
    deidentify_dicom_folder(dicom_folder, tmp_path / "out")
    assert _digest(dicom_folder) == before
    with pytest.raises(InputError, match="outside the input"):
        deidentify_dicom_folder(dicom_folder, dicom_folder / "deid")
    with pytest.raises(InputError, match="not empty"):
        deidentify_dicom_folder(dicom_folder, tmp_path / "out")


def test_non_dicom_inputs_are_clear_errors(tmp_path):
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.dcm").write_bytes(b"this is not dicom at all")
    with pytest.raises(InputError, match="no DICOM files"):
        deidentify_dicom_folder(tmp_path / "only_text", tmp_path / "out")
    with pytest.raises(InputError, match="is not a DICOM file"):
        deidentify_dicom_file(tmp_path / "only_text" / "a.dcm")


def test_cli_dicom_and_text_commands(dicom_folder, tmp_path, capsys):
    assert main(["deid", "dicom", str(dicom_folder), "--out", str(tmp_path / "cli_out")]) == 0
    assert "wrote 3" in capsys.readouterr().out
    note = tmp_path / "note.txt"
    note.write_text("Patient: Quorra Vintershade, MRN 55102938\n")
    assert main(["deid", "text", str(note), "--out", str(tmp_path / "clean")]) == 0
    clean = (tmp_path / "clean" / "note.deid.txt").read_text()
    assert "Vintershade" not in clean and "55102938" not in clean
    assert note.read_text().startswith("Patient: Quorra")  # the input is untouched
    (tmp_path / "latin1.txt").write_bytes("Patient: Jos\xe9".encode("latin-1"))
    assert main(["deid", "text", str(tmp_path / "latin1.txt")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
