"""What this machine runs faster than the portable model, installed once at load.

The model (model.py, moe.py) is the portable one: MLX's own ops, the same on
Metal, CUDA and the CPU. `specialize` looks at the device once and swaps in
modules that do the same work faster here, each a subclass of the portable
module with the same interface and the same parameters (so a test runs both
side by side, and a checkpoint saved from either is the same):

- on a CPU with several cores (cpu.py): the LM head split by rows, and the
  experts spread over one CPU stream per core (results bit-identical);
- on CUDA: the MoE blocks' decoding through fused kernels (cuda_qmv.py for
  one token, cuda_grouped.py for batched steps), the decoder layers' residual
  adds inside kernels (cuda_layer.py), the 4-bit linear layers'
  steps of a few rows through cuda_grouped.py and a prompt's rows through
  cuda_prefill.py's tensor-core GEMM, every other quantized linear layer's
  batched steps as one 2-D matrix (MLX's GEMM), batched decode steps'
  attention over the padded batch cache (cuda_attention.py), long
  prefills' experts through that GEMM (dense_prefill.py; through float
  experts where it does not apply), and a prompt queued a layer at a time
  (cuda_prompt.py: bounded memory).

Before that, q/k/v and gate/up are joined into one matrix each (fusion.py):
a layout change every backend gains from. On Metal nothing else is installed:
the portable path is what a Mac runs. `FastPaths.none()` (`--portable` on the
command line) keeps the portable modules everywhere. Inside an installed
module only the shape decides per call (decode or prefill, tokens per expert).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from . import (chip, cpu, cuda_attention, cuda_grouped, cuda_layer, cuda_prefill, cuda_prompt,
               cuda_qmv, dense_prefill)
from .model import Model


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths may be installed where they apply."""

    cpu_streams: bool = True  # every core of a CPU
    cuda_kernels: bool = True  # kernels (CUDA): experts, linear layers, attention, prefill GEMM
    dense_prefill: bool = True  # a prompt's experts: the prefill GEMM or float experts (CUDA)
    layer_by_layer: bool = True  # a prompt queued a layer at a time: bounded memory (CUDA)

    @classmethod
    def none(cls) -> "FastPaths":
        """The portable model only (what a Mac runs), on any machine."""
        return cls(**{f.name: False for f in fields(cls)})


def specialize(model: Model, paths: FastPaths = FastPaths(),
               device: mx.Device | None = None) -> list[str]:
    """Fuse the model's projections and install the fast paths `paths` allows
    on `device` (default: MLX's default device). Returns what was installed."""
    model.fuse()
    device = device or mx.default_device()
    installed = []
    if device == mx.cpu and paths.cpu_streams and len(cpu.streams()) > 1:
        streams = cpu.streams()
        if not model.args.tie_word_embeddings and cpu.RowSplitLinear.applies(model.lm_head,
                                                                             streams):
            install(model.lm_head, cpu.RowSplitLinear).streams = streams
            installed.append("cpu-lm-head")
        for layer in model.layers:
            install(layer.block_sparse_moe.switch_mlp, cpu.StreamedExperts).streams = streams
        installed.append("cpu-experts")
    on_cuda = chip.on_cuda(device)
    dtype = model.model.norm.weight.dtype  # the activations'
    if on_cuda and paths.layer_by_layer:
        install(model.model, cuda_prompt.LayerByLayerModel)
        installed.append("cuda-layer-by-layer")
    if on_cuda and paths.dense_prefill:
        for layer in model.layers:
            block = layer.block_sparse_moe
            if dense_prefill.applies(block.switch_mlp):
                experts = install(block.switch_mlp, dense_prefill.DensePrefillExperts)
                experts.min_pairs = dense_prefill.DENSE_PREFILL_MIN_TOKENS * block.top_k
                if paths.cuda_kernels:
                    experts.use_kernels(dtype)
                installed.append("dense-prefill")
    if on_cuda and paths.cuda_kernels:
        for layer in model.layers:
            if cuda_qmv.applies(layer.block_sparse_moe, dtype):
                install(layer.block_sparse_moe, cuda_qmv.KernelMoeBlock)
                installed.append("cuda-kernels")
                if cuda_layer.applies(layer, dtype):
                    install(layer, cuda_layer.KernelDecoderLayer)
                    installed.append("cuda-layer")
            if cuda_attention.applies(layer.self_attn, dtype):
                install(layer.self_attn, cuda_attention.KernelAttention)
                installed.append("cuda-attention")
        for _, module in model.named_modules():
            if cuda_prefill.linear_applies(module, dtype):
                install(module, cuda_prefill.PrefillQuantizedLinear)
                installed += ["cuda-linear", "cuda-prefill-linear"]
            elif cuda_grouped.linear_applies(module, dtype):
                install(module, cuda_grouped.KernelQuantizedLinear)
                installed.append("cuda-linear")
            elif isinstance(module, nn.QuantizedLinear):
                install(module, cuda_grouped.FlatQuantizedLinear)
                installed.append("cuda-flat-linear")
    return list(dict.fromkeys(installed))


def install(module: nn.Module, cls: type) -> nn.Module:
    """Make `module` a `cls` (a subclass of its portable class), keeping its
    parameters; on a module swapped already, `cls` goes on top of that one.
    Setting `module.__class__` back undoes it."""
    module.__class__ = _combined(cls, type(module))
    return module


@functools.lru_cache(maxsize=None)
def _combined(cls: type, current: type) -> type:
    if issubclass(current, cls):
        return current
    if current in cls.__mro__:  # the portable class cls derives from
        return cls
    return type(f"{cls.__name__}+{current.__name__}", (cls, current), {})
