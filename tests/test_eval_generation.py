"""Generation realism and diversity measures on volumes with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.generation_eval import _frechet, mean_pairwise_ms_ssim, spread_pairs, tissue_statistics


def test_tissue_statistics_shares_and_wasserstein_shift():
    rng = np.random.default_rng(0)
    air = np.full(5000, -1000.0)  # outside the body: ignored
    fat = rng.uniform(-140, -40, 2000)
    soft = rng.uniform(0, 100, 6000)
    bone = rng.uniform(400, 1200, 2000)
    real = np.concatenate([air, fat, soft, bone])
    generated = np.concatenate([air, fat, soft + 10.0, bone[:1000]])  # soft tissue 10 HU brighter, half the bone
    stats = tissue_statistics(real, generated)
    assert stats["fat"]["share_real"] == pytest.approx(0.2)
    assert stats["soft tissue"]["share_generated"] == pytest.approx(6000 / 9000)
    assert stats["bone"]["share_generated"] == pytest.approx(1000 / 9000)
    assert stats["fat"]["wasserstein_hu"] == pytest.approx(0.0, abs=1e-9)
    # values shifted past the range's upper edge (150 HU) are cut, so the distance is close to, not exactly, 10
    assert stats["soft tissue"]["wasserstein_hu"] == pytest.approx(10.0, abs=0.5)
    with pytest.raises(ValueError, match="generated"):
        tissue_statistics(real, air)


def test_ms_ssim_is_one_for_copies_and_low_for_independent_noise():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 32, 32, 32, generator=g), 5, 1, 2)
    volumes = torch.cat([smooth, smooth.clone(), torch.rand(1, 1, 32, 32, 32, generator=g) * 2 - 1])
    assert mean_pairwise_ms_ssim(volumes, 2.0, [(0, 1)]) == pytest.approx(1.0, abs=1e-4)
    assert mean_pairwise_ms_ssim(volumes, 2.0, [(0, 2), (1, 2)]) < 0.3
    with pytest.raises(ValueError, match="two volumes"):
        mean_pairwise_ms_ssim(volumes[:1], 2.0)


def test_ms_ssim_estimated_from_pairs_spread_through_the_list():
    pairs = [(i, j) for i in range(16) for j in range(i + 1, 16)]
    chosen = spread_pairs(pairs, 32)
    assert len(chosen) == 32 and len(set(chosen)) == 32
    assert chosen[0] == pairs[0] and chosen[-1] == pairs[-1]  # the ends of the list, not its first 32
    assert chosen == sorted(chosen, key=pairs.index) and chosen == spread_pairs(pairs, 32)
    assert spread_pairs(pairs, None) == pairs and spread_pairs(pairs[:5], 32) == pairs[:5]
    with pytest.raises(ValueError, match="max_pairs"):
        spread_pairs(pairs, 0)
    # the capped mean is the mean over exactly the chosen pairs: two copies and one noise volume
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 32, 32, 32, generator=g), 5, 1, 2)
    volumes = torch.cat([smooth, smooth.clone(), torch.rand(1, 1, 32, 32, 32, generator=g) * 2 - 1])
    three = [(0, 1), (0, 2), (1, 2)]
    assert spread_pairs(three, 2) == [(0, 1), (1, 2)]
    assert mean_pairwise_ms_ssim(volumes, 2.0, three, max_pairs=2) == pytest.approx(
        mean_pairwise_ms_ssim(volumes, 2.0, [(0, 1), (1, 2)]), abs=1e-6)


def test_frechet_distance_is_zero_for_one_set_and_the_squared_mean_shift_for_a_translated_copy():
    features = np.random.default_rng(1).normal(size=(40, 6))
    assert _frechet(features, features) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([3.0, 0, 0, 0, 0, 4.0])
    assert _frechet(features + shift, features) == pytest.approx(25.0, rel=1e-6)



def test_realism_table_reports_the_vae_reconstructions_next_to_the_generated_cts():
    from eval.generation_eval import TISSUES, realism_table

    row = {"share_real": 0.2, "share_generated": 0.1, "wasserstein_hu": 5.0}
    result = {"n_real": 4, "n_generated": 4, "frechet_generated_vs_test": 0.5, "frechet_validation_vs_test": 0.05,
              "n_reference": 4, "tissues": {name: row for name in TISSUES}, "ms_ssim": {"real, different patients": 0.7},
              "frechet_reconstructed_vs_test": 0.25,
              "tissues_reconstructed": {name: {**row, "share_generated": 0.15, "wasserstein_hu": 2.5} for name in TISSUES}}
    table = realism_table(result)
    assert "through the VAE (encoded and decoded, no diffusion): Frechet distance **0.250**" in table
    bone = next(line for line in table.splitlines() if line.startswith("| bone"))
    assert bone.split("|")[2:7] == [" 0.200 ", " 0.100 ", " 5.0 ", " 0.150 ", " 2.5 "]
    result["tissues_reconstructed"]["fat"]["wasserstein_hu"] = float("nan")  # no reconstructed voxel in range
    assert "| - (no voxels) |" in next(line for line in realism_table(result).splitlines() if line.startswith("| fat"))
    del result["tissues_reconstructed"], result["frechet_reconstructed_vs_test"]
    assert "VAE" not in realism_table(result)
