"""Kosmos-2.5: a Pix2Struct-style vision encoder, a latent-query resampler and a fairseq text decoder.

Shapes: B images, P = max_num_patches, Q = latent_query_num, D = text embed_dim.
    flattened patches (B, P, 2 + 768) -> vision encoder (B, P, Dv) -> L2 norm -> dense (B, P, D)
    -> resampler: Q latent queries attend over [projected patches; latent queries] -> (B, Q, D)
    -> inserted at the <s> placeholders between <image> and </image> of the prompt -> decoder.

At the end, ARCHITECTURE: the record the engine builds a Kosmos-2.5 from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..processing.images import kosmos2_5_patches
from ..processing.kosmos2_5 import Kosmos25Tokenizer
from .config import Architecture, Kosmos25Config, Kosmos25VisionConfig
from .decoder import TextDecoder
from .layers import Embedding, MultiheadAttention, Resampler, RMSNorm, activation


class GatedMLP(nn.Module):
    """wo(act(wi_0 x) * wi_1 x), bias-free (T5 v1.1 style)."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.wi_0 = nn.Linear(dim, hidden, bias=False)
        self.wi_1 = nn.Linear(dim, hidden, bias=False)
        self.wo = nn.Linear(hidden, dim, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Kosmos25VisionConfig):
        super().__init__()
        self.pre_attention_layer_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attention = MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, bias=False)
        self.pre_mlp_layer_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.dense_act_fn)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.pre_attention_layer_norm(x), mask=key_mask)
        return x + self.mlp(self.pre_mlp_layer_norm(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: Kosmos25VisionConfig):
        super().__init__()
        self.patch_projection = nn.Linear(cfg.patch_embed_hidden_size, cfg.hidden_size)
        self.row_embedder = Embedding(cfg.max_num_patches, cfg.hidden_size)
        self.column_embedder = Embedding(cfg.max_num_patches, cfg.hidden_size)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.layernorm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, P, 2 + 768) float32: 1-based row id, column id, pixels; all-zero rows are
        padding. The ids are read before the pixels are cast to the model's dtype: bf16 holds
        integers exactly only up to 256, and a tall page has more patch rows than that."""
        rows, cols = patches[..., 0].long(), patches[..., 1].long()
        pixels = patches[..., 2:].to(self.patch_projection.weight.dtype)
        x = self.patch_projection(pixels) + self.row_embedder(rows) + self.column_embedder(cols)
        # Padding patches are hidden as keys only; as queries they still produce (unused) outputs,
        # which the resampler then reads, exactly as the model was trained.
        key_mask = (patches.sum(-1) != 0)[:, None, None, :]
        for block in self.layers:
            x = block(x, key_mask)
        return self.layernorm(x)


class Kosmos25(nn.Module):
    def __init__(self, cfg: Kosmos25Config):
        super().__init__()
        t = cfg.text
        self.config = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.resampler = Resampler(cfg.vision.hidden_size, t.embed_dim, t.attention_heads, cfg.latent_query_num)
        self.text = TextDecoder.from_config(t, segments=True, inner_norm=False, tie=cfg.tie_word_embeddings)

    def encode_images(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, P, 770) -> image embeddings (B, Q, D) for the decoder."""
        features = self.vision(patches.float())
        return self.resampler(F.normalize(features, dim=-1))


@dataclass(frozen=True)
class ImageProcessor:
    """An image -> flattened patches (max_patches, 770) and the size (width, height) of the patch grid
    it was resized to, where the model's OCR boxes live."""

    max_patches: int

    @classmethod
    def from_config(cls, config: Kosmos25Config, image_config: dict) -> "ImageProcessor":
        return cls(int(image_config.get("max_patches", config.vision.max_num_patches)))

    @property
    def tokens(self) -> int:
        """The vision encoder's tokens per image: every patch row, padding included."""
        return self.max_patches

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = kosmos2_5_patches(image, self.max_patches)
        return grid.patches, (grid.width, grid.height)


ARCHITECTURE = Architecture(
    name="kosmos-2.5",
    config=Kosmos25Config,
    module=Kosmos25,
    tokenizer=Kosmos25Tokenizer.from_dir,
    image_processor=ImageProcessor.from_config,
    checkpoint_names=(
        ("text_model.model.", "text."),
        ("text_model.lm_head.", "text.lm_head."),
        ("vision_model.embeddings.", "vision."),
        ("vision_model.encoder.layer.", "vision.layers."),
        ("vision_model.layernorm.", "vision.layernorm."),
        ("image_to_text_projection.", "resampler."),
    ),
    checkpoint_leaf_names=(  # the vision attention has T5 names in the checkpoint
        (".attention.query.", ".attention.q_proj."),
        (".attention.key.", ".attention.k_proj."),
        (".attention.value.", ".attention.v_proj."),
        (".attention.output.", ".attention.out_proj."),
    ),
    no_repeat_ngram_size=0,  # the original decodes plainly: OCR legitimately repeats n-grams
)
