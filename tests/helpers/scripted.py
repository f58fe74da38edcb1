"""A tiny Kosmos-2.5 checkpoint that writes a known transcript, each token with a chosen probability.

A random checkpoint almost never emits a well-formed ``<bbox>`` line, so the parts of a page that get
a confidence of their own (lines, words) would go untested end to end. This one is the tiny random
checkpoint with its text decoder rewired so that its logits depend only on the last token and its
position:

- every block's attention output projection and MLP output projection are zero, so the blocks add
  nothing: what reaches the LM head is the final norm of the last token's embedding (redrawn larger,
  so that distinct tokens are far apart) plus its sinusoidal position embedding (which tells apart
  the same token at different places: each line's ``</bbox>``);
- the LM head is solved (least squares, exact to 1e-4: the <= 32 hidden states used are independent
  in 32 dimensions) so that where the k-th new token is predicted, the logit of the transcript's
  k-th token is ``strengths[k]`` and every other logit 0.

Greedy decoding then writes the transcript and EOS, whatever the image; the probability of token k is
exp(s) / (exp(s) + vocab - 1). The test checks the result against transformers' generate and
compute_transition_scores, so nothing here has to be trusted.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.kosmos2_5 import make_kosmos2_5_checkpoint

EOS = 2

# The transcript the tests' checkpoint writes (the `scripted` fixture), in the model's pixels (its
# input is about 288 x 208 for a small image).
TRANSCRIPT = ("<bbox><x_10><y_10><x_200><y_40></bbox>ab\n"
              "<bbox><x_10><y_60><x_250><y_90></bbox>cd ef\n"
              "<bbox><x_10><y_110><x_120><y_140></bbox>gh")
# Its tokens (the tiny tokenizer): 6 box tokens, "ab", "\n" | 6 box tokens, "c", "d", " e", "f", "\n" |
# 6 box tokens, "gh" | EOS; each with its own logit, so lines and words differ.
STRENGTHS = [12] * 6 + [9, 12] + [11] * 6 + [6, 7, 10, 12, 11] + [10] * 6 + [5] + [12]
LINES = [range(0, 8), range(8, 19), range(19, 26)]
WORDS = [[range(6, 7)], [range(14, 16), range(16, 18)], [range(25, 26)]]


def transcript_ids(path: Path, transcript: str) -> list[int]:
    """The transcript's ids under the checkpoint's tokenizer (the tokenizers package, not ours), then EOS."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(path) / "tokenizer.json")).encode(transcript, add_special_tokens=False).ids + [EOS]


def make_scripted_checkpoint(path: Path, transcript: str, strengths) -> Path:
    """Write the checkpoint into ``path``: for the ``<ocr>`` prompt it generates ``transcript`` then
    EOS, the k-th of those tokens with logit ``strengths[k]`` (one per token, or a function of k)."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from tests.helpers.kosmos2_5 import load_kosmos2_5_oracle

    path = make_kosmos2_5_checkpoint(path, tied=False, sharded=False, image_dependent=False)
    targets = transcript_ids(path, transcript)
    strengths = [strengths(k) for k in range(len(targets))] if callable(strengths) else list(strengths)
    if len(strengths) != len(targets):
        raise ValueError(f"{len(strengths)} strengths for {len(targets)} tokens")

    file = str(path / "model.safetensors")
    weights = load_file(file)
    text = "text_model.model."
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if name.startswith(text + "layers.") and (".self_attn.out_proj." in name or ".ffn.fc2." in name):
            tensor.zero_()
    embeddings = weights[text + "embed_tokens.weight"]
    embeddings.copy_(torch.randn(embeddings.shape, generator=generator) * 0.1)
    save_file(weights, file, metadata={"format": "pt"})

    # The hidden states the LM head sees when it predicts each token of the transcript, taken from
    # transformers' model on the prompt and the transcript (teacher forcing).
    model, processor = load_kosmos2_5_oracle(path)
    seen = []
    model.text_model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0][0]))
    inputs = processor(text="<ocr>", images=Image.new("RGB", (32, 32), "white"), return_tensors="pt")
    prompt = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([targets[:-1]])], dim=1)
    mask = torch.cat([inputs["image_embeds_position_mask"], torch.zeros(1, len(targets) - 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), image_embeds_position_mask=mask,
              flattened_patches=inputs["flattened_patches"])
    hidden = seen[-1][prompt - 1 :].double()  # (N, D)

    vocab = weights["text_model.lm_head.weight"].shape[0]
    wanted = torch.zeros(len(targets), vocab, dtype=torch.float64)  # (N, V): the logits asked for
    wanted[torch.arange(len(targets)), torch.tensor(targets)] = torch.tensor(strengths, dtype=torch.float64)
    head = torch.linalg.lstsq(hidden, wanted).solution.T  # (V, D)
    error = (hidden @ head.T - wanted).abs().max().item()
    if error > 1e-4:
        raise ValueError(f"{len(targets)} tokens do not fit: logits off by up to {error:.2g}")
    weights["text_model.lm_head.weight"] = head.float().contiguous()
    save_file(weights, file, metadata={"format": "pt"})
    return path
