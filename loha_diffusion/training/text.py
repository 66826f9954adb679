"""Prompt encoding as Stable Diffusion trains it (padded to the tokenizer's max length, no attention
mask), with kohya's clip-skip (kohya-ss/sd-scripts library/strategy_sd.py; diffusers' pipelines count
one less: their clip_skip=1 is kohya's 2)."""
from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode(text_encoder, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """Last hidden state, or with ``clip_skip=N`` (kohya/A1111: 1 = last layer, 2 = penultimate)
    ``hidden_states[-N]`` through the final layer norm. No attention mask, as SD was trained."""
    if clip_skip is None or clip_skip == 1:
        return text_encoder(input_ids)[0]
    output = text_encoder(input_ids, output_hidden_states=True)
    model = text_encoder.module if hasattr(text_encoder, "module") else text_encoder
    # transformers 5 dropped CLIPTextModel's ``text_model`` child; 4.x still has it
    final_norm = getattr(model, "text_model", model).final_layer_norm
    return final_norm(output.hidden_states[-clip_skip])
