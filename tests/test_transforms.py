"""The MONAI chain reorients, resamples, crops and pads; its inverse returns masks to the input grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlm.config import PreprocessConfig
from medvlm.data.io import save_labels, save_nifti
from medvlm.data.phantom import HNCPhantom, PhantomConfig
from medvlm.data.transforms import as_metatensor, invert_to_input, preprocessing_transforms
from medvlm.errors import InputError


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def non_ras_case(tmp_path_factory):
    """A case stored LPS-flipped with permuted axes and anisotropic 3 x 3 x 6 mm voxels."""
    case = HNCPhantom(PhantomConfig(shape=(64, 64, 32), spacing_mm=(3.0, 3.0, 6.0)), seed=1).case(4)
    image, labels = case.image_hu[::-1, ::-1, :], case.labels[:, ::-1, ::-1, :]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = image.shape[0] - 1, image.shape[1] - 1
    permute = np.zeros((4, 4))
    permute[0, 2] = permute[1, 0] = permute[2, 1] = permute[3, 3] = 1  # new axes (z, x, y)
    affine = case.affine @ flip @ permute
    image, labels = np.transpose(image, (2, 0, 1)), np.transpose(labels, (0, 3, 1, 2))
    folder = tmp_path_factory.mktemp("nonras")
    save_nifti(folder / "ct.nii.gz", image, affine)
    save_labels(folder / "label.nii.gz", labels, affine, case.label_names)
    return folder, labels, affine, case


def test_output_is_ras_at_the_configured_spacing_and_at_least_roi(non_ras_case):
    folder, _, _, _ = non_ras_case
    config = PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 64, 72))
    out = preprocessing_transforms(config)({"image": str(folder / "ct.nii.gz"), "label": str(folder / "label.nii.gz")})
    image, label = out["image"], out["label"]
    assert image.shape[0] == 1 and label.shape[0] == 9
    assert all(s >= r for s, r in zip(image.shape[1:], config.roi_size))
    affine = image.affine.numpy()
    assert np.allclose(affine[:3, :3], np.diag([3.0, 3.0, 3.0]), atol=1e-4)  # RAS, no flips, no permutation
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0


def test_inverse_returns_masks_to_the_original_non_ras_anisotropic_grid(non_ras_case):
    folder, labels, affine, case = non_ras_case
    config = PreprocessConfig(spacing_mm=(1.5, 1.5, 3.0), roi_size=(96, 96, 96))
    chain = preprocessing_transforms(config)
    out = chain({"image": str(folder / "ct.nii.gz"), "label": str(folder / "label.nii.gz")})
    restored = invert_to_input(chain, out, key="label", orig_key="label")
    assert tuple(restored.shape) == labels.shape
    assert np.allclose(restored.affine.numpy(), affine, atol=1e-4)
    restored = restored.numpy() > 0.5
    for c, name in enumerate(case.label_names):
        if labels[c].any():
            assert _dice(restored[c], labels[c]) >= 0.99, name


def test_coarse_processing_keeps_structures_in_place_in_world_coordinates(non_ras_case):
    folder, labels, affine, case = non_ras_case
    chain = preprocessing_transforms(PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0), roi_size=(48, 48, 48)))
    out = chain({"image": str(folder / "ct.nii.gz"), "label": str(folder / "label.nii.gz")})
    processed_affine = out["label"].affine.numpy()
    c = case.label_names.index("Bone_Mandible")

    def centroid(mask, aff):
        idx = np.argwhere(mask).mean(axis=0)
        return aff[:3, :3] @ idx + aff[:3, 3]

    before = centroid(labels[c], affine)
    after = centroid(out["label"][c].numpy() > 0.5, processed_affine)
    assert np.linalg.norm(before - after) < 4.0  # within one processed voxel


def test_in_memory_volumes_go_through_the_same_chain():
    case = HNCPhantom(PhantomConfig(shape=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0)), seed=0).case(0)
    chain = preprocessing_transforms(PreprocessConfig(spacing_mm=(6.0, 6.0, 6.0), roi_size=(32, 32, 32)),
                                     label_keys=(), load=False)
    out = chain({"image": as_metatensor(case.image_hu, case.affine)})
    assert out["image"].shape == (1, 32, 32, 32) and out["image"].dtype == torch.float32


@pytest.mark.parametrize("shape", [(32, 32), (3, 8, 8, 8)])
def test_as_metatensor_rejects_non_3d(shape):
    with pytest.raises(InputError, match="3D"):
        as_metatensor(np.zeros(shape), np.eye(4))


def test_as_metatensor_rejects_nan_and_missing_or_singular_affine():
    with pytest.raises(InputError, match="NaN"):
        as_metatensor(np.full((8, 8, 8), np.nan), np.eye(4))
    with pytest.raises(InputError, match="affine"):
        as_metatensor(np.zeros((8, 8, 8)), None)
    with pytest.raises(InputError, match="invertible"):
        as_metatensor(np.zeros((8, 8, 8)), np.zeros((4, 4)))


def test_one_intensity_mapping_round_trips_and_clips():
    from medvlm.data.transforms import map_intensity

    hu = np.array([-1500.0, -1000.0, 0.0, 1500.0, 3000.0])
    scaled = map_intensity(hu, (-1000.0, 1500.0), (-1.0, 1.0), clip=True)
    assert np.allclose(scaled, [-1.0, -1.0, -0.2, 1.0, 1.0])
    assert np.allclose(map_intensity(scaled, (-1.0, 1.0), (-1000.0, 1500.0)), [-1000.0, -1000.0, 0.0, 1500.0, 1500.0])
    assert torch.allclose(map_intensity(torch.tensor([0.5]), (0.0, 1.0), (-1000.0, 1000.0)), torch.tensor([0.0]))
    assert map_intensity(2.0, (0.0, 1.0), (0.0, 10.0), clip=True) == 10.0


def test_body_midline_in_voxels_and_millimetres_for_arrays_and_tensors():
    from medvlm.data.transforms import BODY_HU, body_midline

    volume = np.full((20, 8, 8), -1000.0, dtype=np.float32)
    volume[4:10] = 40.0  # body over x 4..9: centre 6.5
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[0, 3] = -30.0
    assert body_midline(volume) == pytest.approx(6.5)
    assert body_midline(torch.from_numpy(volume)[None]) == pytest.approx(6.5)  # (1, X, Y, Z) tensor
    assert body_midline(volume, affine) == pytest.approx(-30.0 + 2.0 * 6.5)
    assert body_midline(np.full((20, 8, 8), -1000.0)) == pytest.approx(9.5)  # no body: the volume's centre
    scaled = (volume + 1000.0) / 1250.0 - 1.0  # the model range of a -1000..1500 HU window
    assert body_midline(scaled, threshold=(BODY_HU + 1000.0) / 1250.0 - 1.0) == pytest.approx(6.5)
