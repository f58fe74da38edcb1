"""`load()` and `Engine`: preprocessing + model + greedy generation + decoding, for both models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .models import kosmos2_5
from .models.config import Kosmos25Config, read_config
from .models.generation import Prompt, greedy_generate
from .models.loading import ModelLoadError, load_weights, resolve_model_dir
from .processing.images import kosmos2_5_patches, read_image_processor_config
from .processing.kosmos2_5 import Kosmos25Tokenizer


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (what the models were run in), fp32 on CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}") from None


class Engine:
    """A loaded model with its tokenizer and image preprocessing. Build it with `kosmos_cli.load()`."""

    def __init__(self, name: str, model_dir: Path, device: torch.device, dtype: torch.dtype):
        self.name, self.device, self.dtype = name, device, dtype
        config = read_config(model_dir)
        if not isinstance(config, Kosmos25Config):
            raise ModelLoadError(f"{name}: Kosmos-2 support is not built yet")
        self.config = config
        self.kind = kosmos2_5.Kosmos25.kind
        self.tokenizer = Kosmos25Tokenizer.from_dir(model_dir)
        self.max_patches = int(read_image_processor_config(model_dir).get("max_patches", config.vision.max_num_patches))
        with torch.device("meta"):
            model = kosmos2_5.Kosmos25(config)
        ignore = ("text_model.lm_head.",) if config.tie_word_embeddings else ()
        load_weights(model, model_dir, kosmos2_5.CHECKPOINT_NAMES, kosmos2_5.CHECKPOINT_LEAF_NAMES,
                     dtype=dtype, device=device, ignore=ignore)
        self.model = model.eval()
        self.eos_ids = _eos_ids(model_dir, config.text.eos_token_id)

    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: str | Sequence[str],
        max_new_tokens: int | Sequence[int] = 1024,
        min_new_tokens: int = 0,
    ) -> list[list[int]]:
        """Greedy new token ids per image (EOS excluded). `prompts`: one task text for all images or
        one per image (e.g. "<ocr>", "<md>"). Batching never changes the result."""
        images = list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        limits = [max_new_tokens] * len(images) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if not (len(prompts) == len(images) == len(limits)):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts and {len(limits)} token limits")
        if not images:
            return []
        grids = [kosmos2_5_patches(image, self.max_patches) for image in images]
        patches = torch.stack([g.patches for g in grids]).to(self.device)
        encoded = [self.tokenizer.prompt(p, self.config.latent_query_num) for p in prompts]
        with torch.inference_mode():
            image_embeds = self.model.encode_images(patches)
        return greedy_generate(
            self.model.text,
            [Prompt(ids, mask) for ids, mask in encoded],
            image_embeds,
            max_new_tokens=limits,
            min_new_tokens=min_new_tokens,
            eos_ids=self.eos_ids,
            pad_id=self.config.text.pad_token_id,
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def _eos_ids(model_dir: Path, configured: int | list[int]) -> list[int]:
    """EOS ids from generation_config.json when present, else from config.json."""
    path = model_dir / "generation_config.json"
    if path.exists():
        try:
            configured = json.loads(path.read_text()).get("eos_token_id", configured)
        except json.JSONDecodeError:
            pass
    return [configured] if isinstance(configured, int) else list(configured)


def load(model: str = "microsoft/kosmos-2.5", device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Engine:
    """Load a Kosmos-2.5 or Kosmos-2 checkpoint from a local directory or a Hugging Face repo id."""
    device = pick_device(device)
    return Engine(str(model), resolve_model_dir(model), device, pick_dtype(dtype, device))
