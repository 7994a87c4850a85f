"""NIfTI I/O keeps geometry, refuses bad volumes with clear errors, and writes atomically."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from medvlm.data.io import atomic_path, load_labels, load_nifti, save_labels, save_nifti, spacing_from_affine, validate_volume
from medvlm.errors import InputError


def _oblique_affine():
    angle = np.radians(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.9, -0.9, 2.5])  # LPS-like, anisotropic, oblique
    affine[:3, 3] = [101.5, -33.25, -410.0]
    return affine


def test_nifti_round_trip_preserves_affine_spacing_and_values(tmp_path):
    affine = _oblique_affine()
    volume = np.random.default_rng(0).integers(-1000, 2000, size=(20, 18, 7)).astype(np.float32)
    save_nifti(tmp_path / "ct.nii.gz", volume, affine)
    loaded, loaded_affine = load_nifti(tmp_path / "ct.nii.gz")
    assert np.allclose(loaded_affine, affine, atol=1e-5)
    assert np.array_equal(loaded, volume)
    assert np.allclose(spacing_from_affine(loaded_affine), (0.9, 0.9, 2.5), atol=1e-6)
    header = nib.load(str(tmp_path / "ct.nii.gz")).header
    assert header["sform_code"] == 1 and header["qform_code"] == 1


def test_multilabel_round_trip_keeps_structure_names(tmp_path):
    labels = np.zeros((3, 8, 9, 10), dtype=np.uint8)
    labels[0, 2:5, 2:5, 2:5] = 1
    labels[1, 1:7, 1:7, 1:7] = 1  # overlapping structures survive
    save_labels(tmp_path / "lab.nii.gz", labels, _oblique_affine(), ["GTVn", "CTVn", "Larynx"])
    loaded, affine, names = load_labels(tmp_path / "lab.nii.gz")
    assert names == ["GTVn", "CTVn", "Larynx"]
    assert np.array_equal(loaded, labels)
    assert np.allclose(affine, _oblique_affine(), atol=1e-5)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match="not found: .*nope.nii.gz"):
        load_nifti(tmp_path / "nope.nii.gz")


def test_non_nifti_and_truncated_files_are_clear_errors(tmp_path):
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"hello, not an image"))
    with pytest.raises(InputError, match="not a readable NIfTI"):
        load_nifti(tmp_path / "text.nii.gz")
    save_nifti(tmp_path / "ct.nii.gz", np.zeros((30, 30, 30)), np.eye(4))
    data = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.nii.gz"):
        load_nifti(tmp_path / "cut.nii.gz")


@pytest.mark.parametrize("shape", [(64, 64), (2, 16, 16, 16), (16,)])
def test_wrong_dimensionality_is_rejected(shape):
    with pytest.raises(InputError, match=r"expected a 3D volume.*\d+D"):
        validate_volume(np.zeros(shape, dtype=np.float32))


def test_nan_voxels_are_rejected_with_a_count():
    volume = np.zeros((8, 8, 8), dtype=np.float32)
    volume[1, 2, 3] = np.nan
    volume[4, 4, 4] = np.inf
    with pytest.raises(InputError, match="2 voxel"):
        validate_volume(volume)


def test_nan_voxels_in_a_file_are_rejected(tmp_path):
    volume = np.zeros((8, 8, 8), dtype=np.float32)
    volume[0, 0, 0] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", volume, np.eye(4), dtype=np.float32)
    with pytest.raises(InputError, match="NaN"):
        load_nifti(tmp_path / "nan.nii.gz")


def test_one_voxel_thick_volume_is_rejected():
    with pytest.raises(InputError, match="one voxel thick"):
        validate_volume(np.zeros((32, 32, 1), dtype=np.float32))


def test_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("original")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
