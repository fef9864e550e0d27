"""CPU decode and prefill against mlx-lm on a mid-size Mixtral, as users download it.

    python benchmarks/cpu_midsize.py [--workdir /tmp/midsize] [--prompt-tokens 128]
        [--gen-tokens 64] [--trials 3]

The model: hidden 512, expert FFN 1792, 4 layers, 8 heads over 2 kv heads,
8 experts (top-2), vocab 32002; random weights written by transformers, then
converted by mlx-lm to 4-bit group 64 with bf16 scales. Two comparisons,
each in one process with alternating trials on the same packed weights:
each runtime at its default settings (mlx-hermes computes in float32 on the
CPU, mlx-lm in the checkpoint's bf16), and both in float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_hermes  # noqa: E402
from mlx_hermes import profile as prof  # noqa: E402
from mlx_hermes.chip import detect, measure_bandwidth  # noqa: E402

SHAPE = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, num_local_experts=8)


def build(workdir: Path) -> Path:
    out = workdir / "midsize-4bit"
    if (out / "config.json").exists():
        return out
    import torch
    from mlx_lm import convert
    from transformers import MixtralConfig, MixtralForCausalLM

    src = workdir / "midsize-hf"
    shutil.rmtree(src, ignore_errors=True)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=32002, num_experts_per_tok=2, **SHAPE)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(src)
    tokenizer = Path(__file__).resolve().parent.parent / "mlx_hermes" / "hermes_tokenizer"
    for f in tokenizer.iterdir():
        if f.name != "README.md":
            shutil.copy(f, src / f.name)
    convert(str(src), str(out), quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16")
    shutil.rmtree(src)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/midsize"))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--no-cpu-streams", action="store_true",
                    help="leave the work on one CPU stream (mlx_hermes/cpu.py off): the baseline")
    ap.add_argument("--no-qkv-fusion", action="store_true",
                    help="keep q, k and v as three matmuls (the layout before fusion.py)")
    args = ap.parse_args()
    from mlx_hermes.model import Attention

    if args.no_qkv_fusion:
        Attention.fuse = lambda self: None

    path = build(args.workdir)
    model, _ = mlx_hermes.load(path, fast_paths=mlx_hermes.FastPaths(
        cpu_streams=not args.no_cpu_streams))
    chip = detect()
    chip.measured_gbs = measure_bandwidth()
    results = {}
    for label, twin_dtype in (("defaults", mx.bfloat16), ("both float32", mx.float32)):
        results[label] = prof.profile(model, chip, args.prompt_tokens, args.gen_tokens,
                                      args.trials, compare_mlx_lm=True, mlx_lm_dtype=twin_dtype)
    print(f"{'comparison':<14} {'ours decode':>12} {'mlx-lm':>8} {'ratio':>6} "
          f"{'ours prefill':>13} {'mlx-lm':>8} {'ratio':>6}")
    for label, r in results.items():
        print(f"{label:<14} {r['decode_tps']:12.1f} {r['mlx-lm']['decode_tps']:8.1f} "
              f"{r['speedup_vs_mlx_lm']['decode']:5.2f}x {r['prompt_tps']:13.1f} "
              f"{r['mlx-lm']['prompt_tps']:8.1f} {r['speedup_vs_mlx_lm']['prefill']:5.2f}x")
    print(json.dumps({"benchmark": "cpu_midsize", "machine": platform.platform(),
                      "cpu_streams": not args.no_cpu_streams, "qkv_fusion": not args.no_qkv_fusion,
                      "chip": chip.name, **{k: {"decode_tps": r["decode_tps"],
                                                "prompt_tps": r["prompt_tps"],
                                                "mlx_lm": r["mlx-lm"],
                                                "speedup": r["speedup_vs_mlx_lm"],
                                                "peak_memory_gb": r["peak_memory_gb"]}
                                            for k, r in results.items()}}))


if __name__ == "__main__":
    main()
