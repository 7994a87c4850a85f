"""`medvlm data phantom` writes a complete, reusable dataset and never silently replaces another one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvlm.cli import main
from medvlm.data.clinical import read_records_csv
from medvlm.data.io import load_labels
from medvlm.errors import InputError
from medvlm.vocabulary import STRUCTURE_NAMES

ARGS = ["--n", "8", "--seed", "1", "--shape", "16", "24", "24", "--spacing-mm", "8", "5", "5", "--previews", "1"]


def test_phantom_command_writes_images_labels_reports_records_datalist_previews(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "phantom", "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "cases/s" in printed
    images = sorted((out / "images").glob("*.nii.gz"))
    assert len(images) == 8 and len(list((out / "labels").glob("*.nii.gz"))) == 8
    assert len(list((out / "reports").glob("*.txt"))) == 8 and len(list((out / "previews").glob("*.png"))) == 1
    image = nib.load(str(images[0]))
    assert image.shape == (24, 24, 16)  # stored x, y, z for D H W = 16 24 24
    assert np.allclose(np.abs(np.diag(image.affine)[:3]), (5, 5, 8))
    labels, _, names = load_labels(out / "labels" / images[0].name)
    assert names == list(STRUCTURE_NAMES) and labels.shape == (9, 24, 24, 16)
    assert len(read_records_csv(out / "records.csv")) == 8
    datalist = json.loads((out / "datalist.json").read_text())
    ids = [item["id"] for section in ("training", "validation", "test") for item in datalist[section]]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8  # disjoint and complete
    assert datalist["test"] and all(item["report_family"] == "heldout" for item in datalist["test"])
    assert all(item["report_family"] == "train" for item in datalist["training"])
    spans = [json.loads(line) for line in (out / "annotations" / "phi_spans.jsonl").read_text().splitlines()]
    assert len(spans) == 8 and all(entry["spans"] for entry in spans)


def test_same_command_twice_reuses_and_a_different_one_refuses(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "phantom", "--out", str(out), *ARGS]) == 0
    before = (out / "images" / "hnc_0001.nii.gz").stat().st_mtime_ns
    assert main(["data", "phantom", "--out", str(out), *ARGS]) == 0
    assert "reused" in capsys.readouterr().out
    assert (out / "images" / "hnc_0001.nii.gz").stat().st_mtime_ns == before
    other = [a if a != "1" else "2" for a in ARGS]  # another seed
    assert main(["data", "phantom", "--out", str(out), *other]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "images" / "hnc_0001.nii.gz").stat().st_mtime_ns == before
    assert main(["data", "phantom", "--out", str(out), *other, "--overwrite"]) == 0
    assert not list(tmp_path.glob(".ds.partial-*"))


def test_folder_with_unrelated_files_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert main(["data", "phantom", "--out", str(out), *ARGS]) == 2
    assert (out / "notes.txt").read_text() == "precious"


def test_validate_command_reports_counts_and_errors_in_one_line(small_dataset, tmp_path, capsys):
    assert main(["data", "validate", str(small_dataset)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["data", "validate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medvlm: error: datalist not found") and "Traceback" not in err


def test_console_script_runs_and_library_does_not_import_pipelines_train_eval():
    code = "import sys, medvlm, medvlm.data.phantom, medvlm.data.transforms, medvlm.data.datalist, medvlm.cli; " \
           "print(sorted(m for m in ('pipelines', 'train', 'eval') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    script = Path(sys.executable).parent / "medvlm"
    help_text = subprocess.run([str(script), "data", "phantom", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--spacing-mm" in help_text and "D H W" in help_text


def test_the_four_packages_import():
    import eval  # noqa: F401
    import medvlm  # noqa: F401
    import pipelines  # noqa: F401
    import train  # noqa: F401


def test_output_folders_take_their_own_rerun_and_refuse_anything_else(tmp_path, capsys):
    """No silent overwrite, one rule for every command with --out: its own earlier output of the same inputs is
    rewritten; another run's output or files medvlm did not write are refused (nothing changes) unless --overwrite."""
    from medvlm.data.io import OUTPUT_MANIFEST, claim_output_folder

    out = tmp_path / "out"
    claim_output_folder(out, "contour", {"ct": "a.nii.gz", "report": "Patient John Smith, left tonsil"})
    (out / "GTVp.nii.gz").write_bytes(b"x")
    assert "John Smith" not in (out / OUTPUT_MANIFEST).read_text()  # inputs are kept as a digest only
    claim_output_folder(out, "contour", {"report": "Patient John Smith, left tonsil", "ct": "a.nii.gz"})  # a rerun
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for command, inputs in (("contour", {"ct": "b.nii.gz"}), ("generate", {"ct": "a.nii.gz"})):
        with pytest.raises(InputError, match="already holds the output of `contour` with other inputs"):
            claim_output_folder(out, command, inputs)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    claim_output_folder(out, "generate", {}, overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="1 file\\(s\\) medvlm did not write \\(notes.txt"):
        claim_output_folder(foreign, "eval segmentation", {})
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # through the command line: deid text into a folder of other files, then its own rerun
    report = tmp_path / "r1.txt"
    report.write_text("Seen by Dr. Jane Doe on 03/04/2021.")
    assert main(["deid", "text", str(report), "--out", str(foreign)]) == 2
    assert "--overwrite" in capsys.readouterr().err and [p.name for p in foreign.iterdir()] == ["notes.txt"]
    clean = tmp_path / "clean"
    assert main(["deid", "text", str(report), "--out", str(clean)]) == 0
    assert main(["deid", "text", str(report), "--out", str(clean)]) == 0  # the same inputs again: its own output
    other = tmp_path / "r2.txt"
    other.write_text("Nothing to hide.")
    assert main(["deid", "text", str(other), "--out", str(clean)]) == 2
