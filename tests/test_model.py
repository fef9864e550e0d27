"""The model against transformers' MixtralForCausalLM, in float32 on the CPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.models.cache import make_prompt_cache

import mlx_hermes
from mlx_hermes.moe import SparseMoeBlock, sort_threshold

from .conftest import SHAPES


def reference_logits(torch_model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.tensor([tokens])).logits[0].numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    err = np.abs(ours - ref).max()
    assert err <= rel * np.abs(ref).max(), f"max|diff| {err} vs max|ref| {np.abs(ref).max()}"


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, 32000, size=n - 1).tolist()


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("length", [1, 7, 40])  # 40 tokens x top-2 passes sort_threshold
def test_logits_match_transformers(hf_checkpoints, torch_models, name, length):
    model, _ = mlx_hermes.load(hf_checkpoints[name])
    tokens = prompt(length, seed=length)
    ours = np.array(model(mx.array([tokens]))[0])
    assert ours.dtype == np.float32
    assert_close(ours, reference_logits(torch_models(name), tokens))


@pytest.mark.parametrize("name", ["gqa", "mqa"])
def test_cached_decoding_equals_full_recomputation(hf_checkpoints, name):
    model, _ = mlx_hermes.load(hf_checkpoints[name])
    tokens = prompt(24, seed=3)
    full = np.array(model(mx.array([tokens]))[0])

    cache = make_prompt_cache(model)
    steps = [np.array(model(mx.array([tokens[:16]]), cache=cache)[0])]
    for t in tokens[16:]:
        steps.append(np.array(model(mx.array([[t]]), cache=cache)[0]))
    assert cache[0].offset == len(tokens)
    assert_close(np.concatenate(steps), full, rel=1e-5)


@pytest.mark.parametrize("name", ["gqa", "odd"])
def test_greedy_continuation_equals_transformers_generate(hf_checkpoints, torch_models, name):
    model, tokenizer = mlx_hermes.load(hf_checkpoints[name])
    ids = tokenizer.encode("The capital of France is")
    with torch.no_grad():
        ref = torch_models(name).generate(
            torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
        )[0, len(ids):].tolist()

    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    ours = []
    for _ in range(64):
        token = mx.argmax(logits[0, -1]).item()
        ours.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    assert ours == ref


def test_sorted_and_unsorted_expert_dispatch_agree():
    mx.random.seed(0)
    block = SparseMoeBlock(dims=32, hidden_dims=48, num_experts=8, top_k=2)
    x = mx.random.normal((1, sort_threshold(8) // 2, 32))  # top-2: just sorted
    sorted_out = block(x)
    unsorted_out = mx.concatenate([block(x[:, i : i + 1]) for i in range(x.shape[1])], axis=1)
    assert mx.allclose(sorted_out, unsorted_out, atol=1e-5).item()


def test_sort_rule_follows_metals_read_once_condition():
    # 4 pairs per expert, at least 16 pairs: 8 experts sort from 32 pairs (16 decoding streams)
    assert [sort_threshold(e) for e in (2, 4, 6, 8, 16)] == [16, 16, 24, 32, 64]


def test_router_takes_exactly_top_k_and_renormalises():
    mx.random.seed(1)
    block = SparseMoeBlock(dims=16, hidden_dims=24, num_experts=6, top_k=2)
    x = mx.random.normal((1, 5, 16))
    probs = np.array(mx.softmax(block.gate(x).astype(mx.float32), axis=-1))[0]  # [L, E]

    # Reference: each token's output is the weighted sum of exactly its top-2 experts.
    experts = block.switch_mlp
    expected = []
    for i in range(5):
        top = np.argsort(-probs[i])[:2]
        w = probs[i, top] / probs[i, top].sum()
        outs = experts(x[:, i], mx.array([[int(e) for e in top]]))[0]  # [2, D]
        expected.append((np.array(outs) * w[:, None]).sum(0))
    assert np.allclose(np.array(block(x))[0], np.stack(expected), atol=1e-5)


def test_config_reads_both_spellings(hf_checkpoint):
    import json

    from mlx_hermes import ModelArgs

    real = {  # the real checkpoint's config.json
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": False,
        "vocab_size": 32002,
    }
    args = ModelArgs.from_dict(real)
    assert (args.rope_theta, args.torch_dtype, args.dims_per_head) == (1e6, "bfloat16", 128)

    v5 = json.loads((hf_checkpoint / "config.json").read_text())
    assert "rope_theta" not in v5 and v5["head_dim"] is None
    args = ModelArgs.from_dict(v5)
    assert (args.rope_theta, args.torch_dtype, args.dims_per_head) == (1e6, "float32", 16)
