"""How sure the model was: per-token log-probabilities against the oracle's (transformers'
compute_transition_scores over its raw logits), batched with pages of different lengths, eager and
compiled, and only for the tokens an output keeps."""

import math

import pytest
import torch

import kosmos_cli
from kosmos_cli.models import layers
from tests.helpers.images import noise_image
from tests.helpers.kosmos2 import load_kosmos2_oracle
from tests.helpers.kosmos2_5 import load_kosmos2_5_oracle
from tests.helpers.parity import SHAPES

TOLERANCE = 1e-4  # fp32 on the CPU, in nats
PAGES = [(noise_image(*shape, seed=i), prompt, limit, minimum)
         for i, (shape, prompt, limit, minimum) in enumerate(zip(
             SHAPES + SHAPES[:2], ["<ocr>", "<md>", "<ocr>", "<md>", "<ocr>", "<ocr>"], [30, 12, 24, 6, 18, 9],
             [0, 0, 20, 0, 0, 9]))]


def oracle_scores(model, inputs, max_new_tokens, **options):
    """The oracle's greedy new ids up to its EOS and the log-probability of each, EOS included:
    log_softmax of the raw logits at each step (output_logits, not the processed scores)."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, output_logits=True,
                         return_dict_in_generate=True, **options)
    scores = model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)[0].tolist()
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    return new[:end], scores[:end]


@pytest.fixture(scope="module")
def k25_expected(kosmos25_sharded):
    model, processor = load_kosmos2_5_oracle(kosmos25_sharded)
    expected = []
    for image, prompt, limit, minimum in PAGES:
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        inputs.pop("width"), inputs.pop("height")
        expected.append(oracle_scores(model, inputs, limit, min_new_tokens=minimum))
    return expected


def check(outputs, expected):
    for out, (ids, scores) in zip(outputs, expected):
        stopped_on_eos = len(ids) > len(out.ids)
        assert out.ids == ids[: len(out.ids)] and len(out.ids) + stopped_on_eos == len(ids)
        assert (out.stop == "eos") == stopped_on_eos
        assert len(out.logprobs) == len(ids)
        assert max(abs(a - b) for a, b in zip(out.logprobs, scores)) <= TOLERANCE
        assert all(lp <= 0 for lp in out.logprobs)


def run(engine, batch_size):
    images, prompts, limits, minimums = (list(column) for column in zip(*PAGES))
    return engine.run(images, prompts, limits, minimums, batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_kosmos2_5_log_probabilities_match_the_oracle(engine, k25_expected, batch_size):
    """The EOS ban of min_new_tokens leaves the normalisation alone (pages 3 and 6 have one)."""
    check(run(engine, batch_size), k25_expected)


@pytest.mark.parametrize("attention", [
    pytest.param("flex", marks=pytest.mark.skipif(layers.flex_unsupported(torch.device("cpu"), 96) is not None,
                                                  reason="FlexAttention decoding needs torch >= 2.10")),
    pytest.param("sdpa", marks=pytest.mark.slow),  # one compiled case is enough for CI (a CPU compile is slow)
])
def test_the_compiled_step_gives_the_same_log_probabilities(kosmos25_sharded, k25_expected, attention):
    compiled = kosmos_cli.load(kosmos25_sharded, device="cpu", dtype="float32", compile=True, attention=attention)
    check(run(compiled, 4), k25_expected)
    assert not compiled.compiled.broken


def test_kosmos2_log_probabilities_match_the_oracle_under_the_ngram_ban(k2_dir):
    """Kosmos-2 decodes with no_repeat_ngram_size=3: the ban changes the pick, not the normalisation."""
    engine = kosmos_cli.load(k2_dir, device="cpu", dtype="float32")
    model, processor = load_kosmos2_oracle(k2_dir)
    images = [noise_image(*shape, seed=i) for i, shape in enumerate([(224, 224), (640, 480), (33, 500)])]
    prompts = ["<grounding> An image of", "<grounding><phrase> a snowman</phrase>", "An image of"]
    expected = []
    for image, prompt in zip(images, prompts):
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        inputs = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask", "image_embeds_position_mask")}
        expected.append(oracle_scores(model, inputs, 20, no_repeat_ngram_size=3))
    check(engine.run(images, prompts, 20, batch_size=3), expected)


def test_a_looping_page_keeps_the_log_probabilities_of_what_it_keeps(engine):
    """A row stopped by the loop guard stepped on until the check found the loop; only the kept
    prefix's tokens have log-probabilities, whatever the batch."""
    from kosmos_cli.models.generation import LoopCheck

    check_at = LoopCheck(keep=lambda new: 7 if len(new) >= 10 else None)
    outputs = engine.run([PAGES[0][0], PAGES[1][0]], "<ocr>", 60, min_new_tokens=60, loop_check=check_at, batch_size=2)
    alone = engine.run([PAGES[0][0]], "<ocr>", 60, min_new_tokens=60, loop_check=check_at)[0]
    for out in outputs:
        assert out.stop == "loop" and len(out.ids) == len(out.logprobs) == 7
    assert outputs[0].ids == alone.ids
    assert max(abs(a - b) for a, b in zip(outputs[0].logprobs, alone.logprobs)) <= 1e-5
    assert math.isfinite(sum(outputs[0].logprobs))
