"""GPTQ (Frantar et al., 2022): rounding that learns from a calibration text.

Round-to-nearest quantizes each weight on its own. GPTQ quantizes a matrix one
input column at a time and moves each column's rounding error onto the columns
not yet quantized, weighted by how the module's inputs co-vary over a
calibration text (the Hessian H = X^T X of its inputs X), so that the outputs
X W^T move least. The result is plain MLX affine quantization (codes, scales,
biases), loaded by mlx-hermes and mlx-lm like any other. At 2 and 3 bits it
matters: on the trained stand-in it cut the 2-bit experts' KL about fourfold
(benchmarks/RESULTS.md).

Why ours and not mlx-lm's `mlx_lm.quant.gptq`: that one loads the whole model
(the 8x7B is 93 GB in bf16), has no 3-bit path and pools one Hessian over all
experts of a layer. Here the calibration windows go through the source
checkpoint one layer at a time (as perplexity.StreamedReference does): a
layer's weights are read, its modules quantized, its output computed with the
quantized weights (so each layer is calibrated on what the quantized layers
before it produce) and dropped. Within a layer the attention is quantized
before the MoE block sees its output; each expert gets the Hessian of the
tokens routed to it, one expert at a time (the 8x7B's down_proj Hessian is
14336^2 floats, 0.8 GB), and its gate and up projections are quantized before
its down projection sees their product. Memory: the windows' hidden states, a
layer's attention and router, one expert's weights (read from the source's own
tensors one expert at a time) with its Hessian and inverse factor: ~5 GB for the
8x7B with the default 32k calibration tokens (estimated from those parts).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu

from mlx_hermes.errors import HermesError
from mlx_hermes.loader import default_dtype, read_config, read_weights
from mlx_hermes.model import Model, ModelArgs, attention_mask, checkpoint_expert_names
from mlx_hermes.perplexity import read_texts, windows
from mlx_hermes.tokenizer import Tokenizer

from .plan import Item

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 32768  # 64 windows of 512
CONTEXT = 512
DAMPING = 0.01  # of the Hessian's mean diagonal, added to its diagonal (as GPTQ does)
ATTENTION_SHARE = 0.05  # of a layer's progress: the 8x7B's attention and router are ~4% of it


# ---- one matrix --------------------------------------------------------------------------

def pack(codes: mx.array, bits: int) -> mx.array:
    """[..., I] integer codes -> MLX's packed uint32 words [..., I * bits / 32]: a
    little-endian bit stream, code j at bit j * bits (for every width MLX has)."""
    c = np.asarray(codes.astype(mx.uint8))
    stream = ((c[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    words = np.packbits(stream.reshape(*c.shape[:-1], -1, 32), axis=-1, bitorder="little")
    return mx.array(words.view(np.uint32).reshape(*c.shape[:-1], -1))


def inverse_cholesky(hessian: mx.array) -> mx.array:
    """The upper Cholesky factor U of the damped Hessian's inverse (H^-1 = U^T U): GPTQ's
    [I, I] weights for spreading a column's error over the columns after it. An input
    that is always 0 (its diagonal is 0) gets 1 there: its column's error then has
    nowhere to go.

    With J the order reversed, chol(J H J) = L gives U = J L^-1 J, which is upper
    triangular and U^T U = J (J H J)^-1 J = H^-1: one factorization and one triangular
    inverse, on the CPU in float32 (numpy). Why not MLX's linalg: for I = 4096 it took 37 s
    on a 2-core CPU and 76 s on the GPU machine's 16 cores, numpy's LAPACK 3.2 s, and the
    halving below, whose work is all matrix products, 0.7 s (the experts' down
    projection has I = 14336)."""
    h = np.array(hessian.astype(mx.float32), dtype=np.float32)
    diag = np.diagonal(h).copy()
    dead = diag == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMPING * np.mean(np.diagonal(h))
    lower = cholesky(np.ascontiguousarray(h[::-1, ::-1]))
    del h  # the 8x7B's down projection: 0.8 GB each
    inverse = inverse_lower(lower)
    del lower
    return mx.array(np.ascontiguousarray(inverse[::-1, ::-1]))


BLOCK = 512  # below this, LAPACK directly


def cholesky(h: np.ndarray) -> np.ndarray:
    """Lower L with L L^T = h, by halves: [[A, B^T], [B, C]] -> L11 = chol(A),
    L21 = B L11^-T, L22 = chol(C - L21 L21^T)."""
    n = h.shape[0]
    if n <= BLOCK:
        return np.linalg.cholesky(h)
    k = n // 2
    l11 = cholesky(h[:k, :k])
    l21 = h[k:, :k] @ inverse_lower(l11).T
    out = np.zeros_like(h)
    out[:k, :k], out[k:, :k] = l11, l21
    out[k:, k:] = cholesky(h[k:, k:] - l21 @ l21.T)
    return out


def inverse_lower(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower triangular matrix, by halves:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]."""
    n = lower.shape[0]
    if n <= BLOCK:
        return np.tril(np.linalg.inv(lower))
    k = n // 2
    a, c = inverse_lower(lower[:k, :k]), inverse_lower(lower[k:, k:])
    out = np.zeros_like(lower)
    out[:k, :k], out[k:, k:] = a, c
    out[k:, :k] = -(c @ (lower[k:, :k] @ a))
    return out


@functools.lru_cache(maxsize=None)
def _group_step(bits: int) -> Callable:
    top = float(2**bits - 1)

    @mx.compile
    def step(w: mx.array, hinv: mx.array, scales: mx.array, biases: mx.array):
        """One group's columns, left to right: w [O, G] (already carrying the earlier
        groups' errors), hinv [G, G] (this group's block of the upper factor),
        scales/biases [O, 1] -> codes [O, G] and the scaled errors [O, G]."""
        codes, errors = [], []
        for k in range(w.shape[1]):
            col = w[:, k : k + 1]
            q = mx.clip(mx.round((col - biases) / scales), 0.0, top)
            e = (col - (q * scales + biases)) / hinv[k, k]
            w = w - e * hinv[k : k + 1]  # zeros left of k: only later columns change
            codes.append(q)
            errors.append(e)
        return mx.concatenate(codes, axis=1), mx.concatenate(errors, axis=1)

    return step


def gptq(w: mx.array, hinv: mx.array, bits: int, group_size: int,
         dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    """Quantize w [O, I] against its inputs (hinv: `inverse_cholesky` of their Hessian):
    MLX's (packed codes, scales, biases), scales and biases in `dtype`. Each group's
    scale and bias are MLX's own (round-to-nearest's) for that group's columns as they
    stand when it is reached, rounded to `dtype` before use, as stored."""
    w = w.astype(mx.float32)
    step = _group_step(bits)
    codes, scales, biases = [], [], []
    for start in range(0, w.shape[1], group_size):
        group, w = w[:, :group_size], w[:, group_size:]  # w: the columns still to come
        _, s, b = mx.quantize(group, group_size=group_size, bits=bits)
        s, b = s.astype(dtype), b.astype(dtype)
        end = start + group_size
        q, err = step(group, hinv[start:end, start:end], s.astype(mx.float32),
                      b.astype(mx.float32))
        if w.shape[1]:
            w = w - err @ hinv[start:end, end:]
        mx.eval(q, s, b, w)
        codes.append(q)
        scales.append(s)
        biases.append(b)
    return (pack(mx.concatenate(codes, axis=1), bits), mx.concatenate(scales, axis=1),
            mx.concatenate(biases, axis=1))


# ---- the model, layer by layer -----------------------------------------------------------

class Hessian:
    """X^T X of the inputs a module sees, in float32, summed over calls."""

    def __init__(self):
        self.sum: Optional[mx.array] = None
        self.rows = 0

    def add(self, x: mx.array) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        part = x.T @ x
        self.sum = part if self.sum is None else self.sum + part
        self.rows += x.shape[0]
        mx.eval(self.sum)


class _Recorder(nn.Module):
    """Stands in for a module for one pass, recording its inputs' Hessian."""

    def __init__(self, module: nn.Module, hessian: Hessian):
        super().__init__()
        self.module, self.hessian = module, hessian

    def __call__(self, x: mx.array) -> mx.array:
        self.hessian.add(x)
        return self.module(x)


Quantized = tuple[mx.array, mx.array, mx.array]  # packed codes, scales, biases


class LayerwiseGPTQ:
    """GPTQ for the modules the converter quantizes, computed layer by layer as the
    converter reaches them (`quantized(item)`), from calibration windows of `texts`.

    The converter writes in checkpoint order (embeddings, layer 0, ..., LM head); asking
    for an item of layer i quantizes layers up to i, and keeps only the results not yet
    taken. The embeddings stay round-to-nearest (a table lookup has no inputs to weigh).
    """

    def __init__(self, src: Path, texts: list[str], items: list[Item], dtype: mx.Dtype,
                 tokens: int = CALIBRATION_TOKENS, context: int = CONTEXT):
        config = read_config(src)
        self.args = ModelArgs.from_dict(config)
        self.model = Model(self.args)  # the source's float weights, lazy: read layer by layer
        # the checkpoint's own tensors, lazy: each expert is read when it is quantized (the
        # model's stacked experts are never evaluated), so a layer's experts are not all held
        self.source = read_weights(src)
        weights = self.model.sanitize(dict(self.source))
        self.compute = default_dtype(self.args, weights)
        self.model.load_weights([(k, v.astype(self.compute)) for k, v in weights.items()])
        del weights
        self.dtype = dtype
        self.widths = {item.name: (item.bits, item.group_size) for item in items
                       if item.bits is not None and item.kind != "embeddings"}
        ids = windows(Tokenizer.from_path(src), texts, context, max_tokens=tokens)
        self.tokens = kept = sum(map(len, ids))
        self.hidden = [self.model.model.embed_tokens(mx.array([w])) for w in ids]  # [1, L, D]
        mx.eval(self.hidden)
        self.model.model.embed_tokens = None  # the converter reads its own copy
        self.progress: Callable[[float], None] = lambda part: None  # share of a layer done
        self.done = -1  # layers quantized so far
        self.results: dict[str, Quantized] = {}
        log.info("GPTQ calibration: %d tokens in %d windows", kept, len(ids))

    def covers(self, item: Item) -> bool:
        return item.name in self.widths

    def quantized(self, item: Item) -> Quantized:
        if item.name not in self.results:
            last = self.args.num_hidden_layers - 1
            target = int(item.name.split(".")[2]) if item.name.startswith("model.layers.") \
                else last + 1  # the LM head: after every layer
            while self.done < target:
                self.done += 1
                if self.done <= last:
                    self._layer(self.done)
                else:
                    self._lm_head()
        return self.results.pop(item.name)

    # -- internals --

    def _quantize(self, names: list[str], module_weights: list[mx.array],
                  hessian: Hessian) -> list[mx.array]:
        """GPTQ of several matrices with the same inputs; returns their dequantized
        weights (what the quantized model computes with)."""
        hinv = inverse_cholesky(hessian.sum)
        out = []
        for name, w in zip(names, module_weights):
            bits, group_size = self.widths[name.rsplit("#", 1)[0]]
            q, s, b = gptq(w, hinv, bits, group_size, self.dtype)
            self.results[name] = (q, s, b)
            out.append(mx.dequantize(q, s, b, group_size=group_size, bits=bits)
                       .astype(self.compute))
        return out

    def _layer(self, i: int) -> None:
        began = time.perf_counter()
        layer = self.model.model.layers[i]
        prefix = f"model.layers.{i}"
        attn, moe = layer.self_attn, layer.block_sparse_moe

        # attention: q, k, v see the normed input; o sees their attention
        normed = [layer.input_layernorm(h) for h in self.hidden]
        h_in, h_out = Hessian(), Hessian()
        for x in normed:
            h_in.add(x)
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        names = [f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        for module, w in zip(projections, self._quantize(names, [m.weight for m in projections],
                                                         h_in)):
            module.weight = w
        o_proj = attn.o_proj
        attn.o_proj = _Recorder(o_proj, h_out)
        for x in normed:
            mx.eval(attn(x, attention_mask(x, None)))
        attn.o_proj = o_proj
        name = f"{prefix}.self_attn.o_proj"
        o_proj.weight = self._quantize([name], [o_proj.weight], h_out)[0]
        self.hidden = [h + attn(x, attention_mask(x, None)) for h, x in zip(self.hidden, normed)]
        del normed
        mx.eval(self.hidden)
        self.progress(ATTENTION_SHARE)

        # the MoE block: the router, then each expert on the tokens routed to it
        shapes = [h.shape for h in self.hidden]
        x = mx.concatenate([layer.post_attention_layernorm(h).reshape(-1, h.shape[-1])
                            for h in self.hidden])  # [T, D]
        mx.eval(x)
        router = Hessian()
        router.add(x)
        name = f"{prefix}.block_sparse_moe.gate"
        if name in self.widths:
            moe.gate.weight = self._quantize([name], [moe.gate.weight], router)[0]
        del router
        indices, weights = moe.route(x)  # [T, k] each
        y = mx.zeros(x.shape, dtype=mx.float32)  # the block's output, summed over experts
        projections = ("gate_proj", "up_proj", "down_proj")
        sources = {p: checkpoint_expert_names(f"{prefix}.block_sparse_moe", p,
                                              self.args.num_local_experts) for p in projections}
        routed = np.asarray(indices)
        unreached = []
        for e in range(self.args.num_local_experts):
            w = {p: self.source[sources[p][e]].astype(self.compute) for p in projections}
            tokens, slot = np.nonzero(routed == e)
            if len(tokens) == 0:
                unreached.append(e)
            xe = x[mx.array(tokens)] if len(tokens) else x[:0]
            names = [f"{prefix}.block_sparse_moe.switch_mlp.{p}#{e}" for p in projections]
            hg = Hessian()
            hg.add(xe)
            gate, up = self._quantize(names[:2], [w["gate_proj"], w["up_proj"]], _or_eye(hg, x))
            act = swiglu(xe @ gate.T, xe @ up.T)  # [n, F]
            hd = Hessian()
            hd.add(act)
            down = self._quantize(names[2:], [w["down_proj"]], _or_eye(hd, act))[0]
            if len(tokens):
                share = weights[mx.array(tokens), mx.array(slot)][:, None]
                y = y.at[mx.array(tokens)].add((act @ down.T).astype(mx.float32) * share)
            mx.eval(y)
            self.progress(ATTENTION_SHARE + (1 - ATTENTION_SHARE) * (e + 1)
                          / self.args.num_local_experts)
            del w, gate, up, down, hg, hd, act, xe
        if unreached:
            log.warning("GPTQ: no calibration token reached expert(s) %s of layer %d: rounded to "
                        "nearest", ", ".join(map(str, unreached)), i)
        for p in projections:
            self._join(f"{prefix}.block_sparse_moe.switch_mlp.{p}")
            for name in sources[p]:
                del self.source[name]
        out, start = [], 0
        for h, shape in zip(self.hidden, shapes):
            n = shape[0] * shape[1]
            out.append(h + y[start : start + n].reshape(shape).astype(h.dtype))
            start += n
        self.hidden = out
        mx.eval(self.hidden)
        self.model.model.layers[i] = None  # its weights go; the next layer's are read
        mx.clear_cache()
        log.info("GPTQ: layer %d of %d in %.1f s", i + 1, self.args.num_hidden_layers,
                 time.perf_counter() - began)

    def _join(self, name: str) -> None:
        """The experts' results, one per expert, as the converter's stacked item."""
        parts = [self.results.pop(f"{name}#{e}") for e in range(self.args.num_local_experts)]
        self.results[name] = tuple(mx.stack([p[j] for p in parts]) for j in range(3))

    def _lm_head(self) -> None:
        if self.args.tie_word_embeddings or "lm_head" not in self.widths:
            return
        hessian = Hessian()
        for h in self.hidden:
            hessian.add(self.model.model.norm(h))
        self._quantize(["lm_head"], [self.model.lm_head.weight], hessian)
        self.hidden = []


def _or_eye(hessian: Hessian, x: mx.array) -> Hessian:
    """A module no calibration token reached: the identity, with which GPTQ is
    round-to-nearest."""
    if hessian.rows == 0:
        hessian.sum = mx.eye(x.shape[-1], dtype=mx.float32)
    return hessian


def calibration_texts(path: Path) -> list[str]:
    """The calibration file: plain text, or JSONL with a `text` field (as perplexity reads)."""
    if not Path(path).is_file():
        raise HermesError(f"--calibration {path}: no such file")
    return read_texts(Path(path))
