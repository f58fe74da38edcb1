"""The parity suite's core checks on CUDA (skipped without a GPU): fp32 and bf16, SDPA, FlexAttention
and flash-attn, CUDA graphs."""

import pytest
import torch

import kosmos_cli
from kosmos_cli.models import layers
from tests.test_kosmos2_5 import SHAPES, noise_image, oracle_generate, our_logits
from tests.checkpoints import load_kosmos2_5_oracle

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_fp32(kosmos25_sharded):
    return kosmos_cli.load(kosmos25_sharded, device="cuda", dtype="float32"), load_kosmos2_5_oracle(kosmos25_sharded)


@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_fp32_logits_match_oracle(cuda_fp32, shape):
    engine, (model, processor) = cuda_fp32
    image = noise_image(*shape, seed=shape[0])
    inputs = processor(text="<md>", images=image, return_tensors="pt")
    inputs.pop("width"), inputs.pop("height")
    with torch.no_grad():
        expected = model(**inputs).logits[0]
    torch.backends.cuda.matmul.allow_tf32 = False
    assert (our_logits(engine, image, "<md>").cpu() - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("prompt", ["<ocr>", "<md>"])
def test_cuda_greedy_ids_match_oracle(cuda_fp32, prompt):
    engine, oracle = cuda_fp32
    images = [noise_image(*s, seed=i) for i, s in enumerate(SHAPES)]
    expected = [oracle_generate(oracle, im, prompt, 24) for im in images]
    assert engine.generate(images, prompt, max_new_tokens=24) == expected


def test_bf16_batched_equals_single(kosmos25_sharded):
    engine = kosmos_cli.load(kosmos25_sharded, device="cuda", dtype="bfloat16")
    images = [noise_image(*s, seed=i) for i, s in enumerate(SHAPES)]
    prompts = ["<ocr>", "<md>", "<ocr>", "<md>"]
    batched = engine.generate(images, prompts, max_new_tokens=16)
    assert batched == [engine.generate([im], p, max_new_tokens=16)[0] for im, p in zip(images, prompts)]


@pytest.mark.skipif(layers._flash_attn_func is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_agrees_with_sdpa(monkeypatch, causal):
    q, k, v = (torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flash = layers.attention(q, k, v, causal=causal, scale=0.125)
    monkeypatch.setenv("KOSMOS_ATTENTION", "sdpa")
    sdpa = layers.attention(q, k, v, causal=causal, scale=0.125)
    assert (flash.float() - sdpa.float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_cuda_graphs_decode_like_eager(kosmos25_sharded, attention, monkeypatch):
    """The compiled step (reduce-overhead) records CUDA graphs, none skipped, and decodes like eager."""
    from torch._dynamo.utils import counters

    images = [noise_image(*s, seed=i) for i, s in enumerate(SHAPES)]
    limits = [24, 5, 17, 9]
    eager = kosmos_cli.load(kosmos25_sharded, device="cuda", dtype="bfloat16", compile=False)
    monkeypatch.setenv("KOSMOS_ATTENTION", attention)
    graphed = kosmos_cli.load(kosmos25_sharded, device="cuda", dtype="bfloat16", compile=True)
    expected = eager.generate(images, "<ocr>", limits)
    counters.clear()
    assert graphed.generate(images, "<ocr>", limits) == expected
    assert not graphed.step.broken and graphed.step.flex == (attention == "flex")
    assert counters["inductor"]["cudagraph_skips"] == 0
