"""Kosmos-2.5 against its oracle: the page shapes the checks run on, the oracle's greedy ids, and the
logits of an uncached forward through our model (on the CPU here, on the GPU in test_gpu.py)."""

from __future__ import annotations

import torch

from kosmos_cli.models.cache import StepPlan
from kosmos_cli.processing.images import kosmos2_5_patches

SHAPES = [(40, 30), (300, 120), (64, 640), (7, 5)]  # (width, height)


def oracle_generate(oracle, image, prompt, max_new_tokens, **kwargs):
    """The oracle's greedy new ids for one page (its EOS and what follows cut off)."""
    model, processor = oracle
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    inputs.pop("width"), inputs.pop("height")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **kwargs)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def our_logits(engine, image, prompt):
    """A full uncached forward of prompt ids through our model -> logits (T, V)."""
    grid = kosmos2_5_patches(image, engine.image_processor.max_patches)
    ids, mask = engine.tokenizer.prompt(prompt, engine.config.latent_query_num)
    return full_forward(engine, grid.patches[None], [ids], [mask])[0]


def full_forward(engine, patches, ids, masks):
    """Logits of an uncached forward, on the engine's device and in its dtype."""
    decoder, device = engine.model.text, engine.device
    ids, masks = torch.tensor(ids, device=device), torch.tensor(masks, device=device)
    rows = torch.arange(ids.shape[0], device=device)
    with torch.inference_mode():
        embeds = engine.model.encode_images(patches.to(device))
        cache = decoder.new_cache(ids.shape[0], ids.shape[1], dtype=engine.dtype, device=device)
        x = decoder.embed(ids, torch.zeros_like(rows), embeds, masks)
        return decoder.logits(decoder(x, cache, StepPlan.prefill_rows(rows)))
