"""PaliGemma2 report drafter: ``transformers.PaliGemmaForConditionalGeneration`` on CT renderings.

Two ways in: a tiny configuration (SigLIP vision + Gemma2 text) trained from scratch with a byte-level
BPE tokenizer learnt offline on report text (``tokenizers``), or real PaliGemma2 weights and processor
from a user's local folder. A CT volume becomes the model's image through :func:`render_ct` (a
soft-tissue-window montage of axial slices).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from medvlm.config import ReportGeneratorModelConfig
from medvlm.data.transforms import map_intensity
from medvlm.errors import InputError

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")
PROMPT = "<image>draft ct neck report"


def train_report_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Byte-level BPE learnt on (de-identified) report text, wrapped as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def build_processor(tokenizer, image_size: int, patch_size: int):
    """A ``PaliGemmaProcessor`` built locally (SigLIP image processor + the given tokenizer)."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor.image_seq_length = (image_size // patch_size) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_paligemma(tokenizer, spec: ReportGeneratorModelConfig | None = None, seed: int = 0, *,
                         with_processor: bool = True):
    """A randomly initialised PaliGemma2-architecture model sized for CPU training, and its processor
    (``None`` with ``with_processor=False``)."""
    from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    spec = spec or ReportGeneratorModelConfig()
    vision = SiglipVisionConfig(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                                num_hidden_layers=spec.vision_layers, num_attention_heads=spec.num_heads,
                                image_size=spec.image_size, patch_size=spec.patch_size, num_channels=3)
    head_dim = spec.text_hidden_size // spec.num_heads
    text = Gemma2Config(vocab_size=len(tokenizer), hidden_size=spec.text_hidden_size,
                        intermediate_size=2 * spec.text_hidden_size, num_hidden_layers=spec.text_layers,
                        num_attention_heads=spec.num_heads, num_key_value_heads=1, head_dim=head_dim,
                        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             projection_dim=spec.text_hidden_size, hidden_size=spec.text_hidden_size,
                             vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, (build_processor(tokenizer, spec.image_size, spec.patch_size) if with_processor else None)


def load_report_generator(folder: str | os.PathLike):
    """Model and processor from a local folder (ours or real ``paligemma2-*`` weights); never downloads."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    import json

    folder = Path(folder).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise InputError(f"report generator folder {folder} not found or has no config.json; medvlm loads "
                         "PaliGemma2 only from local folders (download the weights yourself, then pass the path)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"report generator folder {folder}: config.json is not a JSON object ({exc})") from None
    if model_type != "paligemma":
        hint = (" (MedGemma and Gemma 3 use another prompt format and processor, not supported as the drafter)"
                if str(model_type).startswith("gemma3") else "")
        raise InputError(f"report generator folder {folder} holds a {model_type!r} model; the drafter loads "
                         f"PaliGemma-architecture folders (model_type 'paligemma': PaliGemma, PaliGemma 2){hint}")
    try:
        model = PaliGemmaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        processor = PaliGemmaProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"could not load PaliGemma2 from {folder}: {exc}") from None
    return model, processor


def render_ct(volume: np.ndarray | torch.Tensor, *, image_size: int = 64, num_slices: int = 9,
              window_hu: tuple[float, float] = (40.0, 400.0), input_is_hu: bool = True,
              value_range: tuple[float, float] = (-1000.0, 1500.0),
              model_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """CT (X, Y, Z) -> RGB uint8 montage (image_size x image_size) of ``num_slices`` axial slices.

    Slices are evenly spaced through the volume, shown in radiological convention with a soft-tissue
    window (level, width). Preprocessed volumes (``input_is_hu=False``) are mapped back from
    ``model_range`` (the preprocessing's ``output_range``) to ``value_range`` (its ``hu_window``) first.
    """
    array = volume.detach().cpu().float().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume, dtype=np.float32)
    array = np.squeeze(array)
    if array.ndim != 3:
        raise InputError(f"render_ct needs a 3D volume, got shape {array.shape}")
    if not input_is_hu:
        array = map_intensity(array, model_range, value_range)
    level, width = window_hu
    shown = np.clip((array - (level - width / 2)) / width, 0.0, 1.0)
    grid = int(np.ceil(np.sqrt(num_slices)))
    depth = shown.shape[2]
    indices = np.linspace(depth * 0.1, depth * 0.9, num_slices).round().astype(int).clip(0, depth - 1)
    tile = image_size // grid
    canvas = np.zeros((grid * tile, grid * tile), dtype=np.float32)
    for n, k in enumerate(indices):
        axial = shown[::-1, ::-1, k].T  # anterior up, patient's right on the left
        tensor = torch.from_numpy(np.ascontiguousarray(axial))[None, None]
        resized = torch.nn.functional.interpolate(tensor, size=(tile, tile), mode="bilinear", align_corners=False)[0, 0]
        r, c = divmod(n, grid)
        canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = resized.numpy()
    if canvas.shape[0] != image_size:
        padded = np.zeros((image_size, image_size), dtype=np.float32)
        padded[: canvas.shape[0], : canvas.shape[1]] = canvas
        canvas = padded
    return np.repeat((canvas * 255).round().astype(np.uint8)[..., None], 3, axis=2)


# tokens one drafted report may have: a CT neck report is a few hundred tokens; more is a runaway loop
MAX_NEW_TOKENS = 1024


def check_max_new_tokens(value, model=None, prompt_length: int = 0) -> int:
    """``max_new_tokens`` as an int in 1..:data:`MAX_NEW_TOKENS` that also fits the model's positions after a
    prompt of ``prompt_length`` tokens; otherwise a ``ValueError`` naming the limit."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`max_new_tokens` must be an integer, got {value!r}")
    limit = MAX_NEW_TOKENS
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions is not None:
        limit = min(limit, int(positions) - int(prompt_length))
    if not 1 <= int(value) <= limit:
        raise ValueError(f"`max_new_tokens` must be in 1..{limit} (the ceiling of a drafted report"
                         f"{', within the model positions after the prompt' if limit < MAX_NEW_TOKENS else ''}), got {value}")
    return int(value)


def drafting_batch(processor, images: Sequence[np.ndarray], reports: Sequence[str] | None = None, *,
                   max_length: int | None = None):
    """Processor inputs for training (with ``reports`` as suffix -> ``labels``) or generation."""
    prompts = [PROMPT] * len(images)
    kwargs = {"suffix": list(reports)} if reports is not None else {}
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    return processor(text=prompts, images=list(images), return_tensors="pt", padding="longest", **kwargs)
