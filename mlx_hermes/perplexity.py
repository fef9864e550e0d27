"""Perplexity of a model on a text, and how far a quantized model strays from a
reference: the numbers to choose a recipe by.

The text is tokenized as a whole (one BOS per document) and cut into
non-overlapping windows of `context` tokens; each window is one forward pass,
and every token after a window's first is scored. Perplexity is exp of the
mean negative log-likelihood; its standard error comes from the spread of the
windows' means (the delta method: se(ppl) = ppl * se(mean NLL)).

A reference model given as a folder (`--compare`, e.g. the original 93 GB
checkpoint) is never loaded whole: `StreamedReference` runs every window
through it one layer at a time, reading that layer's weights, applying it to
all windows and dropping it, so it needs one layer's weights (~1.4 GB in
bf16 for the 8x7B, twice that computed in float32 on a CPU) plus the
windows' hidden states, as the converter does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import numpy as np

from .errors import HermesError
from .model import Model, attention_mask
from .tokenizer import Tokenizer


class StreamedReference:
    """Next-token log-probabilities of a checkpoint folder for given windows,
    computed layer by layer (see the module docstring)."""

    def __init__(self, path: Union[str, Path]):
        from .loader import load
        from .specialize import FastPaths

        # lazy: nothing is read until a layer is evaluated
        self.model, _ = load(path, lazy=True, fast_paths=FastPaths.none())

    def run(self, parts: list[list[int]],
            progress: Optional[Callable[[int, int], None]] = None) -> list[mx.array]:
        """The final hidden states [L, D] of each window, after every layer."""
        inner = self.model.model
        hidden = [inner.embed_tokens(mx.array([w])) for w in parts]  # [1, L, D] each
        mx.eval(hidden)
        layers = len(inner.layers)
        for i in range(layers):
            layer = inner.layers[i]
            hidden = [layer(h, attention_mask(h, None), None) for h in hidden]
            mx.eval(hidden)
            inner.layers[i] = None  # its weights go: the next layer's are read
            del layer
            mx.clear_cache()
            if progress:
                progress(i + 1, layers)
        return hidden

    def logprobs(self, hidden: mx.array) -> mx.array:
        """[1, L, D] final hidden states -> [L, V] log-probabilities."""
        h = self.model.model.norm(hidden)
        m = self.model
        logits = m.model.embed_tokens.as_linear(h) if m.args.tie_word_embeddings else m.lm_head(h)
        return _log_softmax(logits[0])


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


def windows(tokenizer: Tokenizer, texts: list[str], context: int,
            max_tokens: Optional[int] = None) -> list[list[int]]:
    """The texts' tokens (one BOS per document) in windows of `context`; with
    `max_tokens`, only the first that many, tokenizing no more text than that needs
    (a token is rarely more than 16 characters), not a whole corpus."""
    ids: list[int] = []
    for text in texts:
        if max_tokens is not None:
            if len(ids) >= max_tokens:
                break
            text = text[: 16 * (max_tokens - len(ids))]
        ids += tokenizer.encode(text)
    ids = ids[:max_tokens]
    out = [ids[a : a + context] for a in range(0, len(ids), context)]
    out = [w for w in out if len(w) > 1]
    if not out:
        raise HermesError("the text is too short: it needs at least 2 tokens")
    return out


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def perplexity(model: Model, tokenizer: Tokenizer, texts: list[str], context: int = 512,
               reference: Union[Model, str, Path, None] = None,
               progress: Optional[Callable[[int, int], None]] = None,
               max_windows: Optional[int] = None) -> dict:
    """Perplexity (and its standard error) of `model` on `texts` (its first
    `max_windows` windows, if given); with `reference` (a loaded model, or a
    checkpoint folder, streamed layer by layer), the mean KL divergence
    KL(reference || model) of the next-token distributions and how often
    their top choice agrees. `progress(done, total)` counts the reference's
    layers, then the windows."""
    if context < 2:
        raise HermesError(f"--context must be at least 2, got {context}")
    parts = windows(tokenizer, texts, context)[:max_windows]
    streamed = None
    if reference is not None and not isinstance(reference, Model):
        streamed = StreamedReference(reference)
        finals = streamed.run(parts, progress)
    nll, count, kl, agree = [], 0, 0.0, 0
    for n, w in enumerate(parts):
        tokens = mx.array([w])
        logp = _log_softmax(model(tokens)[0, :-1])  # [L-1, V]
        target = mx.array(w[1:])
        token_nll = -mx.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
        nll.append(float(token_nll.mean().item()))
        count += len(w) - 1
        if streamed is not None:
            ref = streamed.logprobs(finals[n])[:-1]
            finals[n] = None
        elif reference is not None:
            ref = _log_softmax(reference(tokens)[0, :-1])
        if reference is not None:
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
