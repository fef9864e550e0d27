"""Each fast path against the portable path it replaces (the CPU's here, CUDA's on
the GPU machine), and where specialize installs them."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_hermes
from mlx_hermes import dense_prefill
from mlx_hermes.model import Model
from mlx_hermes.moe import SparseMoeBlock
from mlx_hermes.specialize import FastPaths, install, specialize

from .test_model import assert_close, prompt


def unfused_copy(model: Model) -> Model:
    twin = Model(model.args)
    weights = dict(tree_flatten(model.checkpoint_parameters()))
    from mlx_hermes.loader import quantize_like

    quantize_like(twin, weights, {})
    twin.load_weights(list(weights.items()))
    return twin


@pytest.mark.parametrize("bits", [None, 4])
def test_fused_projections_equal_separate_ones(hf_checkpoint, mlx_lm_quantized, bits):
    """gate+up and q+k+v joined at load against the checkpoint's separate layers."""
    path = hf_checkpoint if bits is None else mlx_lm_quantized(bits, 32)
    model, _ = mlx_hermes.load(path)
    assert "gate_up_proj" in model.layers[0].block_sparse_moe.switch_mlp
    assert "qkv_proj" in model.layers[0].self_attn
    plain = unfused_copy(model)
    assert "gate_proj" in plain.layers[0].block_sparse_moe.switch_mlp
    assert "q_proj" in plain.layers[0].self_attn
    for length in (1, 40):  # decode and sorted prefill
        tokens = mx.array([prompt(length, seed=length)])
        assert_close(np.array(model(tokens)), np.array(plain(tokens)), rel=1e-5)


@pytest.mark.parametrize("bits,chunk", [(4, None), (4, 3000)])
def test_dense_prefill_equals_gather_qmm(mlx_lm_quantized, monkeypatch, bits, chunk):
    # chunk: a few rows of float experts at a time, as the full-size model does
    model, _ = mlx_hermes.load(mlx_lm_quantized(bits, 32), fast_paths=FastPaths.none())
    tokens = mx.array([prompt(dense_prefill.DENSE_PREFILL_MIN_TOKENS + 16, seed=11)])
    portable = np.array(model(tokens))
    for layer in model.layers:
        experts = layer.block_sparse_moe.switch_mlp
        assert dense_prefill.applies(experts)
        install(experts, dense_prefill.DensePrefillExperts).min_pairs = 64
    if chunk:
        monkeypatch.setattr(dense_prefill, "DENSE_CHUNK_BYTES", chunk)
    dense = np.array(model(tokens))
    assert_close(dense, portable, rel=1e-4)


def test_float_experts_have_nothing_to_dequantize(loaded):
    model, _ = loaded()
    assert not dense_prefill.applies(model.layers[0].block_sparse_moe.switch_mlp)


def test_each_fast_path_is_installed_where_it_applies_only(mlx_lm_quantized):
    """specialize decides once, at load, from the device: CUDA's paths on CUDA,
    the CPU's on a CPU with several cores, nothing with FastPaths.none()."""
    from mlx_hermes import cpu

    path = mlx_lm_quantized(4, 32)
    model, _ = mlx_hermes.load(path, lazy=True, fast_paths=FastPaths.none())
    assert specialize(model, FastPaths.none()) == []
    model, _ = mlx_hermes.load(path, lazy=True, fast_paths=FastPaths.none())
    installed = specialize(model)
    on_cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    assert ("dense-prefill" in installed) == on_cuda
    multicore_cpu = mx.default_device() == mx.cpu and len(cpu.streams()) > 1
    assert ("cpu-experts" in installed) == multicore_cpu
    if multicore_cpu:
        assert isinstance(model.layers[0].block_sparse_moe.switch_mlp, cpu.StreamedExperts)
        assert isinstance(model.lm_head, cpu.RowSplitLinear)
    model, _ = mlx_hermes.load(path, lazy=True, fast_paths=FastPaths.none())
    assert specialize(model, device=mx.cpu) == (["cpu-lm-head", "cpu-experts"]
                                                if len(cpu.streams()) > 1 else [])


@pytest.mark.parametrize("bits", [None, 4])
def test_cpu_streams_give_identical_logits(hf_checkpoint, mlx_lm_quantized, bits):
    """The LM head split by rows, the k experts one per CPU stream and a
    prompt's sorted token-expert pairs in shares compute each output exactly
    as one stream does."""
    from mlx_hermes import cpu
    from mlx_hermes.cache import make_cache

    if len(cpu.streams()) < 2:
        pytest.skip("needs a CPU with two or more cores")  # CI has 2
    path = hf_checkpoint if bits is None else mlx_lm_quantized(bits, 32)
    outputs = {}
    for paths in (FastPaths.none(), FastPaths()):
        model, _ = mlx_hermes.load(path, fast_paths=paths)
        assert isinstance(model.layers[0].block_sparse_moe.switch_mlp, cpu.StreamedExperts) == (
            paths.cpu_streams and mx.default_device() == mx.cpu)
        cache = make_cache(model)
        first = model(mx.array([prompt(40, seed=3)]), cache=cache)  # 80 pairs: sorted
        steps = [model(mx.array([[t]]), cache=cache) for t in (5, 77, 901)]
        outputs[paths.cpu_streams] = [np.array(first)] + [np.array(s) for s in steps]
    for plain, split in zip(outputs[False], outputs[True]):
        assert np.array_equal(plain, split)


@pytest.mark.skipif(not (mx.cuda.is_available() and mx.default_device() == mx.gpu),
                    reason="a CUDA kernel: runs on the GPU machine")
@pytest.mark.parametrize("rows,experts,k", [((2, 2), 8, 2), ((4, 1), 5, 3), ((8, 4), 4, 1)])
def test_cuda_decode_kernel_equals_gather_qmm(monkeypatch, rows, experts, k):
    """mlx_hermes/cuda_qmv.py's kernels (routing included) against MLX's own
    ops, bf16 4-bit, decode and a short prefill, on small random models;
    rows: output rows per warp of each kernel (what the speed sweep varies)."""
    from dataclasses import replace

    from mlx_hermes import cuda_qmv
    from mlx_hermes import profile as prof
    from mlx_hermes.cache import make_cache

    monkeypatch.setattr(cuda_qmv, "GATE_UP_ROWS", rows[0])
    monkeypatch.setattr(cuda_qmv, "DOWN_ROWS", rows[1])
    monkeypatch.setitem(prof.SYNTHETIC, "tiny", replace(prof.TINY, num_local_experts=experts,
                                                         num_experts_per_tok=k))
    model = prof.synthetic_model("tiny", bits=4, group_size=32, dtype=mx.bfloat16,
                                 fast_paths=FastPaths.none())
    for layer in model.layers:
        # A float32 router: bf16 logits often tie exactly (8 bits of mantissa), and
        # a tie at the k-th place may go either way in either path.
        gate = layer.block_sparse_moe.gate
        router = nn.Linear(model.args.hidden_size, model.args.num_local_experts, bias=False)
        router.weight = mx.dequantize(gate.weight, gate.scales, gate.biases, gate.group_size,
                                      gate.bits).astype(mx.float32)
        layer.block_sparse_moe.gate = router
    assert all(cuda_qmv.applies(layer.block_sparse_moe, mx.bfloat16) for layer in model.layers)
    outputs = {}
    for enabled in (False, True):
        for layer in model.layers:
            block = layer.block_sparse_moe
            block.__class__ = cuda_qmv.KernelMoeBlock if enabled else SparseMoeBlock
        cache = make_cache(model)
        steps = [model(mx.array([prompt(5, seed=1)]), cache=cache)[:, -1]]
        steps += [model(mx.array([[t]]), cache=cache)[:, -1] for t in (7, 300, 4000)]
        outputs[enabled] = np.array(mx.stack(steps).astype(mx.float32))
    # bf16 activations, float sums; each step on its own, so a failure says where it began
    for step, kernels, ops in zip(["5-token prefill", "decode 1", "decode 2", "decode 3"],
                                  outputs[True], outputs[False]):
        try:
            assert_close(kernels, ops, rel=3e-2)
        except AssertionError as e:
            raise AssertionError(f"{step}: {e}") from None
