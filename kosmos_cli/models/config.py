"""Model configs as dataclasses with the Hugging Face field names, built leniently from config.json,
and `Architecture`, the record of what differs between the two models.

The Hub config.json files predate transformers 5.x, so unknown keys are ignored and a few older
spellings are accepted as aliases. Defaults are the released models' values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any] | None, aliases: dict[str, str] | None = None, base: T | None = None) -> T:
    """Build dataclass `cls` from `data`, keeping only known fields (after renaming aliases).
    Fields missing from `data` take their value from `base`, else the class default."""
    data = dict(data or {})
    for old, new in (aliases or {}).items():
        if old in data and new not in data:
            data[new] = data.pop(old)
    names = {f.name for f in dataclasses.fields(cls)}
    values = dataclasses.asdict(base) if base is not None else {}
    values.update({k: v for k, v in data.items() if k in names and v is not None})
    return cls(**values)


@dataclass
class TextConfig:
    """The fairseq-style text decoder shared by both models (Kosmos-2.5 defaults)."""

    vocab_size: int = 108481
    max_position_embeddings: int = 4096
    embed_dim: int = 1536
    layers: int = 24
    ffn_dim: int = 6144
    attention_heads: int = 16
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    scale_embedding: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2


TEXT_ALIASES = {"num_attention_heads": "attention_heads", "hidden_size": "embed_dim", "num_hidden_layers": "layers"}


@dataclass
class Kosmos25VisionConfig:
    hidden_size: int = 1536
    patch_embed_hidden_size: int = 768
    intermediate_size: int = 3968
    head_dim: int = 64
    num_hidden_layers: int = 18
    num_attention_heads: int = 24
    dense_act_fn: str = "gelu_new"
    layer_norm_eps: float = 1e-6
    max_num_patches: int = 4096


@dataclass
class Kosmos25Config:
    text: TextConfig = field(default_factory=TextConfig)
    vision: Kosmos25VisionConfig = field(default_factory=Kosmos25VisionConfig)
    latent_query_num: int = 2048
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> "Kosmos25Config":
        vision_aliases = {"d_ff": "intermediate_size", "d_kv": "head_dim", "seq_len": "max_num_patches"}
        return cls(
            text=_from_dict(TextConfig, data.get("text_config"), TEXT_ALIASES),
            vision=_from_dict(Kosmos25VisionConfig, data.get("vision_config"), vision_aliases),
            latent_query_num=data.get("latent_query_num", 2048),
            tie_word_embeddings=_tie(data),
        )


@dataclass
class Kosmos2VisionConfig:
    """CLIP ViT-L/14."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


KOSMOS2_TEXT = TextConfig(vocab_size=65037, max_position_embeddings=2048, embed_dim=2048, ffn_dim=8192, attention_heads=32)


@dataclass
class Kosmos2Config:
    text: TextConfig = field(default_factory=lambda: dataclasses.replace(KOSMOS2_TEXT))
    vision: Kosmos2VisionConfig = field(default_factory=Kosmos2VisionConfig)
    latent_query_num: int = 64
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> "Kosmos2Config":
        return cls(
            text=_from_dict(TextConfig, data.get("text_config"), TEXT_ALIASES, base=KOSMOS2_TEXT),
            vision=_from_dict(Kosmos2VisionConfig, data.get("vision_config")),
            latent_query_num=data.get("latent_query_num", 64),
            tie_word_embeddings=_tie(data),
        )


def _tie(data: dict[str, Any]) -> bool:
    """The head is tied unless the top level or the text config says otherwise."""
    text = data.get("text_config") or {}
    return bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


@dataclass(frozen=True)
class Architecture:
    """Everything that differs between Kosmos-2.5 and Kosmos-2: one record per model, at the end of
    models/kosmos2_5.py and models/kosmos2.py. The engine looks one up by config.json's model_type
    and takes every model-specific choice from it."""

    name: str  # config.json's model_type, and Engine.kind: "kosmos-2.5" or "kosmos-2"
    config: type  # the config class; its from_hf(config.json's dict) builds the config
    module: type  # module(config) -> the model (an nn.Module with encode_images and text, the decoder)
    tokenizer: Callable[[Path], Any]  # model directory -> the tokenizer (prompt, decode)
    # (config, image-processor settings) -> the preprocessing: image -> (vision input, the (width,
    # height) the model sees it at); its `tokens` is the vision encoder's tokens per image.
    image_processor: Callable[[Any, dict], Any]
    checkpoint_names: tuple[tuple[str, str], ...]  # checkpoint tensor names -> ours (see loading.rename)
    checkpoint_leaf_names: tuple[tuple[str, str], ...]
    no_repeat_ngram_size: int  # the default of greedy decoding's n-gram ban (0: none)
