"""Find a checkpoint (local directory or Hub id) and load its safetensors into a model built on meta.

Only safetensors are ever read; `ckpt.pt` / `*.bin` are never downloaded nor unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch import nn

# What a model directory needs; everything else in the Hub repos (the 5 GB fairseq ckpt.pt,
# pytorch_model.bin, sample images) is never downloaded.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "*.safetensors",
    "model.safetensors.index.json",
]


class ModelLoadError(RuntimeError, ValueError):
    """A model could not be found or does not match what we expect; the message says what to do.
    Also a ValueError: a bad file in the model directory is a bad value, and the readers of
    config.json and the image processor's config are documented to raise ValueError."""


def read_json(model_dir: str | os.PathLike, name: str, *, required: bool = True) -> dict[str, Any] | None:
    """The JSON object in `model_dir/name`, or None for an optional file that is absent.

    A required file that is absent, a file that cannot be read, is not JSON or does not hold an
    object raises ModelLoadError naming it: a guess in its place would silently change the model."""
    path = Path(model_dir) / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not required:
            return None
        raise ModelLoadError(f"{path} is missing: is {model_dir} a Kosmos model directory?") from None
    except OSError as err:
        raise ModelLoadError(f"{path} cannot be read ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local directory as is; anything else is a Hub repo id fetched through the Hub cache.

    huggingface_hub honours HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE, and falls back to the cached
    snapshot when the Hub cannot be reached."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        what = "is not a directory" if path.exists() else "does not exist"
        raise ModelLoadError(
            f"model {text!r} {what}: pass a checkpoint directory (config.json, tokenizer, *.safetensors) "
            f"or a Hugging Face repo id such as microsoft/kosmos-2.5"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise ModelLoadError(f"the Hugging Face Hub has no model {text!r} (or it is gated; run `hf auth login`)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise ModelLoadError(
            f"{text} is not in the Hugging Face cache and {why}: run once with network access (without "
            f"HF_HUB_OFFLINE) to download it, or pass --model DIR pointing at a local copy"
        ) from None
    except HfHubHTTPError as err:
        raise ModelLoadError(f"downloading {text} failed: {err}") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shard files, from model.safetensors.index.json or the single model.safetensors."""
    index = read_json(model_dir, "model.safetensors.index.json", required=False)
    if index is not None:
        weight_map = index.get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(name, str) for name in weight_map.values())):
            raise ModelLoadError(f"{model_dir / 'model.safetensors.index.json'} is not a valid safetensors index "
                                 f"(it needs a weight_map from tensor names to file names)")
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (model_dir / "model.safetensors").exists():
        files = [model_dir / "model.safetensors"]
    else:
        found = ", ".join(sorted(p.name for p in model_dir.glob("*.bin") or ())) or "none"
        raise ModelLoadError(
            f"no safetensors weights in {model_dir} (expected model.safetensors or model.safetensors.index.json; "
            f"pickled checkpoints are never loaded, found: {found})"
        )
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ModelLoadError(f"{model_dir} lacks shard(s) {', '.join(missing)} listed in its index")
    return files


def rename(name: str, prefixes: Sequence[tuple[str, str]], leaves: Sequence[tuple[str, str]]) -> str | None:
    """Checkpoint tensor name -> our parameter name (None when no prefix rule matches).

    The longest matching prefix of `prefixes` is replaced (so their order does not matter), then
    every (old, new) pair of `leaves` is replaced wherever it occurs, in order."""
    matches = [(old, new) for old, new in prefixes if name.startswith(old)]
    if not matches:
        return None
    old, new = max(matches, key=lambda rule: len(rule[0]))
    name = new + name[len(old):]
    for old, new in leaves:
        name = name.replace(old, new)
    return name


def load_weights(
    model: nn.Module,
    model_dir: Path,
    prefixes: Sequence[tuple[str, str]],
    leaves: Sequence[tuple[str, str]],
    *,
    dtype: torch.dtype,
    device: torch.device,
    ignore: tuple[str, ...] = (),
) -> None:
    """Fill every parameter of `model` (built on the meta device) from the checkpoint's safetensors.

    Each tensor is read on its own, cast to `dtype` and moved to `device`, so peak host memory is the
    loaded weights plus one tensor. Checkpoint tensors whose names start with `ignore` are skipped
    (a stored head the config ties). Raises ModelLoadError naming any missing, unexpected or
    mis-shaped tensor."""
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
        for ckpt_name in names:
            if ckpt_name.startswith(ignore):
                continue
            name = rename(ckpt_name, prefixes, leaves)
            if name not in expected:
                raise ModelLoadError(f"unexpected tensor {ckpt_name!r} in {file}: does config.json match these weights?")
            # Open the file per tensor: safe_open memory-maps the whole shard, and the mapped pages it
            # touches count as ours until it is closed.
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor(ckpt_name)
            target = expected[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ModelLoadError(
                    f"tensor {ckpt_name!r} in {file} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            _assign(model, name, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
            del tensor
            loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        back = [(new, old) for old, new in prefixes], [(new, old) for old, new in leaves]
        names = [rename(name, *back) or name for name in missing[:5]]
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"the checkpoint in {model_dir} lacks tensor(s) {', '.join(names)}{more}")


def _assign(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, param)
