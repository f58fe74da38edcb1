"""The fairseq-style text decoder that Kosmos-2 and Kosmos-2.5 share: token (and segment)
embeddings with sinusoidal positions, pre-LN blocks that write the KV cache, the final norm and the
LM head. Shapes: n sequences, T tokens, D = embed_dim."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, StepPlan
from .layers import Embedding, MultiheadAttention, activation, attention


class FFN(nn.Module):
    """Kosmos text FFN: fc1 -> act -> LayerNorm(ffn_dim) -> fc2."""

    def __init__(self, dim: int, ffn_dim: int, act: str, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(self.act(self.fc1(x))))


def sinusoidal_positions(positions: torch.Tensor, dim: int, padding_idx: int) -> torch.Tensor:
    """positions (...) int -> (..., dim) float32; [sin | cos] halves, the padding position is zero.

    Computed on the fly so any position works, including past max_position_embeddings."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=positions.device).float() * -(math.log(10000) / (half - 1)))
    angles = positions.float().unsqueeze(-1) * freq
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.masked_fill((positions == padding_idx).unsqueeze(-1), 0.0)


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, act: str, eps: float, inner_norm: bool):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.self_attn = MultiheadAttention(dim, heads, dim // heads, bias=True, inner_norm_eps=eps if inner_norm else None)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FFN(dim, ffn_dim, act, eps)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, step: StepPlan) -> torch.Tensor:
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        # Scaled after the split (same values): compiled for the CPU, FlexAttention needs the query
        # to be a 4-D buffer of its own, not a view of the projection (torch 2.13's lowering fails).
        q = attn.split(attn.q_proj(h)) * attn.head_dim**-0.5
        k, v = attn.split(attn.k_proj(h)), attn.split(attn.v_proj(h))
        cache.update(layer, step.rows, step.start, k, v)
        if step.prefill:
            # Fresh prompts, right-padded: causal attention over themselves (pads come last).
            out = attention(q, k, v, causal=True, scale=1.0, flash=attn.flash)
        else:
            # One new token in each of the first n slots: read only the cache prefix they use.
            n = step.start.shape[0]
            out = step.attend(q, cache.keys[layer][:n, :, : step.span], cache.values[layer][:n, :, : step.span])
        x = x + attn.merge(out)
        return x + self.ffn(self.final_layer_norm(x))


class TextDecoder(nn.Module):
    """Token embedding (+ optional segment embedding), pre-LN blocks, final norm and LM head."""

    def __init__(self, *, vocab_size, dim, layers, heads, ffn_dim, act, eps, pad_id, scale_embedding, segments, inner_norm, tie):
        super().__init__()
        self.dim, self.heads, self.pad_id = dim, heads, pad_id
        self.embed_scale = math.sqrt(dim) if scale_embedding else 1.0
        self.embed_tokens = Embedding(vocab_size, dim)
        self.segment_emb = Embedding(2, dim) if segments else None
        self.layers = nn.ModuleList(DecoderBlock(dim, heads, ffn_dim, act, eps, inner_norm) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        # A tied head reuses embed_tokens.weight and has no parameter of its own.
        self.lm_head = None if tie else nn.Linear(dim, vocab_size, bias=False)

    @classmethod
    def from_config(cls, t, *, segments: bool, inner_norm: bool, tie: bool) -> "TextDecoder":
        """From a config.TextConfig; segments: Kosmos-2.5's segment embedding; inner_norm: Kosmos-2's
        LayerNorm over the merged heads; tie: the head reuses embed_tokens."""
        return cls(
            vocab_size=t.vocab_size, dim=t.embed_dim, layers=t.layers, heads=t.attention_heads, ffn_dim=t.ffn_dim,
            act=t.activation_function, eps=t.layer_norm_eps, pad_id=t.pad_token_id, scale_embedding=t.scale_embedding,
            segments=segments, inner_norm=inner_norm, tie=tie,
        )

    def new_cache(self, slots: int, capacity: int, *, dtype, device, static: bool = False) -> KVCache:
        return KVCache(len(self.layers), slots, self.heads, self.dim // self.heads, capacity, dtype=dtype,
                       device=device, static=static)

    def embed(
        self, ids: torch.Tensor, start: torch.Tensor, image: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids (n, T); start (n,) index of ids[:, 0] in its sequence; image (n, Q, dim) features to put
        where image_mask (n, T) == 1. Image features go in before the sqrt(dim) scaling, as trained."""
        x = self.embed_tokens(ids)
        if image is not None:
            x = x.clone()
            x[image_mask == 1] = image.to(x.dtype).reshape(-1, x.shape[-1])
        x = x * self.embed_scale
        # Prompts carry no padding, so the fairseq position of index i is i + pad_id + 1.
        positions = start.unsqueeze(1) + torch.arange(ids.shape[1], device=ids.device) + self.pad_id + 1
        x = x + sinusoidal_positions(positions, self.dim, self.pad_id).to(x.dtype)
        if self.segment_emb is not None:
            segment = (image_mask != 0).long() if image_mask is not None else torch.zeros_like(ids)
            x = x + self.segment_emb(segment)
        return x

    def forward(self, x: torch.Tensor, cache: KVCache, step: StepPlan) -> torch.Tensor:
        """x (n, T, dim) embedded tokens -> hidden states after the final norm (n, T, dim)."""
        for i, block in enumerate(self.layers):
            x = block(x, i, cache, step)
        return self.layer_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)
