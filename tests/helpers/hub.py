"""What the two tiny-checkpoint builders (`kosmos2.py`, `kosmos2_5.py`) have in common.

JSON files as the Hub repos hold them, the tokenizer's added-token entries, the tiny fairseq text
decoder, a seeded random transformers model saved in the Hub layout, the check of that layout, and
the loaders of the oracle (transformers' model and processor) for a checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path

# fairseq's first four ids, in both models' vocabularies.
FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def write_json(path: Path, obj, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write `obj` as UTF-8 JSON (non-ASCII characters as themselves) with a final newline."""
    path = Path(path)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=indent, sort_keys=sort_keys) + "\n", encoding="utf-8")
    return path


def added_token(token_id: int, content: str, *, special: bool, lstrip: bool = False, normalized: bool = False) -> dict:
    """One entry of tokenizer.json's `added_tokens`."""
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": lstrip,
        "rstrip": False,
        "normalized": normalized,
        "special": special,
    }


def added_tokens_decoder_block(added: list[dict]) -> dict:
    """tokenizer_config.json's `added_tokens_decoder` (transformers >= 4.34) for tokenizer.json's `added_tokens`."""
    return {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}


def write_hub_style_config(path: Path) -> None:
    """Rewrite a saved config.json as the Hub files are: they predate transformers 5 and say
    "torch_dtype", not "dtype"."""
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    config["torch_dtype"] = config.pop("dtype", "float32")
    write_json(config_file, config, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def tiny_text_config(vocab_size: int, *, tied: bool, **overrides) -> dict:
    """The tiny fairseq text decoder both test checkpoints use (fields as in transformers' configs)."""
    return dict(
        vocab_size=vocab_size, embed_dim=32, layers=2, attention_heads=4, ffn_dim=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, tie_word_embeddings=tied, pad_token_id=1,
        bos_token_id=0, eos_token_id=2,
    ) | overrides


def make_image_dependent(model, seed: int) -> None:
    """Make greedy output depend on the image (tiny random models are image-blind, REFERENCE §9).

    With the default init (std 0.02) every tiny linear layer shrinks its input ~10x, so the image
    signal is gone by the last position. Re-drawn with unit gain (std 1/sqrt(fan_in)), the resampler
    and the text attention carry it through; a larger `dense` and a small latent query make the
    image features dominate the resampled tokens; a big untied lm_head turns the differences into
    different argmaxes.
    """
    import math

    import torch

    g = torch.Generator().manual_seed(seed + 1)

    def redraw(linear, gain: float) -> None:
        w = linear.weight
        w.copy_(torch.randn(w.shape, generator=g) * (gain / math.sqrt(w.shape[1])))

    proj = model.image_to_text_projection
    with torch.no_grad():
        redraw(proj.dense, 2.0)
        proj.latent_query.mul_(0.1)
        for lin in (proj.x_attn.q_proj, proj.x_attn.k_proj, proj.x_attn.v_proj, proj.x_attn.out_proj):
            redraw(lin, 1.0)
        for layer in model.text_model.model.layers:
            attn = layer.self_attn
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                redraw(lin, 1.0)
        head = model.text_model.lm_head.weight
        head.copy_(torch.randn(head.shape, generator=g))


def check_builder_args(*, tied: bool, image_dependent: bool) -> None:
    if image_dependent and tied:
        raise ValueError("image_dependent needs an untied lm_head (tied=False)")


def save_random_model(
    path: Path, model_class, config, *, seed: int, image_dependent: bool, max_shard_size: str = "10GB"
) -> None:
    """Save a seeded fp32 `model_class(config)` into `path` as the Hub repos hold it (safetensors,
    config.json with "torch_dtype"); `image_dependent` re-draws weights with `make_image_dependent`."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    if image_dependent:
        make_image_dependent(model, seed)
    model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    write_hub_style_config(path)


def check_hub_layout(path: Path, *, tied: bool, sharded: bool, files: tuple[str, ...]) -> None:
    """Fail early if save_pretrained's output differs from the layout we promise.

    sharded: model-0000K-of-0000N.safetensors (N >= 2) + index, else one model.safetensors;
    tied: lm_head absent from the weights; files: the other files that must be there.
    """
    from safetensors import safe_open

    path = Path(path)
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if sharded:
        assert len(shards) >= 2 and (path / "model.safetensors.index.json").is_file(), shards
        assert not (path / "model.safetensors").exists()
        weights = shards
    else:
        assert (path / "model.safetensors").is_file() and not shards
        weights = [path / "model.safetensors"]
    names = set()
    for f in weights:
        with safe_open(str(f), framework="pt") as sf:
            names.update(sf.keys())
    assert ("text_model.lm_head.weight" in names) == (not tied), sorted(names)[:5]
    for name in files:
        assert (path / name).is_file(), name


# --------------------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------------------


def load_oracle_model(model_class, path: Path):
    """transformers' model for a checkpoint dir: eager attention, fp32, eval."""
    import torch

    return model_class.from_pretrained(Path(path), attn_implementation="eager", dtype=torch.float32).eval()


def load_processor(path: Path, **kwargs):
    """transformers' processor for a checkpoint dir, with the PIL image processor."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(Path(path), backend="pil", **kwargs)
