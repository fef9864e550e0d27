"""Decode and prefill speed, mlx-hermes against mlx-lm on the same weights.

    python benchmarks/profile_matrix.py [--synthetic 8x7b] [--layers N] [--bits 4 5]
        [--prompts 128 512 2048] [--gen-tokens 128] [--trials 2] [--results benchmarks/RESULTS.md]

For each quantization it builds one synthetic model of the real shapes (or N of
its layers, extrapolated), then for each prompt length runs
`mlx_hermes.profile.profile(..., compare_mlx_lm=True)`: both runtimes on the
same packed weights, alternating trials in one process. Prints a table and
one JSON line, and appends the table with command, machine and date to the
results file. On the GPU machine: `python benchmarks/profile_matrix.py` from
the source tree with PYTHONPATH set (see ../shared/device/README.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import profile as prof  # noqa: E402
from mlx_hermes.chip import detect, measure_bandwidth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default="8x7b", choices=list(prof.SYNTHETIC))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 5])
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--results", type=Path, default=None, help="append the table here")
    ap.add_argument("--no-levers", action="store_true",
                    help="baseline: gate/up not fused, no dense prefill, no CUDA kernels (before/after)")
    ap.add_argument("--no-cuda-kernels", action="store_true",
                    help="decode the experts with MLX's ops, not mlx_hermes/cuda_qmv.py's kernels")
    args = ap.parse_args()
    from mlx_hermes.specialize import FastPaths

    # --no-levers: not even fused (None); --no-cuda-kernels: dense prefill still on
    paths = None if args.no_levers else FastPaths(cuda_kernels=not args.no_cuda_kernels)

    chip = detect()
    if not chip.name.startswith("Apple"):
        chip.measured_gbs = measure_bandwidth()
    on_cpu = mx.default_device() == mx.cpu
    rows = []
    for bits in args.bits:
        model = prof.synthetic_model(args.synthetic, args.layers, bits,
                                     dtype=mx.float32 if on_cpu else mx.bfloat16,
                                     fast_paths=paths)
        for prompt in args.prompts:
            r = prof.profile(model, chip, prompt, args.gen_tokens, args.trials,
                             compare_mlx_lm=True, mlx_lm_dtype=mx.bfloat16,
                             full_layers=prof.SYNTHETIC[args.synthetic].num_hidden_layers)
            rows.append({"bits": bits, "prompt": prompt, **{k: r[k] for k in (
                "prompt_tps", "decode_tps", "ttft_s", "bandwidth_gbs", "peak_bandwidth_gbs",
                "roofline_fraction", "peak_memory_gb", "bytes_per_token", "extrapolated")},
                "mlx_lm_prompt_tps": r["mlx-lm"]["prompt_tps"],
                "mlx_lm_decode_tps": r["mlx-lm"]["decode_tps"],
                "decode_ratio": r["speedup_vs_mlx_lm"]["decode"],
                "prefill_ratio": r["speedup_vs_mlx_lm"]["prefill"]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del model
        mx.clear_cache()

    header = ("| bits | prompt | prefill tok/s (mlx-lm) | ratio | decode tok/s (mlx-lm) | ratio "
              "| GB/s read | of peak | peak mem GB |")
    lines = [header, "|" + " --- |" * 9]
    for r in rows:
        lines.append(
            f"| {r['bits']} | {r['prompt']} | {r['prompt_tps']:.1f} ({r['mlx_lm_prompt_tps']:.1f}) "
            f"| {r['prefill_ratio']:.2f}x | {r['decode_tps']:.1f} ({r['mlx_lm_decode_tps']:.1f}) "
            f"| {r['decode_ratio']:.2f}x | {r['bandwidth_gbs']:.0f} "
            f"| {100 * (r['roofline_fraction'] or 0):.0f}% | {r['peak_memory_gb']:.1f} |")
    table = "\n".join(lines)
    print(table)
    print(json.dumps({"benchmark": "profile_matrix", "chip": chip.name,
                      "peak_gbs": chip.peak_gbs, "rows": rows}))
    if args.results:
        note = " (extrapolated from fewer layers)" if args.layers else ""
        note += "; baseline, levers off" if args.no_levers else ""
        note += "; CUDA decode kernels off" if args.no_cuda_kernels else ""
        entry = (f"\n## Speed matrix: `python benchmarks/profile_matrix.py {' '.join(sys.argv[1:])}`"
                 f"\n\n- Machine: {chip.name}, MLX {mx.__version__} ({mx.default_device()}); "
                 f"peak bandwidth {chip.peak_gbs:.0f} GB/s{note}.\n"
                 f"- Date: {datetime.date.today().isoformat()}. Synthetic {args.synthetic} "
                 f"weights, {args.gen_tokens} generated tokens, {args.trials} trials, "
                 f"mlx-lm on the same weights in the same process.\n\n{table}\n")
        with open(args.results, "a") as f:
            f.write(entry)


if __name__ == "__main__":
    main()
