"""Write a tiny random Mixtral in the real Hermes 2 checkpoint's layout.

    python examples/make_tiny_model.py tiny-hermes

The folder looks like NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO (config.json,
per-expert bf16 tensors in sharded safetensors with an index, the real
tokenizer), only small: it loads in seconds and produces gibberish, which is
all a smoke test or a demo of the commands needs.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import mlx.core as mx

TOKENIZER = Path(__file__).resolve().parent / "hermes-tokenizer"


def make_config(args: argparse.Namespace) -> dict:
    # The real checkpoint's config.json, with small dimensions.
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": args.hidden,
        "initializer_range": 0.02,
        "intermediate_size": args.intermediate,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": args.heads,
        "num_experts_per_tok": 2,
        "num_hidden_layers": args.layers,
        "num_key_value_heads": args.kv_heads,
        "num_local_experts": args.experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": args.dtype,
        "use_cache": False,
        "vocab_size": 32002,
    }


def make_tensors(config: dict, dtype: mx.Dtype) -> dict[str, mx.array]:
    D, F = config["hidden_size"], config["intermediate_size"]
    V, E = config["vocab_size"], config["num_local_experts"]
    Dh = D // config["num_attention_heads"]
    Q, KV = config["num_attention_heads"] * Dh, config["num_key_value_heads"] * Dh

    def rand(*shape: int) -> mx.array:
        # Wider than the usual 0.02 so that logits have clear winners.
        return (mx.random.normal(shape) * shape[-1] ** -0.5).astype(dtype)

    t = {"model.embed_tokens.weight": rand(V, D)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = mx.ones((D,), dtype)
        t[f"{p}.post_attention_layernorm.weight"] = mx.ones((D,), dtype)
        t[f"{p}.self_attn.q_proj.weight"] = rand(Q, D)
        t[f"{p}.self_attn.k_proj.weight"] = rand(KV, D)
        t[f"{p}.self_attn.v_proj.weight"] = rand(KV, D)
        t[f"{p}.self_attn.o_proj.weight"] = rand(D, Q)
        t[f"{p}.block_sparse_moe.gate.weight"] = rand(E, D)
        for e in range(E):
            t[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = rand(F, D)
            t[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = rand(D, F)
            t[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = rand(F, D)
    t["model.norm.weight"] = mx.ones((D,), dtype)
    t["lm_head.weight"] = rand(V, D)
    return t


def write_shards(tensors: dict[str, mx.array], out: Path, shards: int) -> None:
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per_shard : (s + 1) * per_shard]}
        mx.save_safetensors(str(out / file), part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder to write (must not exist)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists():
        ap.error(f"{args.out} already exists")

    mx.random.seed(args.seed)
    config = make_config(args)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_shards(make_tensors(config, getattr(mx, args.dtype)), tmp, args.shards)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": 1, "eos_token_id": 32000}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for f in TOKENIZER.iterdir():
            if f.name != "README.md":
                shutil.copy(f, tmp / f.name)
        tmp.rename(args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote a tiny random Mixtral to {args.out}")


if __name__ == "__main__":
    main()
