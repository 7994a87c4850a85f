"""Networks: shapes, gradients, bit-exact save/load, conditioning by the report, losses, configurations."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest
import torch

from medvlm.config import load_config
from medvlm.models.contrastive import clip_loss, semantic_matching_loss, semantic_targets, siglip_loss
from medvlm.models.factory import build_all, count_parameters_on_meta
from medvlm.models.vae import CTAutoencoderKL
from medvlm.models.zero_shot import ZeroShotClassifier
from medvlm.text.encoders import TextEncoder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def tiny():
    config = load_config(CONFIGS / "tiny.yaml")
    torch.manual_seed(0)
    return config, build_all(config)


@pytest.fixture(scope="module")
def tokenizer():
    return TextEncoder.from_pretrained("minilm").tokenizer


def _context(batch=2, length=7, dim=384, seed=0):
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))


def _contour_latents(encoded, mask_channels: int = 9):
    """The paired UNet's input when contouring: the CT latent and unknown (0) structure channels."""
    z = encoded.latent_dist.mode()
    return torch.cat([z, z.new_zeros(z.shape[0], mask_channels, *z.shape[2:])], dim=1)


def test_vae_shapes_features_and_compression(tiny):
    _, nets = tiny
    vae = nets["vae"]
    x = torch.randn(2, 1, 32, 32, 32)
    encoded = vae.encode(x, return_features=True)
    assert vae.compression == 4
    assert encoded.latent_dist.mean.shape == (2, 4, 8, 8, 8) and encoded.latent_dist.mean.dtype == torch.float32
    assert [tuple(f.shape[1:]) for f in encoded.features] == [(8, 32, 32, 32), (16, 16, 16, 16), (16, 8, 8, 8)]
    masks = (torch.rand(2, 9, 32, 32, 32) > 0.5).float()
    decoded = vae.decode(encoded.latent_dist.mode(), vae.encode_masks(masks))
    assert decoded.sample.shape == x.shape and decoded.mask_logits.shape == masks.shape
    assert vae.generation_channels == 4 + 9


def test_paired_autoencoder_encodes_structures_as_latent_fractions_and_needs_them_to_decode(tiny):
    vae = tiny[1]["vae"]
    masks = torch.zeros(1, 9, 32, 32, 32)
    masks[0, 0, :4, :4, :4] = 1.0  # one whole latent cell of the first structure
    masks[0, 1, :2, :4, :4] = 1.0  # half a cell of the second
    channels = vae.encode_masks(masks)
    assert channels.shape == (1, 9, 8, 8, 8)
    half = 0.5 if vae.config.mask_encoding == "distance" else 0.0  # the voxel fraction, or it mapped to [-1, 1]
    assert channels[0, 0, 0, 0, 0] == 1.0 and channels[0, 1, 0, 0, 0] == half and channels[0, 2].eq(-1.0).all()
    z = torch.randn(1, 4, 8, 8, 8)
    with pytest.raises(ValueError, match="structure channels"):
        vae.decode(z)
    with pytest.raises(ValueError, match="pairs 9"):
        vae.encode_masks(masks[:, :3])
    # the structure channels steer the decoded CT: the image follows the masks
    with torch.no_grad():
        a = vae.decode(z, channels).sample
        b = vae.decode(z, -torch.ones_like(channels)).sample
    assert (a - b).abs().max() > 1e-5
    joint = torch.cat([z * vae.config.scaling_factor, channels], dim=1)
    ct, structures = vae.split_latents(joint)
    assert torch.equal(ct, z) and torch.equal(structures, channels)


def test_distance_encoding_spreads_a_small_structure_over_its_channel_and_generation_latents_are_standardised():
    vae = CTAutoencoderKL(channels=(8, 8, 8), backbone="compact", mask_channels=2, mask_encoding="distance",
                          mask_distance=2.0, mask_shift=[-0.5, -1.0], mask_scale=[0.25, 0.05], scaling_factor=2.0)
    masks = torch.zeros(1, 2, 32, 32, 32)
    masks[0, 0, :2, :4, :4] = 1.0  # half of the corner latent cell; the second structure is absent
    channels = vae.encode_masks(masks)
    assert channels[0, 0, 0, 0, 0] == 0.5  # the voxel fraction where the structure is
    along = channels[0, 0, :, 0, 0]
    # elsewhere -tanh(distance / 2 cells): negative, falling with the distance, never reaching -1 nearby
    assert torch.allclose(along[1:], -torch.tanh(torch.arange(1.0, 8.0) / 2.0), atol=1e-6)
    assert channels[0, 1].eq(-1.0).all()
    with pytest.raises(ValueError, match="mask_encoding"):
        CTAutoencoderKL(mask_channels=2, mask_encoding="sdf")
    with pytest.raises(ValueError, match="mask_scale"):
        CTAutoencoderKL(mask_channels=2, mask_scale=[1.0])
    # generation latents: the CT latent times scaling_factor, the structure channels standardised; split inverts both
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        joint = vae.generation_latents(image, masks)
        ct, structures = vae.split_latents(joint)
        mode = vae.encode(image).latent_dist.mode()
    assert torch.allclose(joint[:, :4], mode * 2.0)
    assert torch.allclose(joint[:, 4], (channels[:, 0] + 0.5) / 0.25) and torch.allclose(joint[:, 5], torch.zeros(8, 8, 8))
    assert torch.allclose(ct, mode) and torch.allclose(structures, channels, atol=1e-6)
    with pytest.raises(ValueError, match="masks"):
        vae.generation_latents(image)


def test_vae_tiles_cover_large_volumes_and_check_tile_sizes(tiny):
    vae = tiny[1]["vae"]
    with torch.no_grad():
        z = vae.tiled_encode_mean(torch.randn(1, 1, 32, 48, 40), tile_size=(32, 32, 32))
        assert z.shape == (1, 4, 8, 12, 10)
        structures = -torch.ones(1, 9, 8, 12, 10)
        ct, logits = vae.tiled_decode(z, tile_size=(8, 8, 8), mask_latents=structures)
        assert ct.shape == (1, 1, 32, 48, 40) and logits.shape == (1, 9, 32, 48, 40)
        whole = vae.decode(z, structures)
        tiled, _ = vae.tiled_decode(z, tile_size=(8, 12, 10), mask_latents=structures)  # one tile = the whole latent
        assert torch.allclose(tiled, whole.sample, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the compression"):
        vae.tiled_encode_mean(torch.randn(1, 1, 32, 32, 32), tile_size=(30, 32, 32))


def test_unet_prediction_and_fused_features(tiny):
    unet = tiny[1]["unet"]
    out = unet(torch.randn(2, 13, 8, 8, 8), torch.tensor([1, 900]), _context(), return_features=True)
    assert out.sample.shape == (2, 13, 8, 8, 8)  # CT latent + the paired structure channels
    assert out.features[-1].shape == (2, unet.feature_channels, 8, 8, 8)


def test_unet_attention_is_torchs_fused_kernel_and_equals_monais_explicit_attention(tiny):
    unet = _as_if_trained(tiny[1]["unet"])
    blocks = [m for m in unet.modules() if hasattr(m, "use_flash_attention")]
    assert blocks and all(m.use_flash_attention for m in blocks)  # self- and cross-attention alike
    z = torch.randn(2, 13, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fused = unet(z, torch.tensor([3, 700]), _context()).sample
        for block in blocks:
            block.use_flash_attention = False
        explicit = unet(z, torch.tensor([3, 700]), _context()).sample
    assert explicit.abs().mean() > 1e-3
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)


def test_parsed_fields_reach_the_unet_as_a_context_token(tiny):
    unet = _as_if_trained(tiny[1]["unet"])
    size = unet.config.report_fields
    assert size > 0
    z = torch.randn(1, 13, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    left, right = torch.zeros(1, size), torch.zeros(1, size)
    left[0, 0], right[0, 1] = 1.0, 1.0
    with torch.no_grad():
        a = unet(z, 100, _context(1), report_fields=left).sample
        b = unet(z, 100, _context(1), report_fields=right).sample
        unknown = unet(z, 100, _context(1)).sample  # None: nothing parsed, the zero vector's token
        zeros = unet(z, 100, _context(1), report_fields=torch.zeros(1, size)).sample
    assert (a - b).abs().max() > 1e-5 and torch.equal(unknown, zeros)
    with pytest.raises(ValueError, match="report_fields has shape"):
        unet(z, 100, _context(1), report_fields=torch.zeros(1, size + 1))


def test_parsed_fields_in_the_timestep_embedding_reach_every_block_without_any_context_token_change():
    from medvlm.models.unet import ReportConditionedUNet3D

    torch.manual_seed(0)
    unet = ReportConditionedUNet3D(in_channels=5, out_channels=5, channels=(16, 16), attention_levels=(False, True),
                                   num_head_channels=8, cross_attention_dim=32, norm_num_groups=8, report_fields=4,
                                   fields_time=True)
    unet = _as_if_trained(unet)
    # with the token path removed, the fields still change the prediction: through the timestep embedding
    unet.fields_embedding.weight.data.zero_()
    unet.fields_embedding.bias.data.zero_()
    z, context = torch.randn(1, 5, 8, 8, 8), torch.randn(1, 3, 32)
    with torch.no_grad():
        a = unet(z, 10, context, report_fields=torch.tensor([[1.0, 0, 0, 0]])).sample
        b = unet(z, 10, context, report_fields=torch.tensor([[0, 1.0, 0, 0]])).sample
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="fields_time"):
        ReportConditionedUNet3D(report_fields=0, fields_time=True)


def test_segmentation_logits_at_full_resolution(tiny):
    _, nets = tiny
    x = torch.randn(1, 1, 32, 32, 32)
    encoded = nets["vae"].encode(x, return_features=True)
    fused = nets["unet"](_contour_latents(encoded), 0, _context(1), return_features=True).features[-1]
    logits = nets["segmentation"](fused, encoded.features, _context(1), image=x)
    assert logits.shape == (1, 9, 32, 32, 32)
    # the CT is required and it matters
    with pytest.raises(ValueError, match="needs image="):
        nets["segmentation"](fused, encoded.features, _context(1))
    other = nets["segmentation"](fused, encoded.features, _context(1), image=torch.randn_like(x))
    assert (other - logits).abs().max() > 1e-4
    with pytest.raises(ValueError, match="divisible by"):
        nets["segmentation"](fused, encoded.features, _context(1), image=torch.randn(1, 1, 30, 32, 32))


def test_report_path_starts_at_zero_then_carries_the_report(tiny):
    """The report path's head starts near zero (training starts from the image path); once it has
    weights, a different report changes the logits."""
    _, nets = tiny
    seg = copy.deepcopy(nets["segmentation"])
    x = torch.randn(1, 1, 32, 32, 32)
    encoded = nets["vae"].encode(x, return_features=True)
    fused = nets["unet"](_contour_latents(encoded), 0, _context(1), return_features=True).features[-1]
    a, b = _context(1), torch.randn_like(_context(1))
    with torch.no_grad():
        assert (seg(fused, encoded.features, a, image=x) - seg(fused, encoded.features, b, image=x)).abs().max() < 1e-2
        torch.nn.init.normal_(seg.report_head.conv.conv.weight, std=0.5)
        assert (seg(fused, encoded.features, a, image=x) - seg(fused, encoded.features, b, image=x)).abs().max() > 1e-4


def test_report_path_takes_the_whole_rois_coordinates_for_a_patch(tiny):
    """A patch cut from a larger ROI passes that ROI's voxel coordinates (cut the same way); without them the
    decoder uses the input's own grid, as for the whole ROIs the pipelines contour."""
    from medvlm.models.windows import coordinate_channels

    _, nets = tiny
    seg = copy.deepcopy(nets["segmentation"])
    x = torch.randn(1, 1, 32, 32, 32)
    encoded = nets["vae"].encode(x, return_features=True)
    fused = nets["unet"](_contour_latents(encoded), 0, _context(1), return_features=True).features[-1]
    roi = coordinate_channels(torch.zeros(1, 1, 64, 64, 64))
    with torch.no_grad():
        torch.nn.init.normal_(seg.report_head.conv.conv.weight, std=0.5)
        default = seg(fused, encoded.features, _context(1), image=x)
        assert torch.equal(default, seg(fused, encoded.features, _context(1), image=x, coordinates=coordinate_channels(x)))
        corner = seg(fused, encoded.features, _context(1), image=x, coordinates=roi[..., :32, :32, :32])
        assert (corner - default).abs().max() > 1e-4  # a corner of the ROI is not the ROI
        with pytest.raises(ValueError, match="coordinates size"):
            seg(fused, encoded.features, _context(1), image=x, coordinates=roi)


def test_presence_head_multiplies_probabilities_and_learns_what_the_report_rules_out(tiny):
    """P(voxel) = P(present | report) * P(voxel | present): the untrained head (0.98) changes little, a report
    that rules a structure out empties it whatever the image shows, the null report rules nothing out, and
    the head learns from token states which structures a report excludes."""
    from medvlm.models.segmentation import joint_logits

    a, b = torch.randn(50), torch.randn(50)
    assert torch.allclose(torch.sigmoid(joint_logits(a, b)), torch.sigmoid(a) * torch.sigmoid(b), atol=1e-6)
    assert torch.isfinite(joint_logits(torch.tensor([80.0, -80.0]), torch.tensor([-80.0, 80.0]))).all()

    _, nets = tiny
    seg = copy.deepcopy(nets["segmentation"]).eval()
    assert seg.config.presence_head
    x = torch.randn(1, 1, 32, 32, 32)
    encoded = nets["vae"].encode(x, return_features=True)
    fused = nets["unet"](_contour_latents(encoded), 0, _context(1), return_features=True).features[-1]
    with torch.no_grad():
        logits, presence = seg(fused, encoded.features, _context(1), image=x, return_presence=True)
        # per structure (anywhere, left, right): the tiny preset judges CTVn per side
        assert presence.shape == (1, 9, 3) and torch.allclose(torch.sigmoid(presence), torch.full((1, 9, 3), 0.982), atol=1e-3)
        null_logits, null_presence = seg(fused, encoded.features, null_report=True, image=x, return_presence=True)
        assert null_presence is None
        seg.presence[-1].bias[1 * 3] = -30.0  # the report says: no GTVn
        ruled_out = torch.sigmoid(seg(fused, encoded.features, _context(1), image=x))
        assert ruled_out[0, 1].max() < 1e-10 and torch.allclose(ruled_out[0, 0], torch.sigmoid(logits[0, 0]), atol=1e-6)
        assert torch.equal(seg(fused, encoded.features, null_report=True, image=x), null_logits)

    from medvlm.text.parse import label_vector, parse_report

    head = copy.deepcopy(nets["segmentation"])
    assert not head.config.presence_tokens  # the tiny preset's head reads the parsed fields only
    optimizer = torch.optim.Adam(head.presence.parameters(), lr=1e-2)
    states = torch.stack([_context(1, seed=1)[0], _context(1, seed=2)[0]])
    fields = torch.as_tensor(np.stack([label_vector(parse_report(f"Left tonsil SCC, cT2 {n} cM0.")) for n in ("cN0", "cN1")]))
    present = torch.ones(2, 9, 3)
    present[0, 1] = 0.0  # report 1: cN0 (no GTVn); report 2: nodes
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head.presence_logits(states, None, fields), present)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned = torch.sigmoid(head.presence_logits(states, None, fields))
    assert (learned[0, 1] < 0.2).all() and (learned[1, 1] > 0.8).all() and (learned[:, [0, 2]] > 0.8).all()
    with pytest.raises(ValueError, match="no presence head"):
        type(seg)(presence_head=False).presence_logits(states, None)


def test_side_presence_rules_out_the_contralateral_neck_from_the_parsed_report(tiny):
    """An ipsilateral elective neck: CTVn probabilities vanish beyond the midline band on the other side,
    stay untouched on the named side; the midline is the body's centroid, not the volume's centre; the
    parsed report fields reach the head; per-side targets come from the masks."""
    from medvlm.models.segmentation import side_presence_logits
    from medvlm.models.windows import midline_distance
    from medvlm.text.parse import LABEL_NAMES, label_vector, parse_report
    from train.data import structure_presence

    # the blend, against its definition; finite when saturated
    presence, distance = torch.randn(2, 1, 3), torch.linspace(-6, 6, 13).view(1, 1, -1, 1, 1).expand(2, 1, 13, 1, 1)
    weights = torch.stack([(-distance - 2) / 0.5, torch.zeros_like(distance), (distance - 2) / 0.5]).softmax(0)
    expected = sum(weights[j] * torch.sigmoid(presence[..., [1, 0, 2][j]])[..., None, None, None] for j in range(3))
    assert torch.allclose(torch.sigmoid(side_presence_logits(presence, distance, 2.0)), expected, atol=1e-6)
    assert torch.isfinite(side_presence_logits(torch.tensor([[[80.0, -80.0, 80.0]]]), distance[:1], 2.0)).all()

    # a body 16 voxels wide whose centre lies at x = 11.5 of a 32-voxel volume (air around it)
    x = torch.full((1, 1, 32, 32, 32), -1.0)
    x[:, :, 4:20] = 0.0
    distance = midline_distance(x)
    assert distance[0, 0, 11, 0, 0] == -0.5 and distance[0, 0, 12, 0, 0] == 0.5 and distance.shape == x.shape

    _, nets = tiny
    seg = copy.deepcopy(nets["segmentation"]).eval()
    assert seg.config.side_structures == ("CTVn",) and seg.config.report_fields == len(LABEL_NAMES)
    encoded = nets["vae"].encode(x, return_features=True)
    fused = nets["unet"](_contour_latents(encoded), 0, _context(1), return_features=True).features[-1]
    ctvn = 2
    with torch.no_grad():
        seg.presence[-1].bias[ctvn * 3:ctvn * 3 + 3] = 30.0  # present everywhere: the voxel probabilities alone
        free = torch.sigmoid(seg(fused, encoded.features, _context(1), image=x))[0, ctvn]
        seg.presence[-1].bias[ctvn * 3 + 2] = -30.0  # the report: left-sided elective neck only
        gated = torch.sigmoid(seg(fused, encoded.features, _context(1), image=x))[0, ctvn]
    margin = seg.config.side_margin
    right, left = distance[0, 0] > margin + 6, distance[0, 0] < -margin - 6  # beyond the band and its soft edge
    assert right.any() and left.any()
    assert gated[right].max() < 1e-4 and torch.allclose(gated[left], free[left], rtol=1e-4, atol=1e-6)
    band = distance[0, 0].abs() < 1  # mostly the overall presence (the tiny preset's band is 1 voxel wide)
    assert (gated[band] > 0.6 * free[band]).all()

    # the parsed fields are an input of the head: a report saying "right" and one saying "left" differ
    reports = ["Left tonsil SCC, cT2 cN1 cM0. Elective neck: ipsilateral.", "Right tonsil SCC, cT2 cN1 cM0. Elective neck: ipsilateral."]
    fields = torch.as_tensor([label_vector(parse_report(r)) for r in reports])
    assert not torch.equal(fields[0], fields[1])
    states = _context(1).expand(2, -1, -1)
    with torch.no_grad():
        head = seg.presence_logits(states, None, fields)
        assert head.shape == (2, 9, 3) and (head[0] - head[1]).abs().max() > 0
        assert torch.equal(seg.presence_logits(states, None), seg.presence_logits(states, None, torch.zeros_like(fields)))
    with pytest.raises(ValueError, match="report_fields must be"):
        seg.presence_logits(states, None, fields[:, :5])

    # targets: a structure left of the band only, one straddling the midline, one absent
    label = torch.zeros(3, 32, 32, 32)
    label[0, 5:8] = 1
    label[1, 10:14] = 1
    targets = structure_presence(label, distance[0], 2.0)
    assert targets.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="side_structures"):
        type(seg)(presence_head=True, side_structures=("CTV_high",))
    with pytest.raises(ValueError, match="needs report_fields"):
        type(seg)(presence_head=True, presence_tokens=False)
    reading_both = type(seg)(presence_head=True, report_fields=len(LABEL_NAMES), side_structures=("CTVn",))
    assert (reading_both.presence_logits(states[:1], None) - reading_both.presence_logits(_context(1, seed=5), None)).abs().max() > 0


def test_ct_windows_map_hounsfield_units():
    from medvlm.models.windows import CTWindows

    windows = CTWindows((-1000.0, 1500.0), (-1.0, 1.0), ((40.0, 400.0),))
    hu = torch.tensor([-1000.0, 40.0, 240.0, 1500.0])
    x = (hu + 1000.0) / 2500.0 * 2.0 - 1.0
    out = windows(x.view(1, 1, 4, 1, 1))
    assert out.shape == (1, 2, 4, 1, 1)
    assert torch.allclose(out[0, 0].flatten(), x)
    assert torch.allclose(out[0, 1].flatten(), torch.tensor([-1.0, 0.0, 1.0, 1.0]), atol=1e-5)
    with pytest.raises(ValueError, match="invalid CT windows"):
        CTWindows(windows=((40.0, 0.0),))


def _assert_all_trainable_have_gradients(module: torch.nn.Module, name: str):
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    assert missing == [], f"{name}: no gradient for {missing[:5]}"


def test_gradients_reach_every_trainable_parameter(tiny, tokenizer):
    _, nets = tiny
    vae, unet, seg, clip = nets["vae"], nets["unet"], nets["segmentation"], nets["contrastive"]
    for m in (vae, unet, seg, clip):
        m.zero_grad(set_to_none=True)
    x = torch.randn(2, 1, 32, 32, 32)
    encoded = vae.encode(x, return_features=True)
    posterior = encoded.latent_dist
    masks = (torch.rand(2, 9, 32, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    decoded = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(0)), vae.encode_masks(masks))
    ((decoded.sample - x).abs().mean() + decoded.mask_logits.sigmoid().mean() + 1e-3 * posterior.kl().mean()).backward()
    _assert_all_trainable_have_gradients(vae, "vae")

    latents = torch.cat([posterior.mode(), vae.encode_masks(masks)], dim=1).detach()

    fields = torch.rand(2, unet.config.report_fields, generator=torch.Generator().manual_seed(0))

    def unet_loss():
        out = unet(latents, torch.tensor([3, 500]), _context(), return_features=True, report_fields=fields)
        null = unet(latents, torch.tensor([3, 500]), None)  # the learned null report takes part too
        return (out.sample - 1).pow(2).mean() + (null.sample - 1).pow(2).mean()

    # diffusion UNets zero-initialise their output and residual-branch convolutions and attention
    # projections, so gradient reaches the deepest weights only after a few optimiser steps
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-2)
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        unet_loss().backward()
        optimizer.step()
    unet.zero_grad(set_to_none=True)
    unet_loss().backward()
    _assert_all_trainable_have_gradients(unet, "unet")

    features = [f.detach() for f in vae.encode(x, return_features=True).features]
    fused = unet(latents, 0, _context(), return_features=True).features[-1].detach()
    fields = torch.rand(2, seg.config.report_fields)  # the presence head reads parsed report fields
    (seg(fused, features, _context(), image=x, report_fields=fields).sigmoid().mean()
     + seg(fused, features, null_report=True, image=x).sigmoid().mean()).backward()
    _assert_all_trainable_have_gradients(seg, "segmentation")

    batch = tokenizer(["left tonsil", "right larynx", "midline nasopharynx"], padding=True, return_tensors="pt")
    result = clip(torch.randn(3, 1, 32, 32, 32), batch["input_ids"], batch["attention_mask"])
    clip_loss(result.image_embeds, result.text_embeds, result.logit_scale).backward()
    _assert_all_trainable_have_gradients(clip, "contrastive")
    assert not clip.text_model.embeddings.word_embeddings.weight.requires_grad  # frozen by configuration


@pytest.mark.parametrize("name", ["vae", "unet", "segmentation", "contrastive"])
def test_save_and_load_round_trip_is_bit_exact(tiny, tmp_path, name):
    module = tiny[1][name].eval()
    module.save_pretrained(tmp_path / name)
    files = {p.name for p in (tmp_path / name).iterdir()}
    assert "diffusion_pytorch_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    loaded = type(module).from_pretrained(tmp_path / name).eval()
    for (k1, v1), (k2, v2) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    with torch.no_grad():
        if name == "vae":
            x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
            masks = (torch.rand(1, 9, 32, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.5).float()
            assert torch.equal(module(x, masks).sample, loaded(x, masks).sample)
            assert torch.equal(module(x, masks).mask_logits, loaded(x, masks).mask_logits)
        elif name == "unet":
            z = torch.randn(1, 13, 8, 8, 8, generator=torch.Generator().manual_seed(1))
            assert torch.equal(module(z, 10, _context(1)).sample, loaded(z, 10, _context(1)).sample)


def _as_if_trained(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy with every parameter moved off its initial value: the zero- and near-zero-initialised output
    layers (diffusers' attention projections, the report path's head) make a fresh network ignore its
    conditioning by design, which a test of the conditioning must not depend on (nor on an earlier test's
    optimiser step)."""
    module = copy.deepcopy(module).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def test_report_conditions_the_unet_and_the_segmentation_decoder(tiny):
    _, nets = tiny
    unet, seg, vae = _as_if_trained(nets["unet"]), _as_if_trained(nets["segmentation"]), nets["vae"].eval()
    z = torch.randn(1, 13, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = unet(z, 100, _context(1, seed=1)).sample
        b = unet(z, 100, _context(1, seed=2)).sample
        n = unet(z, 100, None).sample
        assert (a - b).abs().max() > 1e-4 and (a - n).abs().max() > 1e-4
        ct = torch.randn(1, 1, 32, 32, 32)
        encoded = vae.encode(ct, return_features=True)
        fused = unet(_contour_latents(encoded), 0, _context(1), return_features=True).features[-1]
        s1 = seg(fused, encoded.features, _context(1, seed=1), image=ct)
        s2 = seg(fused, encoded.features, _context(1, seed=2), image=ct)
        s0 = seg(fused, encoded.features, null_report=True, image=ct)
        assert (s1 - s2).abs().max() > 1e-4 and (s1 - s0).abs().max() > 1e-4
        mask = torch.ones(1, 7, dtype=torch.long)
        mask[0, 4:] = 0  # padded report tokens are ignored
        padded = _context(1, seed=1)
        changed = padded.clone()
        changed[0, 4:] = 100.0
        assert torch.allclose(seg(fused, encoded.features, padded, mask, image=ct),
                              seg(fused, encoded.features, changed, mask, image=ct), atol=1e-5)


def test_semantic_matching_equals_clip_for_identity_labels_and_is_lower_when_labels_are_shared():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    assert torch.allclose(semantic_matching_loss(images, texts, scale, torch.eye(4)), clip_loss(images, texts, scale), atol=1e-6)
    # samples 0 and 1 share their findings and image 0 resembles report 1: CLIP punishes that, MedCLIP not
    texts_shared = texts.clone()
    texts_shared[1] = images[0]
    labels = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert semantic_matching_loss(images, texts_shared, scale, labels) < clip_loss(images, texts_shared, scale)
    targets = semantic_targets(labels)
    assert torch.allclose(targets.sum(1), torch.ones(4)) and targets[0, 1] == 0.5


def test_semantic_matching_with_label_phrases_pulls_matching_phrases_closer():
    """Text-label pairs: rectangular soft targets; a phrase matching nothing in the batch is left out."""
    labels = torch.tensor([[1.0, 0, 1.0, 0], [0, 1.0, 0, 1.0]])  # two cases (side, stage)
    phrase_labels = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]])  # left, right, nothing known
    targets = semantic_targets(labels, phrase_labels)
    assert targets.shape == (2, 3) and torch.allclose(targets, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    g = torch.Generator().manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    aligned = torch.cat([embeds, torch.nn.functional.normalize(torch.randn(1, 8, generator=g), dim=-1)])
    swapped = aligned[[1, 0, 2]]
    good = semantic_matching_loss(embeds, aligned, scale, labels, phrase_labels)
    bad = semantic_matching_loss(embeds, swapped, scale, labels, phrase_labels)
    assert torch.isfinite(good) and good < bad


def test_label_phrases_state_one_known_field_in_training_words():
    from medvlm.text.parse import LABEL_NAMES, label_vector, parse_report
    from medvlm.text.prompts import CLASS_PROMPT_TEMPLATES, LABEL_SET_PHRASES, label_phrases

    labels = label_vector(parse_report("Left tonsil squamous cell carcinoma, cT2 cN1 cM0. Elective neck: ipsilateral."))
    pairs = label_phrases(labels, np.random.default_rng(0), 40)
    assert len(pairs) == 40
    evaluation = {t.format(p) for phrases in LABEL_SET_PHRASES.values() for p in phrases.values() for t in CLASS_PROMPT_TEMPLATES}
    for text, vector in pairs:
        assert vector.sum() == 1.0 and labels[vector.argmax()] == 1.0  # one field, one the case has
        assert LABEL_NAMES[int(vector.argmax())].split("=")[1].lower() in text.lower()
        assert text not in evaluation  # zero-shot prompts stay unseen
    assert len({LABEL_NAMES[int(v.argmax())].split("=")[0] for _, v in pairs}) >= 3
    assert label_phrases(np.zeros_like(labels), np.random.default_rng(0), 3) == []


def test_siglip_loss_runs():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    assert torch.isfinite(siglip_loss(a, a, torch.tensor(10.0), torch.tensor(-10.0)))


def test_zero_shot_probabilities_for_reports_and_images(tiny, tokenizer):
    clip = tiny[1]["contrastive"].eval()
    classifier = ZeroShotClassifier(clip, tokenizer)
    names, probs = classifier.classify_reports(["Right tonsil SCC, cT2 N1.", "Left larynx, cT1 N0."], ["left", "right"], "laterality")
    assert names == ["left", "right"] and probs.shape == (2, 2)
    assert torch.allclose(probs.sum(1), torch.ones(2))
    names, probs = classifier.classify_images(torch.randn(2, 1, 32, 32, 32), {"bulky": ["a bulky tumour"], "none": ["no tumour"]})
    assert names == ["bulky", "none"] and probs.shape == (2, 2)
    with pytest.raises(ValueError, match="at least two classes"):
        classifier.classify_reports(["x"], ["only"])


def test_gpu_preset_instantiates_on_the_meta_device():
    counts = count_parameters_on_meta(load_config(CONFIGS / "hnc_gpu.yaml"))
    print("hnc_gpu parameters:", {k: f"{v / 1e6:.1f}M" for k, v in counts.items()}, f"total {sum(counts.values()) / 1e6:.1f}M")
    demo = count_parameters_on_meta(load_config(CONFIGS / "demo.yaml"))
    assert counts["unet"] > 50 * demo["unet"] and counts["vae"] > 50 * demo["vae"]


def test_tiny_paligemma_trains_generates_saves_and_reloads_offline(tmp_path):
    from medvlm.data.phantom import HNCPhantom, PhantomConfig
    from medvlm.models.report_generator import (
        build_tiny_paligemma,
        drafting_batch,
        load_report_generator,
        render_ct,
        train_report_tokenizer,
    )

    phantom = HNCPhantom(PhantomConfig(shape=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0)), seed=0)
    reports = [phantom.record_and_report(i)[1].text for i in range(6)]
    tokenizer = train_report_tokenizer(reports, vocab_size=300)
    from medvlm.config import ReportGeneratorModelConfig

    model, processor = build_tiny_paligemma(tokenizer, ReportGeneratorModelConfig(image_size=32, patch_size=16, vision_hidden_size=32,
                                                                      vision_layers=1, text_hidden_size=32, text_layers=1))
    image = render_ct(phantom.case(0).image_hu, image_size=32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    batch = drafting_batch(processor, [image, image], ["left tonsil cT2", "right larynx cT1"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    prompt = drafting_batch(processor, [image])
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    model.save_pretrained(tmp_path / "rg")
    processor.save_pretrained(tmp_path / "rg")
    code = (f"from medvlm.models.report_generator import load_report_generator, drafting_batch; import numpy as np, torch;"
            f"m, p = load_report_generator({str(tmp_path / 'rg')!r}); img = np.load({str(tmp_path / 'img.npy')!r});"
            f"print(m.generate(**drafting_batch(p, [img]), max_new_tokens=6, do_sample=False)[0].tolist())")
    np.save(tmp_path / "img.npy", image)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(generated[0].tolist())
    with pytest.raises(Exception, match="local folders"):
        load_report_generator(tmp_path / "missing")


def test_models_load_by_module_path_in_a_fresh_interpreter(tiny, tmp_path):
    tiny[1]["segmentation"].save_pretrained(tmp_path / "seg")
    code = (f"import importlib, json; cfg = json.load(open({str(tmp_path / 'seg' / 'config.json')!r}));"
            f"cls = getattr(importlib.import_module('medvlm.models'), cfg['_class_name']);"
            f"print(type(cls.from_pretrained({str(tmp_path / 'seg')!r})).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "FusedSegmentationDecoder"


@pytest.mark.parametrize("layers, embeddings, frozen_layers, embeddings_frozen", [
    (0, False, 0, False),  # everything trains
    (0, True, 0, True),  # every layer trains, the embeddings stay
    (1, False, 1, True),  # a frozen layer always freezes the embeddings under it
])
def test_text_tower_freezing(layers, embeddings, frozen_layers, embeddings_frozen):
    from medvlm.models import MedCLIPModel

    text_config = {"model_type": "bert", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}
    clip = MedCLIPModel(text_config=text_config, embed_dim=8, image_block_inplanes=(4, 4, 4, 4),
                        frozen_text_layers=layers, freeze_text_embeddings=embeddings)
    trainable = [all(p.requires_grad for p in layer.parameters()) for layer in clip.text_model.encoder.layer]
    assert trainable == [i >= frozen_layers for i in range(2)]
    assert all(p.requires_grad != embeddings_frozen for p in clip.text_model.embeddings.parameters())
    assert clip.config.freeze_text_embeddings == embeddings  # saved with the model
