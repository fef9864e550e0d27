"""Batched decode: ours (the batching engine) against mlx-lm's BatchGenerator.

    python benchmarks/batch_throughput.py --synthetic 8x7b [--portable]
        [--sizes 1,4,8,16,32] [--prompt-tokens 128] [--gen-tokens 128] [--rounds 3] [--json F]
    python benchmarks/batch_throughput.py --midsize [--workdir /tmp/midsize]   # the 2-core CPU
    python benchmarks/batch_throughput.py --model PATH

For each stream count: aggregate and per-stream decode tok/s over the steps
where all streams decode, an estimate of the weight bytes read per second,
and peak memory; mlx-lm's BatchGenerator runs the same prompts on its own
Mixtral holding the same packed weights, in the same process, alternating
rounds; medians. Then the single-stream path (`stream_generate`, what
`generate` and `chat` use) for reference, and a request joining a busy batch
of 8: its time to first token against its time alone, and the longest step
the 8 running streams see while it prefills.

--portable keeps MLX's own ops only (what a Mac runs); without it this
machine's fast paths are installed (CUDA kernels, CPU streams).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_hermes  # noqa: E402
from grouped_kernel import _gpu_name  # noqa: E402
from mlx_hermes import batch_profile, profile as prof  # noqa: E402
from mlx_hermes.cache import make_cache  # noqa: E402
from mlx_hermes.specialize import FastPaths  # noqa: E402
from mlx_hermes.tiny import TOKENIZER  # noqa: E402
from mlx_hermes.tokenizer import Tokenizer  # noqa: E402


def solo_decode(model, prompt_tokens: int, gen_tokens: int, rounds: int) -> float:
    """Median decode tok/s of the single-stream path."""
    runs = []
    for r in range(rounds + 1):
        ids = batch_profile.prompts(1, prompt_tokens, model.args.vocab_size, 99 + r)[0]
        result = prof.time_generation(model, ids, gen_tokens, make_cache(model))
        if r:  # the first is a warm-up
            runs.append(result["decode_tps"])
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--synthetic", choices=["8x7b", "tiny"])
    which.add_argument("--midsize", action="store_true", help="cpu_midsize.py's model")
    which.add_argument("--model")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/midsize"))
    ap.add_argument("--portable", action="store_true")
    ap.add_argument("--sizes", default="1,4,8,16,32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--join", type=int, default=8, help="streams running when one joins (0: skip)")
    ap.add_argument("--join-rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    paths = FastPaths.none() if args.portable else FastPaths()
    if args.synthetic:
        model = prof.synthetic_model(args.synthetic, dtype=prof.compute_dtype(), fast_paths=paths)
        tokenizer = Tokenizer.from_path(TOKENIZER)
        what = f"synthetic {args.synthetic} (random 4-bit g64 weights, bf16 scales)"
    else:
        if args.midsize:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from cpu_midsize import build

            path = build(args.workdir)
            what = "mid-size Mixtral (hidden 512, 4 layers, 8 experts, 4-bit g64)"
        else:
            path, what = Path(args.model), args.model
        model, tokenizer = mlx_hermes.load(path, fast_paths=paths)
    twin = prof.mlx_lm_twin(model, prof._dtype(model))
    sizes = [int(x) for x in args.sizes.split(",")]

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    say(f"{what} built")

    result = batch_profile.measure(model, tokenizer, sizes, prompt_tokens=args.prompt_tokens,
                                   gen_tokens=args.gen_tokens, rounds=args.rounds, twin=twin,
                                   progress=say)
    say("single-stream path")
    result["solo_decode_tps"] = solo_decode(model, args.prompt_tokens, args.gen_tokens,
                                            args.rounds)
    if args.join:
        say(f"a request joining {args.join} streams")
        joins = [batch_profile.join(model, tokenizer, args.join, args.prompt_tokens,
                                    seed=r) for r in range(args.join_rounds)]
        result["join"] = {k: statistics.median(j[k] for j in joins) for k in joins[0]}
    result.update({
        "model": what, "path": "portable (MLX ops only)" if args.portable else "fast paths",
        "device": str(mx.default_device()), "machine": platform.machine(),
        "gpu": _gpu_name(), "mlx": mx.__version__, "date": datetime.date.today().isoformat(),
        "dtype": str(prof._dtype(model)),
    })

    print(f"{what}; {result['path']}; {result['gpu'] or platform.processor() or 'CPU'}; "
          f"MLX {mx.__version__}; compute dtype {result['dtype']}")
    print(batch_profile.format_table(result))
    print(f"single-stream path (stream_generate): {result['solo_decode_tps']:.1f} tok/s")
    if "join" in result:
        j = result["join"]
        print(f"joining {j['running']:.0f} running streams: first token in {j['ttft_s']:.3f} s "
              f"(alone {j['solo_ttft_s']:.3f} s, {j['ttft_vs_solo']:.2f}x); the running streams' "
              f"longest step {j['longest_step_ms']:.1f} ms (median {j['median_step_ms']:.1f} ms)")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
