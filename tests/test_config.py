"""Presets load; a wrong key or type is an error naming the key and the file."""
from __future__ import annotations

from pathlib import Path

import pytest

from medvlm.config import load_config
from medvlm.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny", "demo", "hnc_gpu", "hnc_gpu_maisi"])
def test_presets_load(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.name == name
    assert len(config.data.preprocess.roi_size) == 3


def test_gpu_preset_uses_the_seed_roi():
    config = load_config(CONFIGS / "hnc_gpu.yaml")
    assert sorted(config.data.preprocess.roi_size) == [64, 352, 352]


def test_maisi_preset_builds_the_published_maisi_autoencoder():
    """hnc_gpu_maisi's autoencoder has the parameter names and shapes of MONAI's MAISI autoencoder as MAISI
    configures it (channels 64, 128, 256; 2 residual blocks per level; 32 groups; 4 latent channels), so the
    published state dict loads strictly; it stays frozen and reads MAISI's HU window."""
    import torch
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    from medvlm.models.factory import build_vae

    config = load_config(CONFIGS / "hnc_gpu_maisi.yaml")
    with torch.device("meta"):
        ours = build_vae(config.models, config.data.preprocess).network.state_dict()
        published = AutoencoderKlMaisi(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
                                       num_channels=[64, 128, 256], num_res_blocks=[2, 2, 2], norm_num_groups=32,
                                       norm_eps=1e-6, attention_levels=[False, False, False],
                                       with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
                                       use_convtranspose=False, num_splits=8, dim_split=1, norm_float16=True).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in published.items()}
    assert config.training.vae.steps == 0 and config.models.vae.pretrained_path.endswith(".pt")
    assert list(build_vae(config.models, config.data.preprocess).config.network_hu_window) == [-1000.0, 1000.0]


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  preprocess:\n    roi_sise: [64, 64, 64]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: data.preprocess: unknown key\(s\) \['roi_sise'\]"):
        load_config(path)


def test_wrong_type_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  phantom:\n    n_cases: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: data.phantom.n_cases: expected an integer, got 'many'"):
        load_config(path)


def test_wrong_length_and_invalid_yaml_are_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  preprocess:\n    roi_size: [64, 64]\n")
    with pytest.raises(ConfigError, match="roi_size: expected 3 values"):
        load_config(path)
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("models:\n  unet:\n    prior_rank: 8\n    channels: [8, 8, 8]\n    prior_rank: 16\n")
    with pytest.raises(ConfigError, match="not valid YAML.*key 'prior_rank' is given twice"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("models:\n  segmentation:\n    side_structures: [CTV_high]\n", r"side_structures: unknown structure\(s\) \['CTV_high'\]"),
    ("models:\n  segmentation:\n    presence_input: words\n", "presence_input must be 'fields', 'tokens' or 'both'"),
    ("models:\n  segmentation:\n    side_margin_mm: -1.0\n", "side_margin_mm must be >= 0"),
    ("training:\n  segmentation: {foreground_patches: 1.5}\n", r"foreground_patches must be in \[0, 1\], got 1.5"),
    ("training:\n  segmentation: {blur_prob: 2.0}\n", r"blur_prob must be a probability in \[0, 1\], got 2.0"),
    ("training:\n  segmentation: {low_resolution_prob: -0.1}\n", r"low_resolution_prob must be a probability"),
    ("training:\n  segmentation: {blur_sigma: [1.5, 0.5]}\n", r"blur_sigma must be \[low, high\] in voxels"),
    ("training:\n  segmentation: {blur_sigma: [0.0, 1.0]}\n", r"blur_sigma must be \[low, high\]"),
    ("training:\n  segmentation: {synthetic_share: 1.0}\n", r"synthetic_share must be null or in \[0, 1\), got 1.0"),
    ("training:\n  segmentation: {synthetic_share: half}\n", r"synthetic_share: value .half."),
])
def test_segmentation_settings_are_checked(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("", "the config file is empty"),
    ("training:\n  diffusion: {steps: -5}\n", r"training\.diffusion: steps must be >= 0"),
    ("training:\n  segmentation: {batch_size: 0}\n", r"training\.segmentation: batch_size must be >= 1, got 0"),
    ("training:\n  contrastive: {learning_rate: .nan}\n", r"training\.contrastive: learning_rate must be a finite number > 0"),
    ("training:\n  vae: {gradient_accumulation_steps: 0, max_grad_norm: -1.0}\n",
     r"gradient_accumulation_steps must be >= 1, got 0; max_grad_norm must be a finite number > 0"),
    ("training:\n  checkpoint_every: 0\n", "checkpoint_every, keep_checkpoints and log_every must be >= 1"),
    ("models:\n  vae: {mask_encoding: sdf}\n", "mask_encoding must be 'fraction' or 'distance'"),
    ("models:\n  unet: {fields_time: true, fields_token: false}\n", "fields_time needs models.unet.fields_token"),
    ("models:\n  unet: {canonical_side: upper}\n", "canonical_side must be null, 'left' or 'right'"),
    ("models:\n  unet: {canonical_side: left, fields_token: false}\n", "canonical_side needs models.unet.fields_token"),
    ("models:\n  unet: {prior_rank: -1}\n", "prior_rank must be an integer >= 0"),
    ("models:\n  unet: {prior_rank: 8, prior_strength: 0}\n", "prior_strength must be in"),
    ("models:\n  unet: {prior_strength: 0.5}\n", "set models.unet.prior_rank > 0"),
    ("models:\n  unet: {prior_rank: 8, prior_spread: -0.5}\n", "prior_spread must be null or a number >= 0"),
    ("models:\n  unet: {prior_rank: 8, prior_spread: yes}\n", "models.unet.prior_spread: value True matches none"),
    ("models:\n  unet: {prior_spread: 0.5}\n", "prior_spread shapes draws"),
    ("models:\n  vae: {mask_decoding: learned}\n", "mask_decoding must be one of"),
    ("models:\n  vae: {mask_decoding: fields, mask_encoding: fraction}\n", "set models.vae.mask_encoding: distance"),
    ("training:\n  diffusion: {snr_weighting: minsnr}\n", r"snr_weighting must be one of \[None, 'min_snr', 'clipped'\]"),
    ("training:\n  diffusion: {snr_weighting: min_snr, snr_gamma: 0}\n", "snr_gamma must be a number > 0, got 0"),
    ("training:\n  diffusion: {snr_weighting: clipped, prediction_type: epsilon}\n", "use it with prediction_type: v_prediction"),
    ("training:\n  diffusion: {snr_weighting: min_snr, prediction_type: flow_matching}\n", "flow_matching has no SNR schedule"),
])
def test_training_and_model_settings_out_of_range_are_errors_naming_the_setting(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_presets_resolve_by_name_for_every_command():
    from medvlm.config import preset_names, resolve_config_path

    assert {"demo", "tiny", "hnc_gpu"} <= set(preset_names())
    assert load_config("tiny") == load_config(resolve_config_path("tiny"))
    assert resolve_config_path("tiny").name == "tiny.yaml"
    with pytest.raises(ConfigError, match=r"no config file or preset named 'tinny'; presets: .*tiny"):
        load_config("tinny")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("missing/file.yaml")
