"""Kosmos-2: a CLIP ViT-L/14 vision tower, a latent-query resampler and a fairseq text decoder whose
self-attention has an extra LayerNorm over the merged heads (`inner_attn_ln`).

Shapes: B images, N = (224/14)^2 = 256 patches, Q = latent_query_num (64), D = text embed_dim.
    pixels (B, 3, 224, 224) -> CLIP (B, 1 + N, Dv) -> post_layernorm on all tokens -> L2 norm
    -> resampler (B, Q, D) -> inserted at the 64 placeholders between <image> and </image>.

At the end, ARCHITECTURE: the record the engine builds a Kosmos-2 from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..processing.images import clip_pixels
from ..processing.kosmos2 import Kosmos2Tokenizer
from .config import Architecture, Kosmos2Config, Kosmos2VisionConfig
from .decoder import TextDecoder
from .layers import Embedding, MultiheadAttention, Resampler, activation


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPBlock(nn.Module):
    def __init__(self, cfg: Kosmos2VisionConfig):
        super().__init__()
        dim, heads = cfg.hidden_size, cfg.num_attention_heads
        self.layer_norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.self_attn = MultiheadAttention(dim, heads, dim // heads, bias=True)
        self.layer_norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(dim, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVision(nn.Module):
    def __init__(self, cfg: Kosmos2VisionConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, dim)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(CLIPBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) at the trained size -> (B, 1 + N, Dv), post-normed on every token."""
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, Dv)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding.weight
        x = self.pre_layrnorm(x)
        for block in self.layers:
            x = block(x)
        return self.post_layernorm(x)


class Kosmos2(nn.Module):
    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        t = cfg.text
        self.config = cfg
        self.vision = CLIPVision(cfg.vision)
        self.resampler = Resampler(cfg.vision.hidden_size, t.embed_dim, t.attention_heads, cfg.latent_query_num)
        self.text = TextDecoder.from_config(t, segments=False, inner_norm=True, tie=cfg.tie_word_embeddings)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, 224, 224) -> image embeddings (B, Q, D) for the decoder."""
        features = self.vision(pixels.to(self.resampler.dense.weight.dtype))
        return self.resampler(F.normalize(features, dim=-1))


@dataclass(frozen=True)
class ImageProcessor:
    """An image -> CLIP pixels (3, 224, 224) and that size: the model sees every image at it."""

    image_config: dict  # the checkpoint's image-processor settings (see read_image_processor_config)
    tokens: int  # the vision encoder's tokens per image: its patches and the class token

    @classmethod
    def from_config(cls, config: Kosmos2Config, image_config: dict) -> "ImageProcessor":
        vision = config.vision
        return cls(image_config, (vision.image_size // vision.patch_size) ** 2 + 1)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        pixels = clip_pixels(image, self.image_config)
        return pixels, (pixels.shape[2], pixels.shape[1])


ARCHITECTURE = Architecture(
    name="kosmos-2",
    config=Kosmos2Config,
    module=Kosmos2,
    tokenizer=Kosmos2Tokenizer.from_dir,
    image_processor=ImageProcessor.from_config,
    checkpoint_names=(
        ("text_model.model.", "text."),
        ("text_model.lm_head.", "text.lm_head."),
        ("vision_model.model.embeddings.", "vision."),
        ("vision_model.model.encoder.layers.", "vision.layers."),
        ("vision_model.model.", "vision."),
        ("image_to_text_projection.", "resampler."),
    ),
    checkpoint_leaf_names=(),
    no_repeat_ngram_size=3,  # as the Kosmos-2 demo; transformers 5 needs it passed explicitly
)
