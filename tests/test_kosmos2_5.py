"""Kosmos-2.5 against the oracle (transformers, eager, fp32) on tiny random checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import kosmos_cli
from kosmos_cli.processing.images import kosmos2_5_patches
from kosmos_cli.processing.kosmos2_5 import chat_prompt
from tests.helpers.images import noise_image
from tests.helpers.kosmos2_5 import load_kosmos2_5_oracle
from tests.helpers.parity import SHAPES, full_forward, oracle_generate, our_logits


@pytest.fixture(scope="module")
def sharded(kosmos25_sharded):
    return kosmos_cli.load(kosmos25_sharded, device="cpu", dtype="float32"), load_kosmos2_5_oracle(kosmos25_sharded)


@pytest.fixture(scope="module")
def tied(kosmos25_tied):
    return kosmos_cli.load(kosmos25_tied, device="cpu", dtype="float32"), load_kosmos2_5_oracle(kosmos25_tied)


@pytest.mark.parametrize("fixture", ["tied", "sharded"])
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_oracle(request, fixture, shape):
    engine, (model, processor) = request.getfixturevalue(fixture)
    image = noise_image(*shape, seed=shape[0])
    inputs = processor(text="<ocr>", images=image, return_tensors="pt")
    inputs.pop("width"), inputs.pop("height")
    with torch.no_grad():
        expected = model(**inputs).logits[0]
    got = our_logits(engine, image, "<ocr>")
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("prompt", ["<ocr>", "<md>"])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_greedy_ids_match_oracle(sharded, prompt, shape):
    engine, oracle = sharded
    image = noise_image(*shape, seed=1)
    expected = oracle_generate(oracle, image, prompt, 24)
    assert engine.generate([image], prompt, max_new_tokens=24) == [expected]


def test_tied_checkpoint_generates_like_oracle(tied):
    engine, oracle = tied
    image = noise_image(90, 60, seed=3)
    assert engine.generate([image], "<md>", max_new_tokens=16) == [oracle_generate(oracle, image, "<md>", 16)]


def test_output_depends_on_image(sharded):
    engine, _ = sharded
    a, b = engine.generate([noise_image(80, 60, seed=10), noise_image(60, 200, seed=11)], "<ocr>", max_new_tokens=20)
    assert a != b


def test_min_new_tokens_matches_oracle(sharded):
    engine, oracle = sharded
    image = noise_image(50, 50, seed=4)
    expected = oracle_generate(oracle, image, "<ocr>", 12, min_new_tokens=12)
    got = engine.generate([image], "<ocr>", max_new_tokens=12, min_new_tokens=12)[0]
    assert got == expected and len(got) == 12


def test_batch_mixing_sizes_prompts_and_limits_equals_one_at_a_time(sharded):
    engine, _ = sharded
    images = [noise_image(*s, seed=i) for i, s in enumerate([(40, 30), (300, 120), (64, 640), (128, 128)])]
    prompts = ["<ocr>", "<md>", chat_prompt("What is the total, in euros?"), "<ocr>"]
    limits = [20, 7, 13, 1]
    batched = engine.generate(images, prompts, max_new_tokens=limits)
    alone = [engine.generate([im], p, max_new_tokens=n)[0] for im, p, n in zip(images, prompts, limits)]
    assert batched == alone
    assert [len(ids) <= n for ids, n in zip(batched, limits)] == [True] * 4


def test_cached_decoding_equals_uncached_forward(sharded):
    engine, _ = sharded
    image = noise_image(100, 80, seed=5)
    new = engine.generate([image], "<md>", max_new_tokens=20)[0]
    ids, mask = engine.tokenizer.prompt("<md>", engine.config.latent_query_num)
    full = ids + new
    logits = full_forward(engine, kosmos2_5_patches(image, engine.image_processor.max_patches).patches[None], [full], [mask + [0] * len(new)])
    # Each generated token is the argmax of the uncached logits at the position before it.
    assert logits[0, len(ids) - 1 : -1].argmax(-1).tolist() == new


def test_positions_beyond_max_position_embeddings(kosmos25_sharded, tmp_path):
    """Prompt + output longer than max_position_embeddings keeps working and matches the oracle."""
    short = tmp_path / "short-positions"
    shutil.copytree(kosmos25_sharded, short)
    config = json.loads((short / "config.json").read_text())
    prompt_len = len(kosmos_cli.load(short, device="cpu").tokenizer.prompt("<ocr>", config["latent_query_num"])[0])
    config["text_config"]["max_position_embeddings"] = prompt_len + 4
    (short / "config.json").write_text(json.dumps(config))
    engine, oracle = kosmos_cli.load(short, device="cpu"), load_kosmos2_5_oracle(short)
    image = noise_image(70, 50, seed=6)
    expected = oracle_generate(oracle, image, "<ocr>", 30, min_new_tokens=30)
    assert engine.generate([image], "<ocr>", max_new_tokens=30, min_new_tokens=30) == [expected]


def test_decode_keeps_layout_tokens(sharded):
    engine, (_, processor) = sharded
    tok = engine.tokenizer
    ids = [tok.token_to_id(t) for t in ("<ocr>", "<bbox>", "<x_12>", "<y_7>", "</bbox>")] + tok.encode("Total 5,00") + [tok.eos_id]
    assert "<bbox><x_12><y_7></bbox>" in engine.decode(ids)
    assert engine.decode(ids) == processor.decode(ids, skip_special_tokens=True)


def test_generate_validates_arguments(sharded):
    engine, _ = sharded
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        engine.generate([noise_image(9, 9, 0)] * 2, ["<ocr>"], max_new_tokens=2)
    assert engine.generate([], "<ocr>") == []


def test_transformers_is_never_imported(kosmos25_tied):
    code = (
        "import sys, numpy as np, kosmos_cli\n"
        "from PIL import Image\n"
        f"engine = kosmos_cli.load({str(kosmos25_tied)!r}, device='cpu')\n"
        "img = Image.fromarray(np.full((20, 30, 3), 128, np.uint8))\n"
        "ids = engine.generate([img], '<ocr>', max_new_tokens=3)\n"
        "engine.decode(ids[0])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
