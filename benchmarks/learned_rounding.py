"""Learned rounding against round-to-nearest on the trained stand-in.

    python benchmarks/learned_rounding.py /tmp/smallmix-trained --data held.txt [--bits 2]
        [--windows 20] [--workdir /tmp/learned-rounding]

mlx-lm's GPTQ (`mlx_lm.quant.gptq`, 2, 4 or 8 bits: it has no 3-bit path) quantizes every
Linear and SwitchLinear (attention, router, experts, LM head) of the stand-in at --bits, group
64, and the embeddings at 8 bits, calibrated on 64 x 512 tokens of the training split (Python's
standard library files whose name does not hash to 0 mod 10; the held-out text is the other
files). The same layout by round-to-nearest comes from our converter. Both are scored against
the unquantized model on the held-out text: perplexity, KL, top-1. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_hermes  # noqa: E402
from mlx_hermes import perplexity as ppl  # noqa: E402
from mlx_hermes.convert_package import converter_package  # noqa: E402
from mlx_hermes.formats import Recipe, Width  # noqa: E402


def gptq(model_path: Path, workdir: Path, bits: int) -> Path:
    from mlx_lm import convert, load
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import save
    from train_small_mixtral import corpus

    f32 = workdir / "float32"
    if not f32.exists():
        convert(str(model_path), str(f32), dtype="float32")  # mlx-lm's layout, unquantized
    model, tokenizer, config = load(str(f32), return_config=True)
    train, _ = corpus(Path(sysconfig.get_paths()["stdlib"]))
    ids: list[int] = []
    for text in train:
        ids += tokenizer.encode(text)
        if len(ids) >= 64 * 512:
            break
    data = mx.array(ids[: 64 * 512]).reshape(64, 512)
    model, config["quantization"] = gptq_quantize(model, data, bits, 64, 8, 64)
    out = workdir / f"gptq-{bits}bit"
    save(str(out), str(f32), model, tokenizer, config)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="the trained stand-in, original layout")
    ap.add_argument("--data", type=Path, required=True, help="held-out text")
    ap.add_argument("--bits", type=int, default=2, choices=[2, 4])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/learned-rounding"))
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    reference, tokenizer = mlx_hermes.load(a.model)
    texts = ppl.read_texts(a.data)

    start = time.time()
    learned = gptq(a.model, a.workdir, a.bits)
    gptq_s = time.time() - start
    narrow, wide = Width(a.bits, 64), Width(8, 64)
    rtn = Recipe(f"round-to-nearest {a.bits}-bit g64", experts=narrow, attention=narrow,
                 v_proj=narrow, router=narrow, embeddings=wide, lm_head=narrow)
    rtn_path = a.workdir / f"rtn-{a.bits}bit"
    converter_package().convert(str(a.model), str(rtn_path), recipe=rtn, force=True)

    rows = []
    for name, path in ((f"GPTQ {a.bits}-bit g64 (mlx-lm)", learned), (rtn.name, rtn_path)):
        model, _ = mlx_hermes.load(path)
        rows.append({"method": name, **ppl.perplexity(model, tokenizer, texts, 512, reference,
                                                      max_windows=a.windows)})
    print(f"everything but the embeddings (8-bit) at {a.bits} bits, group 64; GPTQ took "
          f"{gptq_s:.0f} s")
    print(f"{'method':<32} {'perplexity':>16} {'KL':>8} {'top-1':>6}")
    for r in rows:
        print(f"{r['method']:<32} {r['perplexity']:8.2f} ±{r['perplexity_se']:6.2f} "
              f"{r['kl_divergence']:8.4f} {100 * r['top1_agreement']:5.1f}%")
    print(json.dumps({"benchmark": "learned_rounding", "bits": a.bits, "gptq_s": gptq_s,
                      "rows": rows}))


if __name__ == "__main__":
    main()
