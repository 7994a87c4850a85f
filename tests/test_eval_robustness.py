"""Perturbations of the robustness sweep: each does what its name says, with labels kept aligned."""
from __future__ import annotations

import numpy as np
import pytest

from eval.robustness import AIR_HU, perturb


def _phantom_like():
    x, y, z = np.meshgrid(*(np.arange(40),) * 3, indexing="ij")
    body = (x - 20) ** 2 + (y - 20) ** 2 < 16 ** 2
    image = np.where(body, 40.0, AIR_HU).astype(np.float32)
    blob = (x - 28) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 < 5 ** 2  # off-centre towards +x
    teeth = body & (np.abs(x - 20) < 3) & (y > 30) & (np.abs(z - 20) < 2)
    image[teeth] = 1500.0
    return image, blob[None].astype(np.uint8), teeth


def test_scale_grows_the_anatomy_and_pads_with_air():
    image, labels, _ = _phantom_like()
    bigger = perturb(image, labels, "scale", 1.15)[1].sum()
    smaller_image, smaller_labels = perturb(image, labels, "scale", 0.85)
    assert bigger / labels.sum() == pytest.approx(1.15 ** 3, rel=0.15)
    assert smaller_labels.sum() / labels.sum() == pytest.approx(0.85 ** 3, rel=0.15)
    assert smaller_image[0, 0, 0] == pytest.approx(AIR_HU)  # corners come from outside: air, not 0 HU


def test_rotation_moves_an_off_centre_structure_around_the_axis_and_keeps_its_volume():
    image, labels, _ = _phantom_like()
    _, turned = perturb(image, labels, "rotation", 30.0)
    assert turned.sum() == pytest.approx(labels.sum(), rel=0.1)
    before = np.argwhere(labels[0]).mean(axis=0)
    after = np.argwhere(turned[0]).mean(axis=0)
    # 8 voxels from the axis, 30 degrees: the centroid travels about 2 * 8 * sin(15 deg) = 4.1 voxels in-plane
    assert np.hypot(*(after - before)[:2]) == pytest.approx(4.1, abs=1.0)
    assert np.hypot(after[0] - 19.5, after[1] - 19.5) == pytest.approx(np.hypot(before[0] - 19.5, before[1] - 19.5), abs=1.0)


def test_noise_has_the_requested_sigma_and_leaves_labels_alone():
    image, labels, _ = _phantom_like()
    noisy, same = perturb(image, labels, "noise", 50.0, seed=3)
    assert np.std(noisy - image) == pytest.approx(50.0, rel=0.05)
    assert np.array_equal(same, labels)


def test_dental_streaks_only_touch_body_voxels_in_teeth_slices_and_scale_with_amplitude():
    image, labels, teeth = _phantom_like()
    weak = perturb(image, labels, "dental streaks", 400.0, seed=1)[0] - image
    strong = perturb(image, labels, "dental streaks", 1600.0, seed=1)[0] - image
    teeth_slices = np.flatnonzero(teeth.any(axis=(0, 1)))
    others = np.setdiff1d(np.arange(image.shape[2]), teeth_slices)
    assert np.abs(weak[:, :, others]).max() == 0 and np.abs(weak[image <= -500]).max() == 0
    assert np.abs(strong).max() == pytest.approx(4 * np.abs(weak).max(), rel=1e-3)


def test_blur_smooths_by_the_sigma_in_mm_keeps_the_mean_and_leaves_labels_alone():
    image, labels, _ = _phantom_like()
    edge = slice(2, 38)

    def roughness(volume):  # mean absolute step between neighbours along x, inside the grid
        return float(np.abs(np.diff(volume[edge, edge, edge], axis=0)).mean())

    fine, same = perturb(image, labels, "blur", 1.5, spacing_mm=(3.0, 3.0, 3.0))
    coarse = perturb(image, labels, "blur", 4.5, spacing_mm=(3.0, 3.0, 3.0))[0]
    in_voxels = perturb(image, labels, "blur", 1.5, spacing_mm=(1.0, 1.0, 1.0))[0]  # the same sigma, 3x in voxels
    assert roughness(coarse) < roughness(fine) < roughness(image)
    assert roughness(in_voxels) < roughness(fine)
    assert float(fine[edge, edge, edge].mean()) == pytest.approx(float(image[edge, edge, edge].mean()), rel=0.02)
    assert np.array_equal(same, labels)
    # no zero padding: the air at the grid's faces stays air
    np.testing.assert_allclose(coarse[0], image[0], atol=10.0)  # zero padding: hundreds of HU
    with pytest.raises(ValueError, match="blur sigma must be >= 0 mm"):
        perturb(image, labels, "blur", -1.0)


def test_identity_levels_return_copies_and_unknown_families_are_refused():
    image, labels, _ = _phantom_like()
    for family, level in (("scale", 1.0), ("rotation", 0.0), ("noise", 0.0), ("dental streaks", 0.0), ("blur", 0.0)):
        same_image, same_labels = perturb(image, labels, family, level)
        assert np.array_equal(same_image, image) and np.array_equal(same_labels, labels)
        assert same_image is not image
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(image, labels, "motion", 1.0)
