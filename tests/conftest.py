"""Tiny random Mixtral checkpoints, written once per test session.

transformers' MixtralForCausalLM is the reference: it writes the checkpoints
(in the original Hugging Face layout, fp32) and computes the logits ours must
match. Shapes include odd ones: head counts that are not powers of two, GQA,
MQA, an explicit head_dim, 4 to 8 experts.
"""

from __future__ import annotations

import os

# Float32 references are compared in full float32: MLX's CUDA build would
# otherwise run float32 matmuls as TF32 (~1e-3 relative), as it may on M5 GPUs.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import shutil
from pathlib import Path

import pytest

from mlx_hermes import tiny
from mlx_hermes.convert_package import converter_package

converter_package()  # a source checkout (as on the GPU machine) has convert/ but no mlx_hermes_convert

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = tiny.TOKENIZER

SHAPES = {
    # 4 heads over 2 kv heads, 4 experts
    "gqa": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4),
    # 6 heads (not a power of two) over 3 kv heads, 8 experts, 3 layers
    "odd": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=3, num_local_experts=8),
    # 3 heads sharing 1 kv head, head_dim 32 != hidden/heads, 6 experts, rope 1e4
    "mqa": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                num_local_experts=6, rope_theta=10000.0),
}


def copy_model(src: Path, dest: Path, **config_changes) -> Path:
    """A copy of a model folder to break or change, e.g. max_position_embeddings=64."""
    shutil.copytree(src, dest)
    edit_config(dest, **config_changes)
    return dest


def edit_config(folder: Path, **changes) -> None:
    import json

    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    """Rewrite a one-file checkpoint after edit(weights_dict)."""
    import mlx.core as mx

    file = folder / "model.safetensors"
    weights = dict(mx.load(str(file)))
    edit(weights)
    mx.save_safetensors(str(file), weights)


def write_hf_checkpoint(dest: Path, seed: int = 0, shards: int = 1, **shape) -> Path:
    """A checkpoint in the original layout, fp32: transformers writes the config,
    the weights come from our own seeded generator (mlx_hermes.tiny), so a
    transformers release cannot change what the test models say."""
    from transformers import MixtralConfig

    rope_theta = shape.pop("rope_theta", 1e6)
    config = MixtralConfig(
        vocab_size=32002,
        max_position_embeddings=32768,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=32000,
        dtype="float32",
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **shape,
    )
    dest.mkdir(parents=True)
    config.save_pretrained(dest)
    tensors = tiny.tiny_tensors({**config.to_dict(), "head_dim": config.head_dim}, seed)
    tiny.write_weights(tensors, dest, "float32", shards)
    tiny.copy_tokenizer(dest)
    return dest


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        name: write_hf_checkpoint(root / name, seed=i, **dict(shape))
        for i, (name, shape) in enumerate(SHAPES.items())
    }


@pytest.fixture(scope="session")
def hf_checkpoint(hf_checkpoints) -> Path:
    return hf_checkpoints["gqa"]


@pytest.fixture(scope="session")
def torch_models(hf_checkpoints):
    """transformers' reference models, loaded once."""
    from transformers import MixtralForCausalLM

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = MixtralForCausalLM.from_pretrained(hf_checkpoints[name]).eval()
        return cache[name]

    return get


@pytest.fixture(scope="session")
def mlx_lm_quantized(hf_checkpoint, tmp_path_factory):
    """Folders in today's mlx-lm layout, made by mlx-lm's own converter."""
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("mlxq")
    cache = {}

    def get(bits: int, group_size: int) -> Path:
        key = (bits, group_size)
        if key not in cache:
            out = root / f"q{bits}g{group_size}"
            # float32, so that mlx-lm and we compute in the same dtype
            convert(str(hf_checkpoint), str(out), quantize=True, q_bits=bits,
                    q_group_size=group_size, dtype="float32")
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """examples/make_tiny_model.py's model: the real checkpoint's layout, bf16."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_model",
                                                  ROOT / "examples" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("tiny") / "tiny-hermes"
    module.main([str(out)])
    return out


@pytest.fixture(scope="session")
def loaded(hf_checkpoints):
    """(model, tokenizer) per shape, loaded once."""
    import mlx_hermes

    cache = {}

    def get(name: str = "gqa"):
        if name not in cache:
            cache[name] = mlx_hermes.load(hf_checkpoints[name])
        return cache[name]

    return get
