"""Bad model folders get one clear HermesError naming the problem."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import mlx_hermes
from mlx_hermes import HermesError


from .conftest import copy_model, edit_config, edit_weights


@pytest.fixture
def folder(hf_checkpoint, tmp_path):
    return copy_model(hf_checkpoint, tmp_path / "model")


def load_error(path) -> str:
    with pytest.raises(HermesError) as e:
        mlx_hermes.load(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nope")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    assert "no config.json" in load_error(folder)


def test_unreadable_config(folder):
    (folder / "config.json").write_text("{not json")
    assert "config.json" in load_error(folder)


def test_wrong_model_type(folder):
    edit_config(folder, model_type="llama")
    assert "'llama'" in load_error(folder)


def test_missing_tensor(folder):
    edit_weights(folder, lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    assert load_error(folder) == "missing tensor model.layers.1.self_attn.k_proj.weight"


def test_missing_expert(folder):
    edit_weights(folder, lambda w: w.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in load_error(folder)


def test_wrong_shape(folder):
    def shrink(w):
        w["model.layers.0.self_attn.q_proj.weight"] = mx.zeros((8, 64))
    edit_weights(folder, shrink)
    message = load_error(folder)
    assert "model.layers.0.self_attn.q_proj.weight" in message and "[8, 64]" in message


def test_unexpected_tensor(folder):
    def add(w):
        w["model.layers.0.mystery.weight"] = mx.zeros((2,))
    edit_weights(folder, add)
    assert "model.layers.0.mystery.weight" in load_error(folder)


def test_config_with_fewer_experts_than_the_weights(folder):
    edit_config(folder, num_local_experts=3)
    assert "block_sparse_moe.gate.weight has shape [4, 64], expected [3, 64]" in load_error(folder)


def test_truncated_shard(folder):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert "truncated" in load_error(folder)


def test_garbage_shard(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 4)
    assert "not a valid safetensors file" in load_error(folder)


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    assert "no safetensors weights" in load_error(folder)


def test_missing_shard_named_in_index(folder):
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors" in load_error(folder)


def test_missing_tokenizer(folder):
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer_config.json").unlink()
    assert "tokenizer" in load_error(folder)


def test_repo_id_without_connection(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = load_error("nobody/no-such-model")
    assert "nobody/no-such-model" in message


def test_bfloat16_with_float_experts(tiny_model):
    """MLX's CPU runs float experts in float32 only: a clear error at load there;
    on a GPU the model runs in bfloat16, long prompts included."""
    if mx.default_device() == mx.cpu:
        with pytest.raises(HermesError, match="does not run on MLX's CPU"):
            mlx_hermes.load(tiny_model, dtype="bfloat16")
        return
    model, tokenizer = mlx_hermes.load(tiny_model, dtype="bfloat16")
    assert mlx_hermes.generate(model, tokenizer, "word " * 40, max_tokens=3) is not None
