"""Write a tiny random Mixtral in the real Hermes 2 checkpoint's layout.

    python examples/make_tiny_model.py tiny-hermes

The folder looks like NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO (config.json,
per-expert bf16 tensors in sharded safetensors with an index, the real
tokenizer), only small: it loads in seconds and produces gibberish, which is
all a smoke test or a demo of the commands needs. Run again with the same
options, it keeps the folder it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlx_hermes.tiny import tiny_config, write_tiny_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the folder to write")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    ap.add_argument("--intermediate", type=int, default=256,
                    help="each expert's FFN width (default 256)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    ap.add_argument("--shards", type=int, default=2, help="safetensors shards (default 2)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="weights' dtype (default bfloat16, as the real checkpoint)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args(argv)

    config = tiny_config(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, num_local_experts=args.experts,
                         torch_dtype=args.dtype)
    if args.out.exists():
        # A folder is only ever there whole (it is written under another name
        # and renamed), so the same config means the same model: keep it.
        try:
            same = json.loads((args.out / "config.json").read_text()) == config
        except (OSError, ValueError):
            same = False
        if not same:
            sys.exit(f"error: {args.out} exists and is not a tiny model with these options")
        print(f"{args.out} already holds this tiny model")
        return
    write_tiny_model(args.out, config, seed=args.seed, shards=args.shards)
    print(f"wrote a tiny random Mixtral to {args.out}")


if __name__ == "__main__":
    main()
