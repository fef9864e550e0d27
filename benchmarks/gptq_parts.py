"""What GPTQ costs per matrix at the 8x7B's widths: the Hessian's inverse factor (MLX's
linalg, on the CPU) and the column-by-column quantization (the default device), for one
expert's gate+up (two [14336, 4096] stacked, inputs 4096) and down ([4096, 14336], inputs
14336), 2-bit g128. A layer is 8 of each plus attention; the model 32 layers.

    python benchmarks/gptq_parts.py [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes.convert_package import converter_package  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="calibration rows one expert sees")
    a = ap.parse_args()
    gptq = converter_package().gptq
    out = {"device": str(mx.default_device())}
    for name, rows, cols in (("gate+up", 2 * 14336, 4096), ("down", 4096, 14336)):
        x = mx.random.normal((a.tokens, cols)).astype(mx.bfloat16)
        w = (mx.random.normal((rows, cols)) * 0.02).astype(mx.bfloat16)
        t = time.perf_counter()
        h = gptq.Hessian()
        h.add(x)
        out[f"{name}_hessian_s"] = time.perf_counter() - t
        t = time.perf_counter()
        hinv = gptq.inverse_cholesky(h.sum)
        out[f"{name}_inverse_s"] = time.perf_counter() - t
        t = time.perf_counter()
        q = gptq.gptq(w, hinv, 2, 128, mx.bfloat16)
        mx.eval(q)
        out[f"{name}_quantize_s"] = time.perf_counter() - t
        print(name, {k: round(v, 2) for k, v in out.items() if k.startswith(name)}, flush=True)
    per_expert = sum(v for k, v in out.items() if k.endswith("_s"))
    out["per_expert_s"] = per_expert
    out["model_estimate_min"] = per_expert * 8 * 32 / 60
    print(f"one expert {per_expert:.1f} s; 8 experts x 32 layers ~{out['model_estimate_min']:.0f} "
          "min (attention and the LM head not counted)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
