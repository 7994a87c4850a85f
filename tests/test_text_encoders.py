"""Text encoders: embedded MiniLM offline, local encoder folders, local decoder LMs, truncation and errors."""
from __future__ import annotations

import logging

import pytest
import torch

from medvlm.errors import InputError
from medvlm.text.encoders import TextEncoder


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.from_pretrained("minilm", max_length=64)


def test_embedded_minilm_loads_offline_and_returns_states_mask_pooled(minilm):
    with torch.no_grad():
        out = minilm(["left tonsil carcinoma, bilateral neck", "right oral tongue"])
    assert out.token_states.shape[0] == 2 and out.token_states.shape[2] == 384 == minilm.hidden_size
    assert out.attention_mask.shape == out.token_states.shape[:2]
    assert out.pooled.shape == (2, 384)
    assert not torch.allclose(out.pooled[0], out.pooled[1])


def test_over_long_reports_are_truncated_with_a_count(minilm, caplog):
    with caplog.at_level(logging.WARNING, logger="medvlm"):
        with torch.no_grad():
            out = minilm(["tumour " * 200])
    assert out.token_states.shape[1] == 64
    assert "tokens dropped" in caplog.text and "max_length=64" in caplog.text


def test_empty_report_is_an_error(minilm):
    with pytest.raises(InputError, match="empty"):
        minilm(["a report", ""])


def test_hub_names_are_refused_without_download():
    with pytest.raises(InputError, match="never downloads"):
        TextEncoder.from_pretrained("emilyalsentzer/Bio_ClinicalBERT")


def test_local_encoder_folder_round_trip(minilm, tmp_path):
    minilm.save_pretrained(tmp_path / "enc")
    again = TextEncoder.from_pretrained(tmp_path / "enc", max_length=64)
    with torch.no_grad():
        assert torch.equal(minilm(["same text"]).pooled, again(["same text"]).pooled)


def _tiny_llama(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["left tonsil carcinoma", "right oral tongue tumour", "bilateral elective neck levels II to IV"]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def test_local_decoder_lm_pools_the_last_real_token(tmp_path):
    _tiny_llama(tmp_path / "llama")
    encoder = TextEncoder.from_pretrained(tmp_path / "llama")
    assert encoder.pooling == "last_token" and encoder.hidden_size == 32
    with torch.no_grad():
        out = encoder(["left tonsil carcinoma", "right oral tongue tumour bilateral"])
    lengths = out.attention_mask.sum(1)
    assert lengths[0] < lengths[1]  # the first text is padded
    for row, length in enumerate(lengths):
        last = int(torch.nonzero(out.attention_mask[row]).max())
        assert torch.equal(out.pooled[row], out.token_states[row, last])
