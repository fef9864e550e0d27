"""Learned rounding against round-to-nearest on the trained stand-in.

    python benchmarks/learned_rounding.py /tmp/smallmix-trained --data held.txt [--bits 2]
        [--windows 20] [--workdir /tmp/learned-rounding] [--experts-only]

mlx-lm's GPTQ (`mlx_lm.quant.gptq`, 2, 4 or 8 bits: it has no 3-bit path) quantizes every
Linear and SwitchLinear (attention, router, experts, LM head) of the stand-in at --bits, group
64, and the embeddings at 8 bits, calibrated on 64 x 512 tokens of the training split (Python's
standard library files whose name does not hash to 0 mod 10; the held-out text is the other
files). The same layout by round-to-nearest comes from our converter. Both are scored against
the unquantized model on the held-out text: perplexity, KL, top-1. Prints a table and JSON.

--experts-only asks what the converter would gain from GPTQ in the small-Mac recipe: fit-24gb's
layout with every expert at 2 bits, group 128 (its 3-bit down_proj at the ends left out, as
GPTQ here takes one width), by round-to-nearest (our converter), and the same file with the
experts' tensors replaced by GPTQ's (mlx-lm's GPTQ on the experts only: the other layers are
quantized at 8 bits first, which takes them out of its reach; its Hessians come from one pass
over the calibration text, so the experts' do not depend on how the rest is rounded); fit-24gb
itself (round-to-nearest, with those ends) for reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
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
from mlx_hermes import formats  # noqa: E402
from mlx_hermes.formats import Recipe, Width  # noqa: E402


def calibration(tokenizer) -> mx.array:
    """64 x 512 tokens of the training split."""
    from train_small_mixtral import corpus

    train, _ = corpus(Path(sysconfig.get_paths()["stdlib"]))
    ids: list[int] = []
    for text in train:
        ids += tokenizer.encode(text)
        if len(ids) >= 64 * 512:
            break
    return mx.array(ids[: 64 * 512]).reshape(64, 512)


def float32_copy(model_path: Path, workdir: Path) -> Path:
    from mlx_lm import convert

    f32 = workdir / "float32"
    if not f32.exists():
        convert(str(model_path), str(f32), dtype="float32")  # mlx-lm's layout, unquantized
    return f32


def gptq(model_path: Path, workdir: Path, bits: int) -> Path:
    from mlx_lm import load
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import save

    f32 = float32_copy(model_path, workdir)
    model, tokenizer, config = load(str(f32), return_config=True)
    model, config["quantization"] = gptq_quantize(model, calibration(tokenizer), bits, 64, 8, 64)
    out = workdir / f"gptq-{bits}bit"
    save(str(out), str(f32), model, tokenizer, config)
    return out


def gptq_experts(model_path: Path, workdir: Path, bits: int, group_size: int) -> dict:
    """The experts' tensors after mlx-lm's GPTQ on the experts alone."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.quant.gptq import gptq_quantize

    model, tokenizer = load(str(float32_copy(model_path, workdir)))
    nn.quantize(model, group_size=64, bits=8,  # out of GPTQ's reach (it takes Linear only)
                class_predicate=lambda _, m: hasattr(m, "to_quantized")
                and not isinstance(m, SwitchLinear))
    model, _ = gptq_quantize(model, calibration(tokenizer), bits, group_size, 8, 64)
    return {k: v for k, v in tree_flatten(model.parameters()) if ".switch_mlp." in k}


def experts_only(a, reference, tokenizer, texts) -> list[dict]:
    fit = formats.recipe("fit-24gb")
    flat = dataclasses.replace(fit, name="fit-24gb, all experts 2-bit g128", down_more=None,
                               ends=0)
    paths = {}
    for r in (fit, flat):
        paths[r.name] = a.workdir / r.name.replace(" ", "_").replace(",", "")
        converter_package().convert(str(a.model), str(paths[r.name]), recipe=r, force=True)
    start = time.time()
    learned = gptq_experts(a.model, a.workdir, flat.experts.bits, flat.experts.group_size)
    gptq_s = time.time() - start
    hybrid = a.workdir / "fit-24gb_all-2bit_gptq-experts"
    shutil.rmtree(hybrid, ignore_errors=True)
    shutil.copytree(paths[flat.name], hybrid)
    replaced = 0
    for f in hybrid.glob("*.safetensors"):
        tensors, metadata = mx.load(str(f), return_metadata=True)
        for k in tensors:
            if k in learned:
                assert tensors[k].shape == learned[k].shape, k
                tensors[k] = learned[k].astype(tensors[k].dtype)
                replaced += 1
        mx.save_safetensors(str(f), tensors, metadata=metadata)
    assert replaced == len(learned), (replaced, len(learned))
    rows = []
    for name, path in ((f"{flat.name}, GPTQ experts", hybrid), (flat.name, paths[flat.name]),
                       (fit.label, paths[fit.name])):
        model, _ = mlx_hermes.load(path)
        rows.append({"method": name, **ppl.perplexity(model, tokenizer, texts, 512, reference,
                                                      max_windows=a.windows)})
    print(f"GPTQ on the experts took {gptq_s:.0f} s; {replaced} tensors replaced")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="the trained stand-in, original layout")
    ap.add_argument("--data", type=Path, required=True, help="held-out text")
    ap.add_argument("--bits", type=int, default=2, choices=[2, 4])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/learned-rounding"))
    ap.add_argument("--experts-only", action="store_true")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    reference, tokenizer = mlx_hermes.load(a.model)
    texts = ppl.read_texts(a.data)
    if a.experts_only:
        rows = experts_only(a, reference, tokenizer, texts)
        print(f"{'method':<44} {'perplexity':>16} {'KL':>8} {'top-1':>6}")
        for r in rows:
            print(f"{r['method']:<44} {r['perplexity']:8.2f} ±{r['perplexity_se']:6.2f} "
                  f"{r['kl_divergence']:8.4f} {100 * r['top1_agreement']:5.1f}%")
        print(json.dumps({"benchmark": "learned_rounding", "experts_only": True, "rows": rows}))
        return

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
