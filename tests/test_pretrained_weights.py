"""Pretrained weights from local files in their upstream layouts: MONAI MAISI's autoencoder state dict, Hugging Face
text encoders (BERT-like and Llama-architecture folders) and PaliGemma folders. Each is a tiny randomly initialised
model written the way upstream writes it; none is downloaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medvlm.config import load_config
from medvlm.errors import ConfigError, InputError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# a MAISI autoencoder of the published architecture, at a test's size (published: channels 64, 128, 256;
# num_res_blocks 2; norm_num_groups 32)
MAISI_TINY = dict(channels=[8, 16, 16], num_res_blocks=1, norm_num_groups=4, latent_channels=4)


def _maisi_config(**vae):
    config = load_config(CONFIGS / "tiny.yaml")
    for key, value in {"backbone": "maisi", "mask_decoding": "fields", **MAISI_TINY, **vae}.items():
        setattr(config.models.vae, key, value)
    config.models.vae.__post_init__()
    return config


def _upstream_maisi(seed: int = 0, channels=(8, 16, 16)):
    """MONAI's own ``AutoencoderKlMaisi``, built as MAISI's configuration builds it (not through medvlm)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    torch.manual_seed(seed)
    return AutoencoderKlMaisi(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
                              num_channels=list(channels), num_res_blocks=[1] * len(channels), norm_num_groups=4,
                              norm_eps=1e-6, attention_levels=[False] * len(channels), with_encoder_nonlocal_attn=False,
                              with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=False,
                              norm_float16=False, num_splits=2, dim_split=1).eval()


@pytest.fixture(scope="module")
def maisi_file(tmp_path_factory):
    """A MAISI checkpoint as MONAI's scripts write it: ``{"unet_state_dict": autoencoder.state_dict()}``."""
    net = _upstream_maisi()
    path = tmp_path_factory.mktemp("maisi") / "autoencoder_epoch273.pt"
    torch.save({"unet_state_dict": net.state_dict()}, path)
    return path, net


def test_maisi_checkpoint_loads_strictly_and_reads_ct_the_way_maisi_does(maisi_file):
    """Loaded from the upstream ``.pt``, medvlm's autoencoder is MAISI's network behind a change of intensity
    range: the model range (-1000..1500 HU -> [-1, 1]) becomes MAISI's input (-1000..1000 HU -> [0, 1], clipped)
    and MAISI's output comes back in the model range."""
    from train.stage_vae import load_pretrained_vae

    path, net = maisi_file
    vae = load_pretrained_vae(path, _maisi_config()).eval()
    hu = torch.linspace(-1100.0, 1400.0, 32 ** 3).reshape(1, 1, 32, 32, 32)
    model_range = (hu + 1000.0) / 2500.0 * 2.0 - 1.0
    maisi_input = ((hu + 1000.0) / 2000.0).clamp(0.0, 1.0)
    with torch.no_grad():
        mean, _ = net.encode(maisi_input)
        ours = vae.encode(model_range).latent_dist.mean
        assert torch.allclose(ours, mean, atol=1e-5)
        decoded = vae.decode(mean).sample
        expected_hu = net.decode(mean) * 2000.0 - 1000.0
    assert torch.allclose((decoded + 1.0) / 2.0 * 2500.0 - 1000.0, expected_hu, atol=1e-2)
    assert vae.compression == 4


def test_maisi_autoencoder_round_trips_in_safetensors_with_encoder_features_for_the_decoder(maisi_file, tmp_path):
    from medvlm.models import CTAutoencoderKL
    from train.stage_vae import load_pretrained_vae

    vae = load_pretrained_vae(maisi_file[0], _maisi_config(mask_channels=9)).eval()
    vae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    again = CTAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    x = torch.rand(1, 1, 32, 32, 32) * 2 - 1
    masks = torch.zeros(1, 9, 32, 32, 32)
    masks[:, 2, 8:20, 8:20, 8:20] = 1
    with torch.no_grad():
        a, b = vae.encode(x, return_features=True), again.encode(x, return_features=True)
        assert torch.equal(a.latent_dist.mean, b.latent_dist.mean)
        assert [f.shape[1] for f in a.features] == MAISI_TINY["channels"]  # the segmentation decoder's skips
        assert [f.shape[2] for f in a.features] == [32, 16, 8]
        out = again.decode(a.latent_dist.mean, again.encode_masks(masks))
    # MAISI's decoder draws the CT; the paired structures are read from their own channels
    assert out.sample.shape == (1, 1, 32, 32, 32) and out.mask_logits.shape == (1, 9, 32, 32, 32)
    inside = out.mask_logits[0, 2] > 0
    assert inside[10:18, 10:18, 10:18].all() and not inside[:4].any() and not (out.mask_logits[0, 0] > 0).any()


def test_wrong_maisi_files_are_clear_errors_and_code_is_never_run(maisi_file, tmp_path):
    from train.stage_vae import load_pretrained_vae

    path, net = maisi_file
    config = _maisi_config()
    state = net.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("decoder.blocks.2")}, tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="missing keys: decoder.blocks.2"):
        load_pretrained_vae(tmp_path / "missing.pt", config)
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match="unexpected keys: extra.weight"):
        load_pretrained_vae(tmp_path / "extra.pt", config)
    torch.save(_upstream_maisi(channels=(8, 16, 32)).state_dict(), tmp_path / "wider.pt")
    with pytest.raises(ConfigError, match="shape mismatches"):
        load_pretrained_vae(tmp_path / "wider.pt", config)
    # DDP checkpoints ("module." prefix) and bare state dicts load
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    assert load_pretrained_vae(tmp_path / "ddp.pt", config).config.backbone == "maisi"
    # a pickle that would run code when unpickled is refused, and nothing runs
    marker = tmp_path / "ran"
    (tmp_path / "code.pt").write_bytes(_pickle_that_writes(marker))
    with pytest.raises(ConfigError, match="refused"):
        load_pretrained_vae(tmp_path / "code.pt", config)
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="not a readable weights file"):
        load_pretrained_vae(tmp_path / "cut.pt", config)
    with pytest.raises(ConfigError, match="backbone: maisi"):
        load_pretrained_vae(path, load_config(CONFIGS / "tiny.yaml"))
    with pytest.raises(ConfigError, match="mask_decoding: fields"):
        _maisi_config(mask_channels=9, mask_decoding="joint")


def _pickle_that_writes(marker: Path) -> bytes:
    import pickle

    class WritesAFile:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    return pickle.dumps({"unet_state_dict": WritesAFile()})


def test_a_frozen_maisi_autoencoder_carries_report_to_ct_and_contouring(maisi_file, tmp_path):
    """Freeze-and-train: ``training.vae.steps: 0`` exports MAISI's weights unchanged with the latent scaling
    factor measured on the data; the diffusion UNet and the segmentation decoder are built on its latents and
    encoder features, and both pipelines run and round-trip."""
    from medvlm.config import PhantomDataConfig
    from medvlm.data.phantom import HNCPhantom, PhantomConfig
    from medvlm.data.writer import write_phantom_dataset
    from medvlm.models import CTAutoencoderKL
    from pipelines import ContourPipeline, ReportToCTPipeline
    from pipelines.assemble import build_pipelines
    from train.stage_vae import VAETrainer

    config = _maisi_config(mask_channels=9, mask_encoding="distance", pretrained_path=str(maisi_file[0]))
    config.training.vae.steps = 0
    data = tmp_path / "data"
    write_phantom_dataset(data, PhantomDataConfig(**{**config.data.phantom.__dict__, "n_cases": 6, "previews": 0}))
    VAETrainer(config, data, tmp_path / "run").run()
    vae = CTAutoencoderKL.from_pretrained(tmp_path / "run" / "vae" / "final" / "vae")
    for key, value in maisi_file[1].state_dict().items():
        assert torch.equal(vae.network.state_dict()[key], value), key
    assert vae.config.scaling_factor != 1.0 and len(vae.config.mask_field_thresholds) == 9

    torch.manual_seed(0)
    pipes = build_pipelines(config, components={"vae": vae}, report_texts=["left tonsil carcinoma"] * 4)
    generator = pipes["report_to_ct"]
    out = generator("Left tonsil carcinoma cT2 cN1.", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.ct.shape[-3:] == (32, 32, 32) and out.masks.shape[1] == 9
    generator.save_pretrained(tmp_path / "r2ct")
    again = ReportToCTPipeline.from_pretrained(tmp_path / "r2ct")
    assert again.vae.config.backbone == "maisi"
    twice = again("Left tonsil carcinoma cT2 cN1.", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(out.ct, twice.ct) and np.array_equal(out.masks, twice.masks)

    case = HNCPhantom(PhantomConfig(shape=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0)), seed=0).case(1)
    contour = pipes["contour"]
    report = "Left tonsil carcinoma cT2 cN1."
    masks = contour(case.image_hu, report, spacing_mm=case.spacing_mm).masks[0]
    contour.save_pretrained(tmp_path / "contour")
    reloaded = ContourPipeline.from_pretrained(tmp_path / "contour")
    assert reloaded.vae.config.backbone == "maisi"
    again = reloaded(case.image_hu, report, spacing_mm=case.spacing_mm).masks[0]
    assert set(masks) == set(again) and len(masks) == 9
    for name in masks:
        assert masks[name].shape == case.image_hu.shape and np.array_equal(masks[name], again[name]), name


# ------------------------------------------------------------------------------------------ text towers
def _word_tokenizer(bos: str, eos: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["left right tonsil base of tongue carcinoma cT1 cT2 cT3 cT4 cN0 cN1 cN2 cN3 elective neck levels",
              "no nodes bilateral ipsilateral parotid spinal cord mandible larynx . ,"]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", bos, eos]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos)


def _tiny_text_folder(folder: Path, architecture: str) -> Path:
    """A BERT-like encoder or a Llama-architecture decoder LM written with ``save_pretrained``, as on the Hub."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    tokenizer = _word_tokenizer("[CLS]", "[SEP]") if architecture == "bert" else _word_tokenizer("<s>", "</s>")
    torch.manual_seed(0)
    if architecture == "bert":
        model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128))
    else:
        model = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("architecture", ["bert", "llama"])
def test_a_local_text_encoder_folder_is_the_report_tower_of_every_model(architecture, tmp_path):
    """``text.encoder: /path``: the contrastive report tower is the folder's model with its weights, and the
    diffusion UNet and the segmentation decoder attend to its hidden states (their context width is its width)."""
    from medvlm.data.phantom import HNCPhantom, PhantomConfig
    from medvlm.models.factory import build_all
    from medvlm.text.encoders import TextEncoder
    from pipelines.assemble import build_pipelines

    folder = _tiny_text_folder(tmp_path / architecture, architecture)
    config = load_config(CONFIGS / "tiny.yaml")
    config.text.encoder = str(folder)
    components = build_all(config)
    assert components["unet"].config.cross_attention_dim == 32
    loaded = TextEncoder.from_pretrained(folder)
    assert loaded.pooling == ("last_token" if architecture == "llama" else "mean")
    tower = components["contrastive"].text_model
    for name, value in loaded.model.state_dict().items():  # the tower starts from the folder's weights
        assert torch.equal(tower.state_dict()[name], value), name
    # tiny.yaml freezes the token embeddings and the lowest 5 layers: here every layer of either architecture
    assert not tower.get_input_embeddings().weight.requires_grad
    layers = tower.encoder.layer if architecture == "bert" else tower.layers
    assert len(layers) == 2 and not any(p.requires_grad for p in layers.parameters())

    torch.manual_seed(0)
    pipes = build_pipelines(config, report_texts=["left tonsil carcinoma"] * 4)
    report = "Left tonsil carcinoma cT2 cN1, ipsilateral elective neck."
    out = pipes["report_to_ct"](report, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.ct.shape[-3:] == (32, 32, 32) and np.isfinite(out.ct).all()
    case = HNCPhantom(PhantomConfig(shape=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0)), seed=0).case(1)
    masks = pipes["contour"](case.image_hu, report, spacing_mm=case.spacing_mm).masks[0]
    assert len(masks) == 9
    probabilities = pipes["zero_shot"](reports=[report], labels={"side": ["left", "right"]}).report_probabilities["side"]
    assert probabilities.shape == (1, 2) and np.isclose(probabilities.sum(), 1.0, atol=1e-5)


def test_text_folders_of_another_kind_or_with_custom_code_are_refused(tmp_path):
    import json

    from medvlm.text.encoders import TextEncoder

    custom = _tiny_text_folder(tmp_path / "custom", "bert")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my_clinical_bert", auto_map={"AutoModel": "modeling_mine.MyModel"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_mine.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('code ran')\n")
    with pytest.raises(InputError, match="could not load a text encoder"):
        TextEncoder.from_pretrained(custom)
    assert not (tmp_path / "ran").exists()
    # a model folder without a tokenizer (a vision model) is not a text encoder
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=16)).save_pretrained(tmp_path / "vit")
    with pytest.raises(InputError, match="could not load a text encoder"):
        TextEncoder.from_pretrained(tmp_path / "vit")


# ------------------------------------------------------------------------------------------ PaliGemma drafter
def test_a_local_paligemma_folder_drafts_through_the_pipeline_and_other_models_are_refused(tmp_path):
    from transformers import PaliGemmaProcessor

    from medvlm.config import ReportGeneratorModelConfig
    from medvlm.data.phantom import HNCPhantom, PhantomConfig
    from medvlm.models.report_generator import build_tiny_paligemma, load_report_generator, train_report_tokenizer
    from pipelines import ReportGenerationPipeline
    from pipelines.assemble import build_pipelines

    # a PaliGemma 2-architecture folder as save_pretrained writes it: model, processor (SigLIP image processor at
    # the model's image size, tokenizer with the <image> token)
    tokenizer = train_report_tokenizer(["left tonsil carcinoma cT2 cN1", "right larynx cT1 cN0"], vocab_size=300)
    model, processor = build_tiny_paligemma(tokenizer, ReportGeneratorModelConfig(
        image_size=48, patch_size=16, vision_hidden_size=32, vision_layers=1, text_hidden_size=32, text_layers=1))
    model.save_pretrained(tmp_path / "paligemma2-tiny")
    processor.save_pretrained(tmp_path / "paligemma2-tiny")
    config = load_config(CONFIGS / "tiny.yaml")
    config.models.report_generator.pretrained_path = str(tmp_path / "paligemma2-tiny")
    generator, loaded_processor = load_report_generator(config.models.report_generator.pretrained_path)
    assert isinstance(loaded_processor, PaliGemmaProcessor)
    pipes = build_pipelines(config, components={"report_generator": generator, "report_processor": loaded_processor})
    case = HNCPhantom(PhantomConfig(shape=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0)), seed=0).case(1)
    drafting = pipes["report_generation"]
    first = drafting(case.image_hu, spacing_mm=case.spacing_mm, max_new_tokens=5).reports
    drafting.save_pretrained(tmp_path / "drafting")
    again = ReportGenerationPipeline.from_pretrained(tmp_path / "drafting")
    # the CT is rendered at the folder's image size (48 here; 224 or 448 for PaliGemma 2)
    assert again.report_processor.image_processor.size["height"] == 48
    assert again(case.image_hu, spacing_mm=case.spacing_mm, max_new_tokens=5).reports == first

    _tiny_text_folder(tmp_path / "bert", "bert")
    with pytest.raises(InputError, match="'bert' model"):
        load_report_generator(tmp_path / "bert")
    gemma3 = tmp_path / "medgemma"
    gemma3.mkdir()
    (gemma3 / "config.json").write_text('{"model_type": "gemma3"}')
    with pytest.raises(InputError, match="MedGemma"):
        load_report_generator(gemma3)
