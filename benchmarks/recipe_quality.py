"""Each conversion recipe on a model that learned something: size, held-out
perplexity and KL divergence from the unquantized model.

    python benchmarks/train_small_mixtral.py small            # on the GPU machine
    python benchmarks/train_small_mixtral.py unused --heldout held.txt    # held-out text, any machine
    python benchmarks/recipe_quality.py small --data held.txt [--windows 100]
    python benchmarks/recipe_quality.py small --data held.txt --study   # one choice at a time
    python benchmarks/train_small_mixtral.py unused --train-text train.txt   # calibration text
    python benchmarks/recipe_quality.py small --data held.txt --calibration train.txt --windows 20

With --calibration, every recipe with parts at 4 bits or fewer is converted a second time with
GPTQ (`convert --calibration`, its default 32k tokens) and scored beside the first.

A ~30M-parameter stand-in ranks the broad choices (expert bits, group sizes,
where the extra bits go); it says nothing exact about the 46.7B model.
Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_hermes  # noqa: E402
from mlx_hermes import perplexity as ppl  # noqa: E402
from mlx_hermes import tiny  # noqa: E402
from mlx_hermes.convert_package import converter_package  # noqa: E402

RECIPES = [("uniform", 8), ("uniform", 6), ("uniform", 5), ("mixed", 4), ("uniform", 4),
           ("fit-32gb", None), ("uniform", 3), ("fit-24gb", None), ("uniform", 2)]


def study() -> list:
    """One choice at a time, everything else at 8 bits (KL ~0.005 by itself): in the
    stand-in the embeddings and LM head are over half the weights, so a recipe that
    narrows them hides what the experts' own width costs. Here only the named part moves."""
    from mlx_hermes.formats import Recipe, Width

    wide = Width(8, 64)

    def only(name: str, **parts) -> Recipe:
        base = dict(experts=wide, attention=wide, v_proj=wide, router=wide, embeddings=wide,
                    lm_head=wide)
        return Recipe(name, **{**base, **parts})

    return [
        (only("experts 4-bit g64", experts=Width(4, 64)), None),
        (only("experts 3-bit g64", experts=Width(3, 64)), None),
        (only("experts 3-bit g128", experts=Width(3, 128)), None),
        (only("experts 2-bit g64", experts=Width(2, 64)), None),
        (only("experts 2-bit g128", experts=Width(2, 128)), None),
        (only("experts 2-bit g128, down 3-bit at the ends", experts=Width(2, 128),
              down_more=Width(3, 128), ends=1), None),
        (only("router 4-bit", router=Width(4, 64)), None),
        (only("attention 4-bit (v_proj 8)", attention=Width(4, 64)), None),
        (only("attention and v_proj 4-bit", attention=Width(4, 64), v_proj=Width(4, 64)), None),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a checkpoint in the original layout")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--windows", type=int, default=100, help="score the first N windows only")
    ap.add_argument("--study", action="store_true",
                    help="one choice at a time, the rest at 8 bits, instead of the recipes")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="also convert each recipe of <= 4 bits with GPTQ calibrated on this text")
    a = ap.parse_args()
    if not (a.model / "tokenizer.model").exists():
        tiny.copy_tokenizer(a.model)
    converter = converter_package()
    reference, tokenizer = mlx_hermes.load(a.model)
    texts = ppl.read_texts(a.data)

    def measure(model, against=None) -> dict:
        return ppl.perplexity(model, tokenizer, texts, a.context, against,
                              max_windows=a.windows)

    rows = [{"recipe": "bf16 (unquantized)", **measure(reference)}]
    with tempfile.TemporaryDirectory() as d:
        for k, (name, bits) in enumerate(study() if a.study else RECIPES):
            learned = a.calibration and (bits or 4) <= 4
            for calibration in (None, a.calibration) if learned else (None,):
                out = Path(d) / f"recipe-{k}"
                summary = converter.convert(str(a.model), str(out), bits=bits, recipe=name,
                                            calibration=calibration)
                model, _ = mlx_hermes.load(out)
                label = name.name if a.study else summary["label"]
                rows.append({"recipe": label + (" + GPTQ" if calibration else ""),
                             "bits_per_weight": summary["bits_per_weight"],
                             "size_mb": summary["size_bytes"] / 1e6,
                             **measure(model, reference)})
                print(f"{rows[-1]['recipe']}: done", file=sys.stderr, flush=True)
                del model
                shutil.rmtree(out)
    print(f"{'recipe':<40} {'bits/w':>7} {'MB':>6} {'perplexity':>16} {'KL':>9} {'top-1':>6}")
    for r in rows:
        print(f"{r['recipe']:<40} {r.get('bits_per_weight', 16):7.3f} {r.get('size_mb', 0):6.1f} "
              f"{r['perplexity']:8.3f} ±{r['perplexity_se']:6.3f} {r.get('kl_divergence', 0):9.5f} "
              f"{100 * r.get('top1_agreement', 1):5.1f}%")
    print(json.dumps({"benchmark": "recipe_quality", "tokens": rows[0]["tokens"], "rows": rows}))


if __name__ == "__main__":
    main()
