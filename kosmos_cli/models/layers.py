"""Building blocks shared by Kosmos-2 and Kosmos-2.5: the attention kernels and their choice, norms,
activations, embeddings, multi-head attention and the latent-query resampler. The text decoder both models share
is in decoder.py, the KV cache and the step plan in cache.py."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Attention backend, chosen with load(attention=...) (the CLI reads it from KOSMOS_ATTENTION):
#   auto (default): flash-attn for unmasked attention on CUDA GPUs that it supports (Ampere and
#         newer) when it is importable, SDPA otherwise, and FlexAttention for the compiled decode
#         step on the CPU (measured faster there) where this torch supports it;
#   sdpa: SDPA everywhere;
#   flex: as auto, and FlexAttention for the compiled decode step on CUDA too (an error where this
#         torch or the model's shapes do not allow it).
# FlexAttention reads only the cache blocks each slot has filled; SDPA reads every slot up to the
# longest one's span. Which is faster on a GPU is not measured yet, so auto keeps SDPA there.
# --------------------------------------------------------------------------------------------

try:  # pragma: no cover - flash-attn is an optional CUDA-only extra
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover
    _flash_attn_func = None

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask = flex_attention = None

ATTENTION_CHOICES = ("auto", "sdpa", "flex")
# The oldest torch whose FlexAttention decodes our shapes: before it, BlockMask.from_kv_blocks has no
# seq_lengths (2.5), head dim 96 is refused (2.6) and the decoding kernel fails on head dims that are
# not powers of two (until about 2.10).
FLEX_DECODING_TORCH = (2, 10)
FLEX_MIN_HEAD_DIM_CUDA = 16  # Triton's FlexAttention kernels


def check_attention(choice: str) -> str:
    """The choice itself, or ValueError naming the valid ones."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention={choice!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    return choice


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def flex_unsupported(device: torch.device, head_dim: int) -> str | None:
    """Why FlexAttention cannot run the decode step here, or None when it can."""
    if flex_attention is None or torch_version() < FLEX_DECODING_TORCH:
        return (f"FlexAttention decoding needs torch >= {'.'.join(map(str, FLEX_DECODING_TORCH))} "
                f"(this is {torch.__version__})")
    if device.type == "cuda" and head_dim < FLEX_MIN_HEAD_DIM_CUDA:
        return f"FlexAttention on CUDA needs a head dim of at least {FLEX_MIN_HEAD_DIM_CUDA}, the model's is {head_dim}"
    return None


def flex_decoding(device: torch.device, head_dim: int, choice: str = "auto") -> bool:
    """Whether the compiled decode step attends with FlexAttention (ValueError when asked for and
    not possible here)."""
    if check_attention(choice) == "sdpa":
        return False
    reason = flex_unsupported(device, head_dim)
    if choice == "flex" and reason is not None:
        raise ValueError(f"attention=flex: {reason}")
    return reason is None and (choice == "flex" or device.type == "cpu")


@functools.lru_cache(maxsize=None)
def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability, (8, 0) for an A100; asked once per device."""
    return torch.cuda.get_device_capability(device)


def flash_available(device: torch.device, choice: str = "auto") -> bool:
    """flash-attn is installed, not switched off, and supports this GPU (Ampere and newer)."""
    return (_flash_attn_func is not None and check_attention(choice) != "sdpa" and device.type == "cuda"
            and cuda_capability(device) >= (8, 0))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    flash: bool = False,
) -> torch.Tensor:
    """q: (B, H, Tq, D), k/v: (B, H, Tk, D), mask: bool (B, 1, Tq|1, Tk), True = attend. -> (B, H, Tq, D).
    flash: use flash-attn where it applies (half precision, no mask; see flash_available)."""
    if flash and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn wants (B, T, H, D).
        out = _flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, softmax_scale=scale
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


# --------------------------------------------------------------------------------------------
# Norms, activations, MLPs, embeddings
# --------------------------------------------------------------------------------------------


class Embedding(nn.Embedding):
    """nn.Embedding without its random init: the checkpoint fills every weight, and the init on the
    meta device (normal_) imports torch._dynamo, 2 s of CPU on every load (each worker and actor too)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """T5-style norm: no mean subtraction, no bias, variance computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(self.weight.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation function {name!r} in config.json") from None


# --------------------------------------------------------------------------------------------
# Multi-head attention with separate q/k/v/out projections (the checkpoint layout).
# --------------------------------------------------------------------------------------------


class MultiheadAttention(nn.Module):
    """Self- or cross-attention. `inner_norm` adds Kosmos-2's LayerNorm over the merged heads.
    `flash`: attend with flash-attn where it applies (the engine sets it from its attention choice)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, bias: bool, inner_norm_eps: float | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.flash = False
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.inner_attn_ln = nn.LayerNorm(inner, eps=inner_norm_eps) if inner_norm_eps is not None else None
        self.out_proj = nn.Linear(inner, dim, bias=bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H*D) -> (B, H, T, D)."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, T, H*D), then the optional inner norm and the output projection."""
        x = x.transpose(1, 2).flatten(2)
        if self.inner_attn_ln is not None:
            x = self.inner_attn_ln(x)
        return self.out_proj(x)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Uncached attention of x (B, T, dim) over context (B, S, dim) (x itself when None)."""
        context = x if context is None else context
        q = self.split(self.q_proj(x) * self.head_dim**-0.5)
        k, v = self.split(self.k_proj(context)), self.split(self.v_proj(context))
        return self.merge(attention(q, k, v, mask=mask, scale=1.0, flash=self.flash))


class Resampler(nn.Module):
    """Q learned latent queries attend (no mask, not causal) over [dense(features); latent queries]."""

    def __init__(self, vision_dim: int, dim: int, heads: int, queries: int):
        super().__init__()
        self.dense = nn.Linear(vision_dim, dim)
        self.latent_query = nn.Parameter(torch.empty(queries, dim))
        self.x_attn = MultiheadAttention(dim, heads, dim // heads, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dense(features)
        queries = self.latent_query.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.x_attn(queries, context=torch.cat([x, queries], dim=1))
