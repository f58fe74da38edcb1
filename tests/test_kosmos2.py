"""Kosmos-2 against the oracle (transformers, eager, fp32) on a tiny random checkpoint."""

import pytest
import torch

import kosmos_cli
from kosmos_cli.models.cache import StepPlan
from kosmos_cli.models.layers import flex_unsupported
from kosmos_cli.tasks.grounding import parse_grounding
from tests.helpers.images import noise_image
from tests.helpers.kosmos2 import load_kosmos2_oracle

PROMPTS = ["<grounding> An image of", "<grounding><phrase> a snowman</phrase>", "An image of", "Describe this: Größe, 東京!"]
SHAPES = [(224, 224), (640, 480), (33, 500)]


@pytest.fixture(scope="module")
def kosmos2(k2_dir):
    return kosmos_cli.load(k2_dir, device="cpu", dtype="float32"), load_kosmos2_oracle(k2_dir)


def oracle_inputs(processor, image, prompt):
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    return {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask", "image_embeds_position_mask")}


def oracle_generate(oracle, image, prompt, max_new_tokens):
    model, processor = oracle
    inputs = oracle_inputs(processor, image, prompt)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, no_repeat_ngram_size=3)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.config.text_config.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def full_forward(engine, image, ids, mask):
    decoder, ids, mask = engine.model.text, torch.tensor([ids]), torch.tensor([mask])
    rows = torch.arange(1)
    with torch.inference_mode():
        embeds = engine.model.encode_images(engine.prepare(image).vision_input[None])
        cache = decoder.new_cache(1, ids.shape[1], dtype=torch.float32, device="cpu")
        x = decoder.embed(ids, torch.zeros_like(rows), embeds, mask)
        return decoder.logits(decoder(x, cache, StepPlan.prefill_rows(rows)))[0]


def test_kind(kosmos2):
    assert kosmos2[0].kind == "kosmos-2"


@pytest.mark.parametrize("prompt", PROMPTS[:2])
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_oracle(kosmos2, prompt, shape):
    engine, (model, processor) = kosmos2
    image = noise_image(*shape, seed=shape[1])
    inputs = oracle_inputs(processor, image, prompt)
    with torch.no_grad():
        expected = model(**inputs).logits[0]
    ids, mask = engine.tokenizer.prompt(prompt, engine.config.latent_query_num)
    assert ids == inputs["input_ids"][0].tolist()
    assert mask == inputs["image_embeds_position_mask"][0].tolist()
    assert (full_forward(engine, image, ids, mask) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_ids_match_oracle(kosmos2, prompt):
    engine, oracle = kosmos2
    image = noise_image(300, 200, seed=len(prompt))
    assert engine.generate([image], prompt, max_new_tokens=30) == [oracle_generate(oracle, image, prompt, 30)]


def test_no_repeat_ngram_is_a_parameter(kosmos2):
    engine, _ = kosmos2
    image = noise_image(100, 100, seed=9)
    plain = engine.generate([image], PROMPTS[0], max_new_tokens=40, no_repeat_ngram_size=0)[0]
    blocked = engine.generate([image], PROMPTS[0], max_new_tokens=40)[0]
    trigrams = [tuple(blocked[i : i + 3]) for i in range(len(blocked) - 2)]
    assert len(trigrams) == len(set(trigrams))
    assert plain != blocked or len(set(tuple(plain[i : i + 3]) for i in range(len(plain) - 2))) == len(plain) - 2


def test_batch_of_different_prompts_equals_one_at_a_time(kosmos2):
    engine, _ = kosmos2
    images = [noise_image(*s, seed=i) for i, s in enumerate(SHAPES + [(90, 90)])]
    limits = [25, 5, 17, 30]
    batched = engine.generate(images, PROMPTS, max_new_tokens=limits)
    assert batched == [engine.generate([im], p, max_new_tokens=n)[0] for im, p, n in zip(images, PROMPTS, limits)]


def test_compiled_decoding_equals_eager(kosmos2):
    """The compiled step with the 3-gram ban inside it (FlexAttention, the CPU default when compiled
    where this torch supports it): the same ids, and the same log-probabilities within 1e-5 nats."""
    engine, _ = kosmos2
    compiled = kosmos_cli.load(engine.name, device="cpu", dtype="float32", compile=True)
    images = [noise_image(*s, seed=i) for i, s in enumerate(SHAPES + [(90, 90)])]
    limits = [40, 5, 17, 30]
    got, want = compiled.run(images, PROMPTS, limits), engine.run(images, PROMPTS, limits)
    assert [o.ids for o in got] == [o.ids for o in want]
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs, strict=True)) <= 1e-5
    assert not compiled.compiled.broken
    assert compiled.compiled.flex == (flex_unsupported(torch.device("cpu"), compiled.config.text.embed_dim
                                                       // compiled.config.text.attention_heads) is None)


def test_cached_decoding_equals_uncached_forward(kosmos2):
    engine, _ = kosmos2
    image = noise_image(150, 120, seed=7)
    new = engine.generate([image], PROMPTS[0], max_new_tokens=20, no_repeat_ngram_size=0)[0]
    ids, mask = engine.tokenizer.prompt(PROMPTS[0], engine.config.latent_query_num)
    logits = full_forward(engine, image, ids + new, mask + [0] * len(new))
    assert logits[len(ids) - 1 : -1].argmax(-1).tolist() == new


def test_generated_text_parses_like_the_oracle(kosmos2):
    engine, (_, processor) = kosmos2
    image = noise_image(224, 224, seed=3)
    ids = engine.generate([image], PROMPTS[0], max_new_tokens=30)[0]
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    caption, entities = parse_grounding(text)
    expected_caption, expected_entities = processor.post_process_generation(text)
    assert caption == expected_caption
    assert [(e.text, tuple(e.span), [tuple(b) for b in e.boxes]) for e in entities] == [
        (t, tuple(s), [tuple(b) for b in bs]) for t, s, bs in expected_entities
    ]
