"""Prompt encoding as Stable Diffusion trains it (padded to the tokenizer's max length, no attention
mask).

SD1/SD2: one text encoder, with kohya's clip-skip (kohya-ss/sd-scripts library/strategy_sd.py;
diffusers' pipelines count one less: their clip_skip=1 is kohya's 2).
SDXL: the penultimate hidden states of both encoders, concatenated, and text_encoder_2's pooled
(projected) output, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and kohya's
library/strategy_sdxl.py compute them.
"""
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


class PromptEncoder:
    """captions -> (hidden states, pooled embedding or None) for the UNet of one family."""

    def __init__(self, family: str, tokenizers: list, text_encoders: list, clip_skip: int | None = None):
        self.family, self.tokenizers, self.text_encoders, self.clip_skip = family, tokenizers, text_encoders, clip_skip

    def __call__(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.family != "sdxl":
            ids = tokenize(self.tokenizers[0], captions).to(device)
            return encode(self.text_encoders[0], ids, self.clip_skip), None
        hidden = []
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders):
            output = text_encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        # text_encoder_2 is a CLIPTextModelWithProjection: its first output is the projected pooled state
        return torch.cat(hidden, dim=-1), output[0]


class CachedPrompts:
    """``--cache_text_encoder_outputs``: every caption encoded once up front, kept on the CPU, so
    the text encoders can leave memory. Asking for a caption that was not cached is an error."""

    def __init__(self, encoder: PromptEncoder, captions, device, batch_size: int = 8):
        self.family = encoder.family
        self.table: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        unique = list(dict.fromkeys(captions))
        with torch.no_grad():
            for start in range(0, len(unique), batch_size):
                chunk = unique[start:start + batch_size]
                hidden, pooled = encoder(chunk, device)
                for i, caption in enumerate(chunk):
                    self.table[caption] = (hidden[i].float().cpu(), None if pooled is None else pooled[i].float().cpu())

    def __call__(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        missing = [c for c in captions if c not in self.table]
        if missing:
            raise KeyError(f"captions {missing[:3]} were not among the cached text-encoder outputs")
        hidden = torch.stack([self.table[c][0] for c in captions]).to(device)
        if self.family != "sdxl":
            return hidden, None
        return hidden, torch.stack([self.table[c][1] for c in captions]).to(device)
