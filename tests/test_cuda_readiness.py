"""Choices that depend on the GPU and on the installed torch, checked on the CPU with mocked
capabilities and versions: dtype, compile and kernels per GPU generation, FlexAttention's gate, a
torch that cannot compile, and bf16 details a GPU would hit first."""

import re
import warnings

import pytest
import torch

import kosmos_cli
from kosmos_cli import engine as engine_module
from kosmos_cli.models import layers
from kosmos_cli.models.config import Kosmos25VisionConfig
from kosmos_cli.models.kosmos2_5 import VisionEncoder
from tests.helpers.images import noise_image

CUDA = torch.device("cuda", 0)
# compute capability of some GPUs: T4 (7, 5), V100 (7, 0), A100 (8, 0), H100 (9, 0), P100 (6, 0)


@pytest.mark.parametrize("capability, dtype", [((6, 0), torch.float16), ((7, 0), torch.float16),
                                               ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_follows_the_gpu_generation(monkeypatch, capability, dtype):
    monkeypatch.setattr(engine_module, "cuda_capability", lambda device: capability)
    assert engine_module.pick_dtype("auto", CUDA) == dtype
    assert engine_module.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert engine_module.pick_dtype("bfloat16", CUDA) == torch.bfloat16  # asked for: as asked


@pytest.mark.parametrize("capability, compiles", [((6, 0), False), ((7, 0), True), ((7, 5), True), ((9, 0), True)])
def test_compiling_by_default_needs_a_gpu_that_triton_supports(monkeypatch, capability, compiles):
    monkeypatch.setattr(engine_module, "cuda_capability", lambda device: capability)
    assert engine_module.compiles_by_default(CUDA) == compiles
    assert not engine_module.compiles_by_default(torch.device("cpu"))


@pytest.mark.parametrize("capability, choice, available", [((7, 5), "auto", False), ((8, 0), "auto", True),
                                                           ((9, 0), "sdpa", False), ((9, 0), "flex", True)])
def test_flash_attention_only_on_gpus_it_supports(monkeypatch, capability, choice, available):
    monkeypatch.setattr(layers, "_flash_attn_func", lambda *args, **kwargs: None)  # "installed"
    monkeypatch.setattr(layers, "cuda_capability", lambda device: capability)
    assert layers.flash_available(CUDA, choice) == available
    assert not layers.flash_available(torch.device("cpu"), choice)


@pytest.mark.parametrize("version, choice, device, head_dim, expected", [
    ("2.13.0", "auto", "cpu", 96, True),
    ("2.13.0", "auto", "cuda", 96, False),  # not measured on a GPU: SDPA there unless asked for
    ("2.13.0", "flex", "cuda", 96, True),
    ("2.11.0+cu130", "flex", "cuda", 16, True),
    ("2.9.1", "auto", "cpu", 96, False),  # too old: SDPA, quietly
    ("2.9.1", "flex", "cpu", 96, "needs torch >= 2.10 (this is 2.9.1)"),
    ("2.5.1", "flex", "cuda", 96, "needs torch >= 2.10 (this is 2.5.1)"),
    ("2.13.0", "flex", "cuda", 8, "head dim of at least 16, the model's is 8"),
    ("2.13.0", "auto", "cpu", 8, True),  # the head dim limit is Triton's, not the CPU's
])
def test_flex_attention_where_this_torch_and_the_shapes_allow_it(monkeypatch, version, choice, device,
                                                                 head_dim, expected):
    monkeypatch.setattr(torch, "__version__", version)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=f"attention=flex: .*{re.escape(expected)}"):
            layers.flex_decoding(torch.device(device), head_dim, choice)
    else:
        assert layers.flex_decoding(torch.device(device), head_dim, choice) == expected


def test_a_torch_that_cannot_compile_decodes_without_it(kosmos25_sharded, monkeypatch):
    """torch.compile itself can fail (Python 3.13 with torch <= 2.5, free-threaded builds): the
    engine loads, says so once, and decodes eagerly with the same result."""
    images = [noise_image(50, 40, seed=1), noise_image(30, 90, seed=2)]
    expected = kosmos_cli.load(kosmos25_sharded, device="cpu").generate(images, "<ocr>", max_new_tokens=6)

    def unsupported(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on Python 3.13+")

    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.warns(UserWarning, match="torch.compile is not available here.*Python 3.13"):
        engine = kosmos_cli.load(kosmos25_sharded, device="cpu", compile=True)
    assert engine.compiled.broken and "compiling failed" in str(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at load; not again per step
        assert engine.generate(images, "<ocr>", max_new_tokens=6) == expected


def test_patch_ids_reach_the_embeddings_exactly_in_bf16():
    """bf16 holds integers exactly only up to 256: a tall page (300 patch rows here) must still get
    every row its own position embedding."""
    config = Kosmos25VisionConfig(hidden_size=16, intermediate_size=32, head_dim=8, num_hidden_layers=1,
                                  num_attention_heads=2, max_num_patches=4096)
    encoder = VisionEncoder(config).to(torch.bfloat16)
    rows = torch.arange(1, 301, dtype=torch.float32)
    patches = torch.zeros(1, 300, 770)
    patches[0, :, 0], patches[0, :, 1], patches[0, :, 2:] = rows, 1.0, 0.5
    seen = {}
    encoder.row_embedder.register_forward_pre_hook(lambda module, args: seen.update(rows=args[0]))
    encoder(patches)
    assert torch.equal(seen["rows"][0], rows.long())
    assert len(set(rows.to(torch.bfloat16).tolist())) < 300  # what casting first would have done


def test_float16_runs_the_whole_model(kosmos25_sharded):
    """fp16, the automatic dtype on GPUs before Ampere (T4, V100), through vision encoder, prefill and
    decoding (on the CPU here): greedy ids mostly as in fp32 (rounding may flip a near-tie)."""
    images = [noise_image(50, 40, seed=1), noise_image(30, 90, seed=2), noise_image(64, 64, seed=3)]
    expected = kosmos_cli.load(kosmos25_sharded, device="cpu").generate(images, "<ocr>", max_new_tokens=12)
    half = kosmos_cli.load(kosmos25_sharded, device="cpu", dtype="float16")
    assert half.dtype == torch.float16 and "in float16" in str(half)
    got = half.generate(images, "<ocr>", max_new_tokens=12)
    agreed = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(got, expected))
    assert agreed >= 0.5 * sum(map(len, expected)), (got, expected)


def test_the_log_names_the_gpu_and_its_generation(engine, monkeypatch):
    monkeypatch.setattr(engine_module, "cuda_capability", lambda device: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    monkeypatch.setattr(engine, "device", CUDA)
    assert " on cuda:0 (Tesla T4, sm_75) in float32, eager decode step" in str(engine)
