"""Tiny random Mixtral checkpoints in the real Hermes 2 layout.

For the demo (examples/make_tiny_model.py), the tests and self-checks: a
folder that looks like NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO (config,
per-expert tensors `experts.E.w1/w2/w3` in sharded safetensors with an index,
the real tokenizer), only small.

The weights come from numpy's `RandomState`, whose stream numpy keeps frozen
across releases, so a given seed and shape give the same model on every
install: no library's initialiser (transformers', MLX's) decides what a test
model says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .model import checkpoint_expert_names

TOKENIZER = Path(__file__).resolve().parent / "hermes_tokenizer"


def tiny_config(*, hidden_size: int = 128, intermediate_size: int = 256,
                num_hidden_layers: int = 2, num_attention_heads: int = 4,
                num_key_value_heads: int = 2, num_local_experts: int = 8,
                num_experts_per_tok: int = 2, head_dim: Optional[int] = None,
                rope_theta: float = 1e6, torch_dtype: str = "bfloat16") -> dict:
    """The real checkpoint's config.json, with small dimensions."""
    config = {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": num_attention_heads,
        "num_experts_per_tok": num_experts_per_tok,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "num_local_experts": num_local_experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": rope_theta,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": False,
        "vocab_size": 32002,
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    return config


def tiny_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under the real checkpoint's tensor names.

    Each matrix is normal with std 1/sqrt(fan_in): wider than the usual 0.02,
    so logits (and greedy choices) have clear winners that float rounding
    cannot flip. Norms are ones.
    """
    D, F = config["hidden_size"], config["intermediate_size"]
    V, E = config["vocab_size"], config["num_local_experts"]
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    Dh = config.get("head_dim") or D // H
    rng = np.random.RandomState(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)

    def ones() -> np.ndarray:
        return np.ones((D,), np.float32)

    t = {"model.embed_tokens.weight": rand(V, D)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = ones()
        t[f"{p}.post_attention_layernorm.weight"] = ones()
        t[f"{p}.self_attn.q_proj.weight"] = rand(H * Dh, D)
        t[f"{p}.self_attn.k_proj.weight"] = rand(KV * Dh, D)
        t[f"{p}.self_attn.v_proj.weight"] = rand(KV * Dh, D)
        t[f"{p}.self_attn.o_proj.weight"] = rand(D, H * Dh)
        t[f"{p}.block_sparse_moe.gate.weight"] = rand(E, D)
        shapes = {"gate_proj": (F, D), "down_proj": (D, F), "up_proj": (F, D)}
        names = {proj: checkpoint_expert_names(f"{p}.block_sparse_moe", proj, E)
                 for proj in shapes}
        for e in range(E):
            for proj, shape in shapes.items():
                t[names[proj][e]] = rand(*shape)
    t["model.norm.weight"] = ones()
    t["lm_head.weight"] = rand(V, D)
    return t


def write_weights(tensors: dict[str, np.ndarray], out: Path, dtype: str = "bfloat16",
                  shards: int = 1) -> None:
    """safetensors as transformers writes them: one file, or shards with an index."""
    arrays = {n: mx.array(a).astype(getattr(mx, dtype)) for n, a in tensors.items()}
    if shards == 1:
        mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "pt"})
        return
    names = list(arrays)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: arrays[n] for n in names[s * per_shard : (s + 1) * per_shard]}
        mx.save_safetensors(str(out / file), part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(a.nbytes for a in arrays.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_tokenizer(out: Path) -> None:
    """The real Hermes tokenizer files (and their licence)."""
    for f in TOKENIZER.iterdir():
        if f.name != "README.md":
            shutil.copy(f, out / f.name)


def write_tiny_model(out: Path, config: dict, seed: int = 0, shards: int = 2) -> None:
    """A complete model folder at `out` (which must not exist), written under a
    temporary name and renamed, so a folder at `out` is always whole."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_weights(tiny_tensors(config, seed), tmp, config["torch_dtype"], shards)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": 1, "eos_token_id": 32000}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        copy_tokenizer(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
