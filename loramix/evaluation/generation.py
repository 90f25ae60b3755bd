"""Text generation with a (MixLoRA, LoRA or bare) model: prompts in, completions out."""
from __future__ import annotations

from typing import Any

import torch

from ..data import Encoder, Example, pad_token_id


def left_pad(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``[B, S]`` input_ids and attention_mask, padded on the left so every row ends at the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: list[str], *, template: str = "plain", max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None) -> list[str]:
    """Complete each prompt (rendered with ``template``); greedy unless ``do_sample``. Returns the new text only."""
    encoder = Encoder(tokenizer)
    seqs = [encoder.prompt_ids(Example(instruction=p, template=template)) for p in prompts]
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in left_pad(seqs, pad).items()}
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    model.eval()
    out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    width = batch["input_ids"].shape[1]
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
