"""How closely a batched sequence follows its solo run, in the model's dtype.

    python benchmarks/batch_agreement.py [--layers 4] [--streams 8] [--tokens 48] [--portable]
        [--dtype float32|bfloat16]

On the CPU in float32 the batch gives exactly the solo tokens (tests). On a
GPU in bf16, a batched matrix product may round differently from a
one-row one. Two figures, on the synthetic 8x7B (random 4-bit weights,
--layers of them):
- logits: N prompts of equal length run as one batch [N, L] and each alone
  [1, L]; the largest |difference| of the last position's logits, and that
  over the largest |logit|; the same for N prompts of different lengths,
  left-padded in one `BatchKVCache` as the batching engine runs them, and
  for one decode step after that;
- tokens: greedy continuations of N different prompts, batched
  (batch_generate) and alone (generate): how many streams match exactly and,
  where one parts, at which token, and how near a tie the solo run's two
  best logits were there (random weights give flat, often nearly tied
  distributions; a trained model's are peaked).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_hermes  # noqa: E402
from mlx_lm.models.cache import BatchKVCache  # noqa: E402

from mlx_hermes import batch_profile, profile as prof  # noqa: E402
from mlx_hermes.cache import make_cache  # noqa: E402
from mlx_hermes.specialize import FastPaths  # noqa: E402
from mlx_hermes.tiny import TOKENIZER  # noqa: E402
from mlx_hermes.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--portable", action="store_true")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="compute dtype (default: this machine's, bf16 on a GPU)")
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype) if args.dtype else prof.compute_dtype()
    model = prof.synthetic_model("8x7b", args.layers, dtype=dtype,
                                 fast_paths=FastPaths.none() if args.portable else FastPaths())
    tokenizer = batch_profile.without_eos(Tokenizer.from_path(TOKENIZER))

    same = batch_profile.prompts(args.streams, 64, model.args.vocab_size, seed=5)
    batched = model(mx.array(same))[:, -1].astype(mx.float32)
    alone = mx.concatenate([model(mx.array([p]))[:, -1] for p in same]).astype(mx.float32)
    diff = mx.abs(batched - alone).max().item()
    scale = mx.abs(alone).max().item()

    prompts = [batch_profile.prompts(1, 16 + 9 * i, model.args.vocab_size, seed=i)[0]
               for i in range(args.streams)]
    padded = padded_vs_alone(model, prompts)
    parted = []
    for p in prompts:
        solo = [c.token for c in mlx_hermes.stream_generate(model, tokenizer, p,
                                                            max_tokens=args.tokens)]
        batch = [c.token for _, c in mlx_hermes.stream_batch_generate(
            model, tokenizer, [p], max_tokens=args.tokens)]
        first = next((i for i, (a, b) in enumerate(zip(solo, batch)) if a != b), None)
        parted.append(first)
    both = [c for c in mlx_hermes.stream_batch_generate(model, tokenizer, prompts,
                                                        max_tokens=args.tokens)]
    tokens = {}
    for i, c in both:
        tokens.setdefault(i, []).append(c.token)
    batch_vs_solo, gaps = [], []
    for i, p in enumerate(prompts):
        solo = [c.token for c in mlx_hermes.stream_generate(model, tokenizer, p,
                                                            max_tokens=args.tokens)]
        first = next((k for k, (a, b) in enumerate(zip(solo, tokens[i])) if a != b), None)
        batch_vs_solo.append(first)
        if first is not None:  # the solo run's top-2 gap where the two parted
            top = mx.sort(model(mx.array([p + solo[:first]]))[0, -1].astype(mx.float32))
            gaps.append((top[-1] - top[-2]).item())
    result = {"device": str(mx.default_device()), "dtype": str(prof._dtype(model)),
              "layers": args.layers, "streams": args.streams,
              "path": "portable" if args.portable else "fast paths",
              "max_abs_logit_diff": diff, "max_abs_logit": scale,
              "relative": diff / scale, **padded,
              "one_stream_batch_vs_solo_first_difference": parted,
              "batch_vs_solo_first_difference": batch_vs_solo,
              "identical_streams": sum(x is None for x in batch_vs_solo),
              "top2_gap_where_parted": gaps}
    print(json.dumps(result))


def padded_vs_alone(model, prompts: list[list[int]]) -> dict:
    """Prompts of different lengths left-padded into one BatchKVCache (as the
    batching engine prefills them), then one decode step, against each alone."""
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    cache = [BatchKVCache(left_padding=pads) for _ in model.layers]
    rows = mx.array([[0] * pad + p for pad, p in zip(pads, prompts)])
    batched = model(rows, cache=cache)[:, -1].astype(mx.float32)
    nxt = mx.argmax(batched, axis=-1)
    step = model(nxt[:, None], cache=cache)[:, -1].astype(mx.float32)
    alone, alone_step = [], []
    for p, t in zip(prompts, nxt.tolist()):
        c = make_cache(model)
        alone.append(model(mx.array([p]), cache=c)[:, -1])
        alone_step.append(model(mx.array([[t]]), cache=c)[:, -1])
    alone = mx.concatenate(alone).astype(mx.float32)
    alone_step = mx.concatenate(alone_step).astype(mx.float32)
    scale = mx.abs(alone).max().item()
    return {"padded_max_abs_logit_diff": mx.abs(batched - alone).max().item(),
            "padded_decode_max_abs_logit_diff": mx.abs(step - alone_step).max().item(),
            "padded_relative": max(mx.abs(batched - alone).max().item(),
                                   mx.abs(step - alone_step).max().item()) / scale}


if __name__ == "__main__":
    main()
