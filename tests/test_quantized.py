"""Quantized folders: today's mlx-lm layout and the old mlx-community one."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_hermes
from mlx_hermes import chip
from mlx_hermes.model import checkpoint_expert_names
from mlx_hermes.moe import Experts

from .test_model import assert_close, prompt


def mlx_lm_logits(path, tokens):
    import mlx_lm

    model, _ = mlx_lm.load(str(path))
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


ON_CUDA = chip.on_cuda()


@pytest.mark.parametrize("bits,group_size", [(4, 32), (5, 32), (6, 32), (8, 32), (4, 64)])
def test_mlx_lm_folder_matches_mlx_lm(mlx_lm_quantized, bits, group_size):
    if ON_CUDA and group_size == 64:
        pytest.skip("MLX's CUDA quantized_matmul is wrong when a row is one group (K 64, group "
                    "64, 2+ rows; mlx-lm's own model gives NaN here too): "
                    "benchmarks/mlx_cuda_bugs.md, reproduced by benchmarks/mlx_cuda_bugs.py")
    path = mlx_lm_quantized(bits, group_size)
    model, _ = mlx_hermes.load(path)
    tokens = prompt(40, seed=bits)
    ours = np.array(model(mx.array([tokens]))[0])
    assert_close(ours, mlx_lm_logits(path, tokens))

    moe = model.layers[0].block_sparse_moe
    assert moe.switch_mlp.gate_up_proj.bits == bits  # gate and up, fused at load
    assert model.layers[0].self_attn.qkv_proj.group_size == group_size  # q, k, v fused at load
    if group_size == 64:
        # The expert FFN width (96) does not divide into groups of 64, so mlx-lm
        # left down_proj in float: we must see that from the tensors.
        assert not hasattr(moe.switch_mlp.down_proj, "scales")


def test_mixed_bits_per_layer(hf_checkpoint, tmp_path):
    from mlx_lm import convert

    def recipe(path, module):
        if path.endswith("block_sparse_moe.gate") or path.endswith("v_proj"):
            return {"bits": 8, "group_size": 32}
        if "switch_mlp" in path:
            return {"bits": 4, "group_size": 32}
        return {"bits": 6, "group_size": 64}

    out = tmp_path / "mixed"
    convert(str(hf_checkpoint), str(out), quantize=True, q_bits=4, q_group_size=32,
            dtype="float32", quant_predicate=recipe)
    model, _ = mlx_hermes.load(out)
    layer = model.layers[1]
    assert (layer.block_sparse_moe.gate.bits, layer.self_attn.v_proj.bits) == (8, 8)
    assert (layer.self_attn.q_proj.bits, layer.self_attn.q_proj.group_size) == (6, 64)
    assert "qkv_proj" not in layer.self_attn  # v_proj has other bits: q, k, v stay apart
    assert layer.block_sparse_moe.switch_mlp.gate_up_proj.bits == 4
    tokens = prompt(12, seed=5)
    assert_close(np.array(model(mx.array([tokens]))[0]), mlx_lm_logits(out, tokens))


def write_old_layout(src, dest):
    """The layout of the public mlx-community 4-bit Hermes 2 Mixtral: experts
    quantized one by one under their original names, the router in float,
    `weights.NN.safetensors` with no index, one global `quantization`."""
    weights = {}
    for f in sorted(src.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    config = json.loads((src / "config.json").read_text())
    q = config["quantization"]
    old = {}
    for name, value in weights.items():
        if ".switch_mlp." in name:
            prefix, rest = name.split(".switch_mlp.")
            proj, part = rest.split(".")
            for e, n in enumerate(checkpoint_expert_names(prefix, proj, value.shape[0], part)):
                old[n] = value[e]
        elif name.endswith("block_sparse_moe.gate.weight"):
            base = name[: -len(".weight")]
            old[name] = mx.dequantize(value, weights[f"{base}.scales"], weights[f"{base}.biases"],
                                      group_size=q["group_size"], bits=q["bits"])
        elif ".block_sparse_moe.gate." not in name:
            old[name] = value
    dest.mkdir()
    names = sorted(old)
    half = len(names) // 2
    for i, part in enumerate([names[:half], names[half:]]):
        mx.save_safetensors(str(dest / f"weights.{i:02d}.safetensors"), {n: old[n] for n in part})
    config["quantization"] = {"group_size": q["group_size"], "bits": q["bits"]}
    (dest / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",
                                                        "added_tokens.json"):
            (dest / f.name).write_bytes(f.read_bytes())


def test_old_mlx_community_layout(mlx_lm_quantized, tmp_path):
    src = mlx_lm_quantized(4, 32)
    write_old_layout(src, tmp_path / "old")
    old, _ = mlx_hermes.load(tmp_path / "old")
    new, _ = mlx_hermes.load(src)

    router = old.layers[0].block_sparse_moe.gate
    assert not hasattr(router, "scales"), "the router must stay in float"
    experts = old.layers[0].block_sparse_moe.switch_mlp
    assert isinstance(experts, Experts) and experts.gate_up_proj.weight.dtype == mx.uint32

    tokens = prompt(40, seed=9)
    assert_close(np.array(old(mx.array([tokens]))[0]), np.array(new(mx.array([tokens]))[0]),
                 rel=1e-5)


def test_compute_dtype_defaults_to_float32_on_cpu_and_can_be_overridden(mlx_lm_quantized):
    path = mlx_lm_quantized(4, 32)
    model, _ = mlx_hermes.load(path)
    floats = {v.dtype for _, v in tree_flatten(model.parameters()) if v.dtype != mx.uint32}
    assert floats == {mx.float32}
    model, _ = mlx_hermes.load(path, dtype="bfloat16")
    floats = {v.dtype for _, v in tree_flatten(model.parameters()) if v.dtype != mx.uint32}
    assert floats == {mx.bfloat16}
    assert model(mx.array([[1, 2, 3]])).dtype == mx.bfloat16
