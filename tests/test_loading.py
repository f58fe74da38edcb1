"""Finding and loading checkpoints: layouts, dtypes and every error a user can hit."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kosmos_cli
from kosmos_cli.engine import read_config
from kosmos_cli.models.config import Kosmos25Config
from kosmos_cli.models.loading import ModelLoadError, resolve_model_dir


@pytest.fixture
def tied_copy(kosmos25_tied, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(kosmos25_tied, path)
    return path


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_sharded_untied_checkpoint_loads_every_tensor(kosmos25_sharded):
    engine = kosmos_cli.load(kosmos25_sharded, device="cpu")
    assert engine.kind == "kosmos-2.5"
    assert engine.model.text.lm_head is not None
    assert not any(p.is_meta for p in engine.model.parameters())


def test_loading_does_not_import_the_compiler(kosmos25_tied, k2_dir):
    """An eager engine never needs torch._dynamo, and importing it costs every process 2 s of CPU
    (it came in through the random init of embeddings built on the meta device)."""
    child = ("import sys, kosmos_cli\n"
             "for model in sys.argv[1:]: kosmos_cli.load(model, device='cpu', compile=False)\n"
             "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", child, str(kosmos25_tied), str(k2_dir)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


def test_tied_head_shares_the_embedding(kosmos25_tied):
    engine = kosmos_cli.load(kosmos25_tied, device="cpu")
    assert engine.model.text.lm_head is None
    assert not any(p.is_meta for p in engine.model.parameters())


def test_weights_are_cast_while_loading(kosmos25_tied):
    engine = kosmos_cli.load(kosmos25_tied, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}


def test_processor_config_layout_loads_like_preprocessor_layout(kosmos25_tied, kosmos25_processor_layout):
    a = kosmos_cli.load(kosmos25_tied, device="cpu")
    b = kosmos_cli.load(kosmos25_processor_layout, device="cpu")
    assert a.image_processor.max_patches == b.image_processor.max_patches


def test_missing_tensor_is_named(tied_copy):
    rewrite_weights(tied_copy, lambda t: t.pop("text_model.model.layers.1.ffn.fc2.weight"))
    with pytest.raises(ModelLoadError, match=r"lacks tensor\(s\) text_model\.model\.layers\.1\.ffn\.fc2\.weight"):
        kosmos_cli.load(tied_copy, device="cpu")


def test_wrong_shape_is_named(tied_copy):
    def shrink(t):
        t["vision_model.layernorm.weight"] = t["vision_model.layernorm.weight"][:-1].clone()

    rewrite_weights(tied_copy, shrink)
    with pytest.raises(ModelLoadError, match=r"'vision_model\.layernorm\.weight'.*has shape"):
        kosmos_cli.load(tied_copy, device="cpu")


def test_unexpected_tensor_is_named(tied_copy):
    rewrite_weights(tied_copy, lambda t: t.update({"text_model.model.bogus.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'text_model\.model\.bogus\.weight'"):
        kosmos_cli.load(tied_copy, device="cpu")


def test_untied_config_without_head_is_an_error(tied_copy):
    config = json.loads((tied_copy / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.get("text_config", {})["tie_word_embeddings"] = False
    (tied_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"text_model\.lm_head\.weight"):
        kosmos_cli.load(tied_copy, device="cpu")


def test_pickled_checkpoints_are_never_loaded(tied_copy):
    (tied_copy / "model.safetensors").unlink()
    (tied_copy / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ModelLoadError, match=r"no safetensors weights.*never loaded.*pytorch_model\.bin"):
        kosmos_cli.load(tied_copy, device="cpu")


def test_index_naming_a_missing_shard(kosmos25_sharded, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(kosmos25_sharded, path)
    next(path.glob("model-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="lacks shard"):
        kosmos_cli.load(path, device="cpu")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        read_config(tmp_path)


# Every JSON file a model directory may hold, in a checkpoint that has it: (fixture, file).
JSON_FILES = [
    ("kosmos25_tied", "config.json"),
    ("kosmos25_tied", "generation_config.json"),
    ("kosmos25_tied", "tokenizer.json"),
    ("kosmos25_tied", "tokenizer_config.json"),
    ("kosmos25_tied", "preprocessor_config.json"),
    ("kosmos25_processor_layout", "processor_config.json"),
    ("kosmos25_sharded", "model.safetensors.index.json"),
    ("k2", "tokenizer.json"),
    ("k2", "tokenizer_config.json"),
    ("k2", "special_tokens_map.json"),
    ("k2", "added_tokens.json"),
]
DAMAGE = {"not JSON": b"{not json", "not an object": b"[1, 2]", "not UTF-8": b'{"a": "\xff"}', "a directory": None}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("checkpoint, name", JSON_FILES)
def test_a_damaged_json_file_is_a_load_error_naming_it(request, tmp_path, checkpoint, name, damage):
    model = tmp_path / "model"
    model.mkdir()
    for path in Path(request.getfixturevalue(checkpoint)).iterdir():
        if path.name != name:
            (model / path.name).symlink_to(path)
    if DAMAGE[damage] is None:
        (model / name).mkdir()
    else:
        (model / name).write_bytes(DAMAGE[damage])
    with pytest.raises(ModelLoadError, match=re.escape(str(model / name))):
        kosmos_cli.load(model, device="cpu")


def test_config_is_lenient():
    config = Kosmos25Config.from_hf(
        {"model_type": "kosmos-2.5", "future_key": 1, "vision_config": {"d_ff": 10, "d_kv": 4, "seq_len": 64}}
    )
    assert (config.vision.intermediate_size, config.vision.head_dim, config.vision.max_num_patches) == (10, 4, 64)
    assert config.text.embed_dim == 1536


def test_offline_without_cache_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set.*--model DIR"):
        resolve_model_dir("microsoft/kosmos-2.5")


def test_hub_cache_is_used_offline(kosmos25_tied, tmp_path, monkeypatch):
    """A snapshot already in the Hub cache loads with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--microsoft--kosmos-2.5" / "snapshots" / ("a" * 40)
    shutil.copytree(kosmos25_tied, snapshot)
    (cache / "models--microsoft--kosmos-2.5" / "refs").mkdir()
    (cache / "models--microsoft--kosmos-2.5" / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("microsoft/kosmos-2.5") == snapshot


def test_not_a_directory_nor_repo_id(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist: pass a checkpoint directory"):
        resolve_model_dir(str(tmp_path / "nope"))
