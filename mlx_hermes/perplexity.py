"""Perplexity of a model on a text, and how far a quantized model strays from a
reference: the numbers to choose a recipe by.

The text is tokenized as a whole (one BOS per document) and cut into
non-overlapping windows of `context` tokens; each window is one forward pass,
and every token after a window's first is scored. Perplexity is exp of the
mean negative log-likelihood; its standard error comes from the spread of the
windows' means (the delta method: se(ppl) = ppl * se(mean NLL)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .errors import HermesError
from .model import Model
from .tokenizer import Tokenizer


def read_texts(path: Path) -> list[str]:
    """Plain text (one document), or JSONL with a `text` field per line."""
    path = Path(path)
    try:
        raw = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise HermesError(f"cannot read {path}: {e.strerror or e}") from None
    if path.suffix != ".jsonl":
        return [raw]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            raise HermesError(f"{path}, line {n}: not a JSON object with a \"text\" field") from None
    return texts


def windows(tokenizer: Tokenizer, texts: list[str], context: int) -> list[list[int]]:
    ids = [i for text in texts for i in tokenizer.encode(text)]
    out = [ids[a : a + context] for a in range(0, len(ids), context)]
    out = [w for w in out if len(w) > 1]
    if not out:
        raise HermesError("the text is too short: it needs at least 2 tokens")
    return out


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def perplexity(model: Model, tokenizer: Tokenizer, texts: list[str], context: int = 512,
               reference: Optional[Model] = None,
               progress: Optional[Callable[[int, int], None]] = None,
               max_windows: Optional[int] = None) -> dict:
    """Perplexity (and its standard error) of `model` on `texts` (its first
    `max_windows` windows, if given); with `reference`, the mean KL divergence
    KL(reference || model) of the next-token distributions and how often
    their top choice agrees."""
    if context < 2:
        raise HermesError(f"--context must be at least 2, got {context}")
    parts = windows(tokenizer, texts, context)[:max_windows]
    nll, count, kl, agree = [], 0, 0.0, 0
    for n, w in enumerate(parts):
        tokens = mx.array([w])
        logp = _log_softmax(model(tokens)[0, :-1])  # [L-1, V]
        target = mx.array(w[1:])
        token_nll = -mx.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
        nll.append(float(token_nll.mean().item()))
        count += len(w) - 1
        if reference is not None:
            ref = _log_softmax(reference(tokens)[0, :-1])
            kl += float((mx.exp(ref) * (ref - logp)).sum().item())
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum().item())
        if progress:
            progress(n + 1, len(parts))
    weights = np.array([len(w) - 1 for w in parts], dtype=np.float64)
    means = np.array(nll)
    mean = float((means * weights).sum() / weights.sum())
    se = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    ppl = math.exp(mean)
    out = {"perplexity": ppl, "perplexity_se": ppl * se, "mean_nll": mean, "tokens": count,
           "windows": len(parts), "context": context}
    if reference is not None:
        out.update(kl_divergence=kl / count, top1_agreement=agree / count)
    return out


def format_result(result: dict) -> str:
    line = (f"perplexity {result['perplexity']:.4f} ± {result['perplexity_se']:.4f} over "
            f"{result['tokens']} tokens ({result['windows']} windows of {result['context']})")
    if "kl_divergence" in result:
        line += (f"; against the reference: KL {result['kl_divergence']:.5f}, top-1 agreement "
                 f"{100 * result['top1_agreement']:.1f}%")
    return line
