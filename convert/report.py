"""How much a conversion costs in quality, measured within the converter's
memory bound: both models run side by side one layer at a time on a few
fixed prompts, and only that layer's weights (source and converted) are in
memory at once. The 93 GB source never has to fit.
"""

from __future__ import annotations

from pathlib import Path
import mlx.core as mx
import mlx.nn as nn

from mlx_hermes.loader import quantize_like, read_config, weight_files
from mlx_hermes.model import DecoderLayer, ModelArgs
from mlx_hermes.tokenizer import Tokenizer

from mlx_hermes.formats import Recipe, Width, kind_of

from .plan import Item, Source, make_plan

PROMPTS = (
    "Explain why the sky is blue in two sentences.",
    "Write a Python function that checks whether a number is prime.",
    "Qual è la capitale dell'Australia, e perché non è Sydney?",
)


def quality_report(source_path: Path, converted_path: Path,
                   prompts: tuple[str, ...] = PROMPTS) -> dict:
    """Relative weight error per kind of tensor, and the KL divergence of the
    next-token distributions, source to converted, over every prompt position."""
    source_path, converted_path = Path(source_path), Path(converted_path)
    config = read_config(converted_path)
    args = ModelArgs.from_dict(config)
    source = Source.open(source_path)
    q = config["quantization"]
    # the items name the tensors; each one's width is read from the converted tensors
    items = make_plan(source, args, Recipe("converted", *[Width(q["bits"], q["group_size"])] * 6))
    converted = _Converted(converted_path)
    tokenizer = Tokenizer.from_path(source_path)
    ids = [mx.array(tokenizer.apply_chat_template([{"role": "user", "content": p}]))
           for p in prompts]
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    errors: dict[str, list[float]] = {}

    def weights(prefix: str) -> tuple[dict, dict]:
        """Source and converted tensors of the module at `prefix`, names relative to it."""
        src, out = {}, {}
        for item in items:
            if item.name != prefix and not item.name.startswith(prefix + "."):
                continue
            key = item.name[len(prefix) + 1 :]
            w = _read_source(source, item).astype(dtype)
            if f"{item.name}.scales" not in converted.tensors:  # kept in float
                src[key], out[key] = w, converted.pop(item.name).astype(dtype)
                continue
            src[_join(key, "weight")] = w
            packed, scales, biases = (converted.pop(f"{item.name}.{p}")
                                      for p in ("weight", "scales", "biases"))
            out.update({_join(key, "weight"): packed, _join(key, "scales"): scales,
                        _join(key, "biases"): biases})
            deq = mx.dequantize(packed, scales, biases, group_size=w.shape[-1] // scales.shape[-1],
                                bits=packed.shape[-1] * 32 // w.shape[-1])
            total = errors.setdefault(kind_of(item.name), [0.0, 0.0])
            total[0] += mx.sum(mx.square(deq.astype(mx.float32) - w.astype(mx.float32))).item()
            total[1] += mx.sum(mx.square(w.astype(mx.float32))).item()
        return src, out

    def pair(make, prefix: str) -> tuple[nn.Module, nn.Module]:
        """The module at `prefix`, once with source and once with converted weights."""
        src, out = weights(prefix)
        a, box = make(), nn.Module()
        a.load_weights(list(src.items()))
        box.m = make()  # quantize_like finds modules by path: give this one a name
        quantize_like(box, {f"m.{k}": v for k, v in out.items()}, config)
        box.m.load_weights(list(out.items()))
        return a, box.m

    embed_src, embed_out = pair(lambda: nn.Embedding(args.vocab_size, args.hidden_size),
                                "model.embed_tokens")
    h_src = [embed_src(x[None]) for x in ids]
    h_out = [embed_out(x[None]).astype(dtype) for x in ids]

    for i in range(args.num_hidden_layers):
        layer_src, layer_out = pair(lambda: DecoderLayer(args), f"model.layers.{i}")
        h_src = [layer_src(h, "causal") for h in h_src]
        h_out = [layer_out(h, "causal") for h in h_out]
        mx.eval(h_src, h_out)
        del layer_src, layer_out

    norm_src, norm_out = pair(lambda: nn.RMSNorm(args.hidden_size, args.rms_norm_eps),
                              "model.norm")
    if args.tie_word_embeddings:
        head_src, head_out = embed_src.as_linear, embed_out.as_linear
    else:
        head_src, head_out = pair(lambda: nn.Linear(args.hidden_size, args.vocab_size,
                                                    bias=False), "lm_head")
    kls, agree, count = 0.0, 0, 0
    for hs, ho in zip(h_src, h_out):
        ps = _log_softmax(head_src(norm_src(hs)))[0]  # [L, V]
        po = _log_softmax(head_out(norm_out(ho)))[0]
        kls += mx.sum(mx.exp(ps) * (ps - po)).item()
        agree += mx.sum(mx.argmax(ps, axis=-1) == mx.argmax(po, axis=-1)).item()
        count += ps.shape[0]
    return {
        "relative_error": {k: (e / n) ** 0.5 for k, (e, n) in errors.items()},
        "kl_mean": kls / count,
        "top1_agreement": agree / count,
        "positions": count,
    }


def format_report(report: dict) -> str:
    lines = ["kind          relative weight error"]
    for kind, err in sorted(report["relative_error"].items()):
        lines.append(f"{kind:<13} {err:.4f}")
    lines.append(f"KL(source || converted), mean over {report['positions']} positions: "
                 f"{report['kl_mean']:.5f} nats")
    lines.append(f"same top-1 token: {100 * report['top1_agreement']:.1f}%")
    return "\n".join(lines)


class _Converted:
    """The converted folder's tensors, lazy; each is dropped once used."""

    def __init__(self, path: Path):
        self.tensors: dict[str, mx.array] = {}
        for file in weight_files(path):
            self.tensors.update(mx.load(str(file)))

    def pop(self, name: str) -> mx.array:
        return self.tensors.pop(name)


def _read_source(source: Source, item: Item) -> mx.array:
    if len(item.sources) > 1:
        return mx.stack([source.read(n) for n in item.sources])
    return source.read(item.sources[0])


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _join(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part
