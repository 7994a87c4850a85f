"""Shared base of medvlm's diffusers models."""
from __future__ import annotations

import torch
from diffusers.models.modeling_utils import ModelMixin


class AlignedModelMixin(ModelMixin):
    """``ModelMixin`` whose loaded weights live in freshly allocated (aligned) memory.

    safetensors files are memory-mapped, so loaded tensors can start at addresses that are not 64-byte
    aligned; CPU SIMD kernels then sum in a different order and outputs differ from the saved model's in
    the last bit. Copying once after loading makes save -> load round trips bit-exact.
    """

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.data = tensor.data.clone()
        return model
