"""Peak memory and speed of `mlx-hermes convert` on a synthetic full-width checkpoint.

    python benchmarks/convert_memory.py [--layers 4] [--workdir /tmp/convert-bench] [--compare-mlx-lm]
    python benchmarks/convert_memory.py --layers 2 --recipe fit-24gb --calibration train.txt

Writes a random Mixtral with the real 8x7B widths (hidden 4096, expert FFN
14336, 8 experts, vocab 32002) but only --layers of its 32 layers, in the
real checkpoint's naming and ~5 GB bf16 shards (4 layers: ~12 GB), then
converts it to 4-bit in a child process and samples that process's memory:
peak RSS (VmHWM), peak anonymous memory (RssAnon: what the process itself
allocated, not file pages), and source MB/s. Prints a table and a JSON line.

The converter works one module at a time, so its peak does not grow with
the number of layers: the full 32-layer model should peak where this does.

With --calibration (and a --recipe, e.g. fit-24gb), the conversion runs GPTQ
(`convert --calibration`, 32k tokens) instead: its time and peak memory at the
real widths, MLX's own peak (device memory on a GPU) too. A layer's share is
the difference between runs with --layers 1 and 2 (the LM head and the
calibration's embedding are in both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx

REAL = dict(hidden=4096, ffn=14336, experts=8, vocab=32002, heads=32, kv_heads=8)


def write_checkpoint(out: Path, layers: int, shard_bytes: int = 4_900_000_000) -> int:
    """The real checkpoint's layout at full width; returns its size in bytes."""
    if (out / "model.safetensors.index.json").exists():
        return sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    D, F, E, V = REAL["hidden"], REAL["ffn"], REAL["experts"], REAL["vocab"]
    KV = REAL["kv_heads"] * D // REAL["heads"]
    shapes = [("model.embed_tokens.weight", (V, D))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.self_attn.q_proj.weight", (D, D)), (f"{p}.self_attn.k_proj.weight", (KV, D)),
                   (f"{p}.self_attn.v_proj.weight", (KV, D)), (f"{p}.self_attn.o_proj.weight", (D, D)),
                   (f"{p}.block_sparse_moe.gate.weight", (E, D)),
                   (f"{p}.input_layernorm.weight", (D,)), (f"{p}.post_attention_layernorm.weight", (D,))]
        for e in range(E):
            shapes += [(f"{p}.block_sparse_moe.experts.{e}.w1.weight", (F, D)),
                       (f"{p}.block_sparse_moe.experts.{e}.w2.weight", (D, F)),
                       (f"{p}.block_sparse_moe.experts.{e}.w3.weight", (F, D))]
    shapes += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]

    shards, size = [[]], 0
    for name, shape in shapes:
        n = 2 * int(mx.prod(mx.array(shape)).item())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (mx.random.normal(shape) * 0.02).astype(mx.bfloat16)
                   for name, shape in shard}
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
        print(f"wrote {file}", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    real_config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V,
        "hidden_size": D, "intermediate_size": F, "num_hidden_layers": layers,
        "num_attention_heads": REAL["heads"], "num_key_value_heads": REAL["kv_heads"],
        "num_local_experts": E, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000,
    }
    (out / "config.json").write_text(json.dumps(real_config, indent=2))
    tokenizer = Path(__file__).parent.parent / "mlx_hermes" / "hermes_tokenizer"
    for f in tokenizer.iterdir():
        if f.name != "README.md":
            shutil.copy(f, out / f.name)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def measure(command: list[str]) -> dict:
    """Run a command; sample its RSS and anonymous memory every 50 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = {"rss": 0, "anon": 0}

    def sample():
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            for key, field in (("rss", "VmHWM"), ("anon", "RssAnon")):
                if field in fields:
                    peak[key] = max(peak[key], int(fields[field].split()[0]) * 1024)
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    proc.wait()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed with {proc.returncode}")
    return {"seconds": time.perf_counter() - start, "peak_rss": peak["rss"],
            "peak_anon": peak["anon"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/convert-bench"))
    ap.add_argument("--compare-mlx-lm", action="store_true",
                    help="also convert with mlx-lm (it loads the whole model: needs RAM)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--recipe", default="uniform", help="as convert --recipe (uniform: 4-bit g64)")
    ap.add_argument("--calibration", type=Path, default=None, help="GPTQ on this text")
    args = ap.parse_args()

    src = args.workdir / f"synthetic-{args.layers}L"
    size = write_checkpoint(src, args.layers)
    runs = {}
    out = args.workdir / "out-hermes"
    shutil.rmtree(out, ignore_errors=True)
    widths = "bits=4, group_size=64" if args.recipe == "uniform" else f"recipe={args.recipe!r}"
    calibration = f", calibration={str(args.calibration)!r}" if args.calibration else ""
    peak_file = args.workdir / "mlx-peak"
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "import mlx.core as mx; from mlx_hermes.convert_package import converter_package; "
            f"converter_package().convert({str(src)!r}, {str(out)!r}, {widths}{calibration}); "
            f"open({str(peak_file)!r}, 'w').write(str(mx.get_peak_memory()))")
    runs["mlx-hermes"] = measure([sys.executable, "-c", code])
    runs["mlx-hermes"]["mlx_peak"] = int(peak_file.read_text())
    if args.compare_mlx_lm:
        lm_out = args.workdir / "out-mlx-lm"
        shutil.rmtree(lm_out, ignore_errors=True)
        code = ("from mlx_lm import convert; "
                f"convert({str(src)!r}, {str(lm_out)!r}, quantize=True, q_bits=4, q_group_size=64)")
        runs["mlx-lm"] = measure([sys.executable, "-c", code])
        shutil.rmtree(lm_out, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)

    print(f"source: {args.layers} layers at full width, {size / 1e9:.2f} GB bf16 -> "
          f"{args.recipe}{' (4-bit g64)' if args.recipe == 'uniform' else ''}"
          f"{', GPTQ on ' + str(args.calibration) if args.calibration else ''}; "
          f"device {mx.default_device()}")
    print(f"{'converter':<12} {'time s':>8} {'MB/s':>8} {'peak RSS GB':>12} {'peak anon GB':>13} "
          f"{'MLX peak GB':>12}")
    for name, r in runs.items():
        r["mb_per_s"] = size / 1e6 / r["seconds"]
        print(f"{name:<12} {r['seconds']:8.1f} {r['mb_per_s']:8.0f} {r['peak_rss'] / 1e9:12.2f} "
              f"{r['peak_anon'] / 1e9:13.2f} {r.get('mlx_peak', 0) / 1e9:12.2f}")
    if "mlx-lm" in runs:
        ratio = runs["mlx-lm"]["peak_rss"] / runs["mlx-hermes"]["peak_rss"]
        print(f"mlx-lm needs {ratio:.1f}x the peak RSS")
    print(json.dumps({"benchmark": "convert_memory", "layers": args.layers,
                      "recipe": args.recipe, "calibration": str(args.calibration),
                      "source_bytes": size, "machine": platform.platform(),
                      "cpus": os.cpu_count(), "runs": runs}))


if __name__ == "__main__":
    main()
