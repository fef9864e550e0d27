"""Each fast path against the portable path it replaces (the CPU's here, CUDA's on
the GPU machine), and where specialize installs them."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_hermes
from mlx_hermes import chip, dense_prefill
from mlx_hermes.model import Model
from mlx_hermes.moe import SparseMoeBlock, _route
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


def test_dense_prefill_kernel_is_chosen_for_4_bit_bf16_experts_only():
    """use_kernels (called by specialize on CUDA) picks our GEMM kernel per
    projection where it applies; other formats keep MLX's dequantize."""
    block = SparseMoeBlock(256, 128, 5, 2)
    nn.quantize(block.switch_mlp, class_predicate=lambda path, _: {
        "group_size": 64, "bits": 8 if path == "down_proj" else 4, "mode": "affine"})
    block.set_dtype(mx.bfloat16)
    block.switch_mlp.fuse()
    experts = install(block.switch_mlp, dense_prefill.DensePrefillExperts)
    assert experts.use_kernels(mx.bfloat16).gemm_projections == {"gate_up_proj"}
    assert experts.use_kernels(mx.float16).gemm_projections == set()  # it reads bf16 only
    block.set_dtype(mx.float32)  # float32 scales: MLX's
    assert experts.use_kernels(mx.bfloat16).gemm_projections == set()


def _close_to(got: mx.array, want: mx.array, what) -> None:
    """Equal but for the order of float32 sums: one bf16 rounding apart at most."""
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.shape == want.shape, what
    assert np.all(np.abs(got - want) <= 2 ** -7 * np.abs(want) + 1e-3 * np.abs(want).max()), what


@pytest.mark.skipif(not chip.on_cuda(),
                    reason="a CUDA kernel: runs on the GPU machine")
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_cuda_prefill_gemm_equals_dequantize_and_matmul(group_size):
    """cuda_prefill's GEMM against MLX's dequantize and sorted gather_mm:
    experts with no rows, one row, and more than a tile; row ranges of
    gate_up (halves, an odd one not in whole tiles of features); the block's
    whole prefill; one matrix (a linear layer's prompt, by
    PrefillQuantizedLinear past MAX_TOKENS rows)."""
    from mlx_hermes import cuda_grouped, cuda_prefill

    mx.random.seed(group_size)
    block = _quantized_block(256, 384, 5, 2, group_size)
    experts = install(block.switch_mlp, dense_prefill.DensePrefillExperts)
    experts.min_pairs = 1
    counts = [0, 1, 150, 2, 147]  # rows of each expert, sorted
    indices = mx.array(sum(([e] * n for e, n in enumerate(counts)), []), dtype=mx.uint32)
    x = (mx.random.normal((len(indices), 1, 256)) * 0.5).astype(mx.bfloat16)
    h = (mx.random.normal((len(indices), 1, 384)) * 0.5).astype(mx.bfloat16)
    for layer, inputs, ranges in (
            (experts.gate_up_proj, x, [(0, 768), (0, 384), (384, 768), (6, 78)]),
            (experts.down_proj, h, [(0, 256)])):
        for a, b in ranges:
            w = dense_prefill.mlx_rows(layer, a, b)  # [E, b-a, in]
            want = mx.gather_mm(inputs, w.swapaxes(-1, -2), rhs_indices=indices,
                                sorted_indices=True)
            _close_to(cuda_prefill.grouped_matmul(inputs, layer, indices, (a, b)), want, (a, b))
    plain = experts.sorted_mlp(x, indices)
    assert experts.use_kernels(mx.bfloat16).gemm_projections == {"gate_up_proj", "down_proj"}
    _close_to(experts.sorted_mlp(x, indices), plain, "sorted_mlp")

    linear = nn.QuantizedLinear(256, 200, bias=True, group_size=group_size, bits=4)
    linear.bias = mx.random.normal((200,))
    linear.set_dtype(mx.bfloat16)
    assert cuda_prefill.linear_applies(linear, mx.bfloat16)
    w = mx.dequantize(linear.weight, linear.scales, linear.biases, group_size=group_size, bits=4)
    for shape in ((3, 70, 256), (1, cuda_grouped.MAX_TOKENS + 1, 256)):
        xs = (mx.random.normal(shape) * 0.5).astype(mx.bfloat16)
        _close_to(cuda_prefill.matmul(xs, linear), xs @ w.T, ("matmul", shape))
        want = linear(xs)
        install(linear, cuda_prefill.PrefillQuantizedLinear)
        got = linear(xs)
        linear.__class__ = nn.QuantizedLinear
        _close_to(got, want, ("layer", shape))


def test_a_prompt_is_queued_layer_by_layer_and_a_decode_step_at_once(hf_checkpoint,
                                                                       monkeypatch):
    """LayerByLayerModel (installed on CUDA) queues a cached step of more than
    MAX_TOKENS tokens with an async_eval a layer, with the portable model's
    logits exactly; a decode step and an uncached call run as the portable model."""
    from mlx_hermes import cuda_prompt
    from mlx_hermes.cache import make_cache

    model, _ = mlx_hermes.load(hf_checkpoint, fast_paths=FastPaths.none())
    tokens = mx.array([prompt(cuda_prompt.MAX_TOKENS + 1, seed=5)])
    want = model(tokens, cache=make_cache(model))
    install(model.model, cuda_prompt.LayerByLayerModel)
    queued = []
    async_eval = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (queued.append(a), async_eval(*a))[1])
    cache = make_cache(model)
    got = model(tokens, cache=cache)
    assert len(queued) == len(model.layers)
    assert mx.array_equal(got, want)
    queued.clear()
    model(mx.array([[5]]), cache=cache)
    model(tokens)
    assert queued == []


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
    on_cuda = chip.on_cuda()
    assert ("dense-prefill" in installed) == on_cuda
    assert ("cuda-layer-by-layer" in installed) == on_cuda
    assert on_cuda or not {"cuda-linear", "cuda-flat-linear", "cuda-attention",
                           "cuda-layer"} & set(installed)
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


def float32_routers(model) -> None:
    """Each 4-bit router as a float32 Linear of its dequantized weights: bf16 logits
    often tie exactly (8 bits of mantissa), and a tie at the k-th place may go either
    way in either path (benchmarks/kernel_seeds.py uses it too)."""
    for layer in model.layers:
        gate = layer.block_sparse_moe.gate
        router = nn.Linear(model.args.hidden_size, model.args.num_local_experts, bias=False)
        router.weight = mx.dequantize(gate.weight, gate.scales, gate.biases, gate.group_size,
                                      gate.bits).astype(mx.float32)
        layer.block_sparse_moe.gate = router


@pytest.mark.skipif(not chip.on_cuda(),
                    reason="a CUDA kernel: runs on the GPU machine")
@pytest.mark.parametrize("rows,experts,k", [((2, 2), 8, 2), ((4, 1), 5, 3), ((8, 4), 4, 1)])
def test_cuda_decode_kernel_equals_gather_qmm(monkeypatch, rows, experts, k):
    """The kernels (cuda_qmv.py for one token, cuda_grouped.py for the
    5-token prefill; routing included) against MLX's own ops, block by block
    on the inputs the portable model's run gave each MoE block, bf16 4-bit;
    rows: output rows per warp of the one-token kernels (the speed sweep's knob).

    Not the whole model's output: a rounding difference in one block moves
    the next blocks' router logits, and where two of them nearly tie at the
    k-th place the two paths pick different experts from there on. Measured
    over 50 seeds (benchmarks/kernel_seeds.py, H200): 6 whole-model
    comparisons failed, each after such a flip (logit gaps 0.009-0.016),
    while every block on the same input agreed within 1.6e-2."""
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
    float32_routers(model)
    assert all(cuda_qmv.applies(layer.block_sparse_moe, mx.bfloat16) for layer in model.layers)
    inputs = []

    class Recording(SparseMoeBlock):
        def __call__(self, x):
            inputs.append((self, x))
            return super().__call__(x)

    for layer in model.layers:
        layer.block_sparse_moe.__class__ = Recording
    cache = make_cache(model)
    model(mx.array([prompt(5, seed=1)]), cache=cache)
    for t in (7, 300, 4000):
        model(mx.array([[t]]), cache=cache)
    assert len(inputs) == 4 * len(model.layers)
    for i, (block, x) in enumerate(inputs):
        block.__class__ = SparseMoeBlock
        want = np.array(block(x).astype(mx.float32))
        block.__class__ = cuda_qmv.KernelMoeBlock
        got = np.array(block(x).astype(mx.float32))
        try:
            assert_close(got, want, rel=2e-2)
        except AssertionError as e:
            step = ["5-token prefill", "decode 1", "decode 2", "decode 3"][i // len(model.layers)]
            raise AssertionError(f"{step}, layer {i % len(model.layers)}: {e}") from None


def _quantized_block(dims: int, hidden: int, experts: int, k: int, group_size: int):
    """A bf16 MoE block with 4-bit experts, gate and up fused, as loaded on CUDA."""
    block = SparseMoeBlock(dims, hidden, experts, k)
    nn.quantize(block.switch_mlp, group_size=group_size, bits=4)
    block.set_dtype(mx.bfloat16)
    block.switch_mlp.fuse()
    return block


@pytest.mark.skipif(not chip.on_cuda(),
                    reason="a CUDA kernel: runs on the GPU machine")
@pytest.mark.parametrize("dims,hidden,experts,k,group_size", [
    (128, 256, 8, 2, 64), (160, 96, 5, 3, 32), (256, 384, 4, 1, 128), (64, 1088, 4, 2, 64)])
@pytest.mark.parametrize("routing", ["random", "one expert takes all"])
def test_cuda_grouped_kernel_equals_gather_qmm(dims, hidden, experts, k, group_size, routing):
    """mlx_hermes/cuda_grouped.py's kernels (routing included) against MLX's
    ops for every step size they take, on the same inputs and float32
    router logits: experts with no token, one, and all of them (up to four
    passes of 2 tiles); the steps of a row tile split over 1, 2 (unevenly: 3
    steps) and 8 warps (split_for); down blocks kept to one expert (5
    experts of 160 rows: 10 row tiles each)."""
    from mlx_hermes import cuda_grouped, cuda_qmv

    mx.random.seed(dims + hidden + experts)
    block = _quantized_block(dims, hidden, experts, k, group_size)
    assert cuda_qmv.applies(block, mx.bfloat16)
    # each shape compiles its kernels (seconds each, once per machine): every count for the
    # first shape, two for the others
    counts = (2, 3, 8, 9, 31, 33, cuda_grouped.MAX_TOKENS) if dims == 128 else (3, 33)
    for tokens in counts:
        x = (mx.random.normal((tokens, 1, dims)) * 0.5).astype(mx.bfloat16)
        logits = mx.random.normal((tokens, 1, experts))
        if routing != "random":  # expert 1 first for every token, the last expert never
            logits = logits + 8 * (mx.arange(experts) == 1) - 8 * (mx.arange(experts) == experts - 1)
        indices, weights = _route(logits, k)
        want = (block.switch_mlp(x, indices) * weights[..., None].astype(x.dtype)).sum(-2)
        got = cuda_grouped.moe(x, block.switch_mlp, logits, k)
        assert got.shape == x.shape and got.dtype == mx.bfloat16
        try:
            assert_close(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)),
                         rel=2e-2)
        except AssertionError as e:
            raise AssertionError(f"{tokens} tokens: {e}") from None


@pytest.mark.skipif(not chip.on_cuda(),
                    reason="a CUDA kernel: runs on the GPU machine")
def test_kernel_block_picks_a_path_by_step_size():
    """KernelMoeBlock: one token through cuda_qmv, up to MAX_TOKENS through
    the grouped kernels, more through MLX's ops; each equals the portable
    block on the same input (float32 router, so no ties)."""
    from mlx_hermes import cuda_grouped, cuda_qmv

    mx.random.seed(7)
    block = _quantized_block(128, 256, 8, 2, 64)
    block.gate.set_dtype(mx.float32)
    for tokens in (1, 2, cuda_grouped.MAX_TOKENS, cuda_grouped.MAX_TOKENS + 1):
        x = (mx.random.normal((1, tokens, 128)) * 0.5).astype(mx.bfloat16)
        block.__class__ = SparseMoeBlock
        want = np.array(block(x).astype(mx.float32))
        block.__class__ = cuda_qmv.KernelMoeBlock
        got = block(x)
        assert_close(np.array(got.astype(mx.float32)), want, rel=2e-2)
        # the residual added inside the last kernel, rounded as a bf16 add after it is
        residual = mx.random.normal(x.shape).astype(mx.bfloat16)
        assert mx.array_equal(block.plus(x, residual), residual + got)


@pytest.mark.skipif(not chip.on_cuda(),
                    reason="a CUDA kernel: runs on the GPU machine")
@pytest.mark.parametrize("dims", [4096, 136])
def test_cuda_add_rms_norm_equals_ops(dims):
    """cuda_layer.add_rms_norm: x + a exactly as MLX's bf16 add, and the norm
    as MLX's rms_norm up to the order of its sum of squares; rows of 4,096
    (two loads a thread) and of 17 words (threads with none)."""
    from mlx_hermes import cuda_layer

    mx.random.seed(dims)
    norm = nn.RMSNorm(dims, eps=1e-5)
    norm.weight = (1 + 0.2 * mx.random.normal((dims,))).astype(mx.bfloat16)
    for rows in (1, 5, 64):
        x, a = (mx.random.normal((rows, 1, dims)).astype(mx.bfloat16) for _ in range(2))
        h, n = cuda_layer.add_rms_norm(x, a, norm)
        assert h.shape == n.shape == x.shape and n.dtype == mx.bfloat16
        assert mx.array_equal(h, x + a)
        assert_close(np.array(n.astype(mx.float32)), np.array(norm(x + a).astype(mx.float32)),
                     rel=1e-2)


def test_kernel_decoder_layer_hands_prefill_to_the_portable_layer():
    """A step of more than MAX_TOKENS tokens (a prompt's prefill) runs the
    portable layer itself, with its mask and cache: identical results, on any
    device (the kernels are for decode steps; their test is the next one)."""
    from mlx_lm.models.cache import KVCache

    from mlx_hermes import cuda_grouped, cuda_layer, cuda_qmv
    from mlx_hermes import profile as prof
    from mlx_hermes.model import DecoderLayer, attention_mask

    model = prof.synthetic_model("tiny", bits=4, group_size=32, dtype=mx.bfloat16,
                                 fast_paths=FastPaths.none())
    model.fuse()
    layer = model.layers[0]
    assert cuda_layer.applies(layer, mx.bfloat16) and not cuda_layer.applies(layer, mx.float32)
    x = mx.random.normal((1, cuda_grouped.MAX_TOKENS + 1, model.args.hidden_size))
    x = x.astype(mx.bfloat16)
    caches = KVCache(), KVCache()
    want = layer(x, attention_mask(x, caches[0]), caches[0])
    install(layer.block_sparse_moe, cuda_qmv.KernelMoeBlock)
    install(layer, cuda_layer.KernelDecoderLayer)
    got = layer(x, attention_mask(x, caches[1]), caches[1])
    layer.__class__, layer.block_sparse_moe.__class__ = DecoderLayer, SparseMoeBlock
    assert mx.array_equal(got, want)
    assert all(mx.array_equal(a, b) for a, b in zip(caches[0].state, caches[1].state))


@pytest.mark.skipif(not chip.on_cuda(),
                    reason="a CUDA kernel: runs on the GPU machine")
def test_kernel_decoder_layer_equals_portable_layer():
    """KernelDecoderLayer (residual adds inside kernels) against the portable
    layer on the same input and fresh caches, for a step of one row (the
    one-token kernels), of 7 and 33 (grouped) and of MAX_TOKENS + 1 (the
    portable layer itself: identical); float32 router, so no ties."""
    from mlx_lm.models.cache import KVCache

    from mlx_hermes import cuda_grouped, cuda_layer, cuda_qmv
    from mlx_hermes import profile as prof
    from mlx_hermes.model import DecoderLayer

    model = prof.synthetic_model("tiny", bits=4, group_size=32, dtype=mx.bfloat16,
                                 fast_paths=FastPaths.none())
    float32_routers(model)
    layer = model.layers[0]
    assert cuda_layer.applies(layer, mx.bfloat16)
    mx.random.seed(3)
    for rows in (1, 7, 33, cuda_grouped.MAX_TOKENS + 1):
        x = mx.random.normal((rows, 1, model.args.hidden_size)).astype(mx.bfloat16)
        want = layer(x, None, KVCache())
        install(layer.block_sparse_moe, cuda_qmv.KernelMoeBlock)
        install(layer, cuda_layer.KernelDecoderLayer)
        got = layer(x, None, KVCache())
        layer.__class__, layer.block_sparse_moe.__class__ = DecoderLayer, SparseMoeBlock
        if rows > cuda_grouped.MAX_TOKENS:
            assert mx.array_equal(got, want)
        else:
            assert_close(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)),
                         rel=2e-2)


@pytest.mark.skipif(not chip.on_cuda(),
                    reason="a CUDA kernel: runs on the GPU machine")
@pytest.mark.parametrize("out_dims,in_dims,group_size", [(50, 96, 32), (256, 128, 64),
                                                         (112, 384, 128), (40, 1088, 64)])
def test_cuda_grouped_linear_equals_quantized_matmul(out_dims, in_dims, group_size):
    """cuda_grouped.KernelQuantizedLinear against MLX's quantized_matmul for
    steps of 1 to MAX_TOKENS rows (and one past, where it hands over); a row
    tile's steps split over 1, 2 (a last block half empty) and 8 warps (9
    steps: some warps get none)."""
    from mlx_hermes import cuda_grouped

    mx.random.seed(out_dims)
    layer = nn.QuantizedLinear(in_dims, out_dims, bias=False, group_size=group_size, bits=4)
    layer.set_dtype(mx.bfloat16)
    assert cuda_grouped.linear_applies(layer, mx.bfloat16)
    counts = (1, 5, 33, cuda_grouped.MAX_TOKENS, cuda_grouped.MAX_TOKENS + 1)
    for rows in counts if out_dims == 256 else (5, 33):
        x = (mx.random.normal((1, rows, in_dims)) * 0.5).astype(mx.bfloat16)
        want = np.array(layer(x).astype(mx.float32))
        layer.__class__ = cuda_grouped.KernelQuantizedLinear
        got = layer(x)
        layer.__class__ = nn.QuantizedLinear
        assert got.shape == (1, rows, out_dims) and got.dtype == mx.bfloat16
        try:
            assert_close(np.array(got.astype(mx.float32)), want, rel=2e-2)
            if rows == 33:  # the kernel itself over several tiles of rows
                assert_close(np.array(cuda_grouped.linear(x, layer).astype(mx.float32)), want,
                             rel=2e-2)
        except AssertionError as e:
            raise AssertionError(f"{rows} rows: {e}") from None


@pytest.mark.parametrize("cls", ["FlatQuantizedLinear", "KernelQuantizedLinear"])
@pytest.mark.parametrize("bits", [4, 6])
def test_flattened_steps_equal_quantized_matmul(cls, bits):
    """The CUDA linear layers give MLX's quantized_matmul the steps they
    flatten (from GEMM_MIN_ROWS rows; a kernel layer from past MAX_TOKENS)
    as one 2-D matrix (one GEMM on CUDA); the result keeps x's leading
    shape. Runs on any device (MLX ops only)."""
    from mlx_hermes import cuda_grouped

    layer = nn.QuantizedLinear(128, 96, bias=False, group_size=64, bits=bits)
    first = (cuda_grouped.GEMM_MIN_ROWS if cls == "FlatQuantizedLinear"
             else cuda_grouped.MAX_TOKENS + 1)
    for shape in ((first, 1, 128), (first, 2, 128), (2, first, 2, 128)):
        x = mx.random.normal(shape)
        want = np.array(layer(x))
        layer.__class__ = getattr(cuda_grouped, cls)
        got = layer(x)
        layer.__class__ = nn.QuantizedLinear
        assert got.shape == (*shape[:-1], 96)
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


def test_grouped_launch_keeps_a_block_to_one_expert():
    """The down kernel's warps of a block make the same passes over one
    expert's tokens (their shared-memory sums wait on each other), so a
    block's row tiles never straddle two experts; and a split covers every
    step with at most MAX_SPLIT warps a tile."""
    from mlx_hermes import cuda_grouped

    for per_expert, experts, k in [(256, 8, 14336), (10, 5, 96), (6, 4, 1088), (8, 8, 256),
                                   (4, 4, 1088), (2, 3, 64)]:
        (split, rt), grid, block = cuda_grouped._launch(per_expert * experts, k, per_expert)
        s, rt = split[1], rt[1]
        assert per_expert % rt == 0 and 1 <= s <= cuda_grouped.MAX_SPLIT
        assert block[0] == rt * s * 32 and grid[0] % block[0] == 0
        assert grid[0] // 32 >= per_expert * experts * s


def test_grouped_kernels_compile_two_variants_at_most():
    """A batch of any size up to MAX_TOKENS runs one of two compiled
    variants (passes of 1 or 2 tiles of 8 tokens), so a batch that grows does
    not compile a kernel per size."""
    from mlx_hermes import cuda_grouped

    tiles = {n: cuda_grouped.tiles_for(n) for n in range(1, cuda_grouped.MAX_TOKENS + 1)}
    assert set(tiles.values()) == {1, 2}
    assert [tiles[n] for n in (1, 8, 9, 16, 17, 32, 33, 64)] == [1, 1, 2, 2, 2, 2, 2, 2]


@pytest.mark.skipif(not chip.on_cuda(),
                    reason="a CUDA kernel: runs on the GPU machine")
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (12, 4, 64), (6, 6, 32)])
def test_cuda_batch_attention_equals_masked_sdpa(heads, kv_heads, head_dim):
    """cuda_attention.attend against MLX's attention with the batch cache's
    mask, on the cache's own views (not contiguous), for rows whose padding
    leaves many positions, a few, and one; through KernelAttention too."""
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import BatchKVCache

    from mlx_hermes import cuda_attention
    from mlx_hermes.model import Attention, ModelArgs

    mx.random.seed(heads + head_dim)
    B, S = 5, 70
    padding = [0, 3, 69, 40, 1]  # row 2 sees one position: the new token's
    cache = BatchKVCache(padding)
    shape = (B, kv_heads, S - 1, head_dim)
    cache.update_and_fetch(*(mx.random.normal(shape).astype(mx.bfloat16) for _ in range(2)))
    q = mx.random.normal((B, heads, 1, head_dim)).astype(mx.bfloat16)
    mask = create_attention_mask(mx.zeros((B, 1, 8)), cache)  # as the model makes it
    new = (B, kv_heads, 1, head_dim)
    # views of the cache's 256 positions: not contiguous
    k, v = cache.update_and_fetch(*(mx.random.normal(new).astype(mx.bfloat16) for _ in range(2)))
    assert k.shape[2] == S and cache.keys.shape[2] > S
    want = mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32),
        scale=head_dim**-0.5, mask=mask)
    got = cuda_attention.attend(q, k, v, cache.left_padding)
    assert got.shape == q.shape and got.dtype == mx.bfloat16
    assert_close(np.array(got.astype(mx.float32)), np.array(want), rel=2e-2)

    args = ModelArgs(hidden_size=heads * head_dim, num_attention_heads=heads,
                     num_key_value_heads=kv_heads)
    attention = Attention(args)
    assert cuda_attention.applies(attention, mx.bfloat16)
    portable = np.array(attention.attend(q, k, v, mask, cache).astype(mx.float32))
    install(attention, cuda_attention.KernelAttention)
    assert_close(np.array(attention.attend(q, k, v, mask, cache).astype(mx.float32)), portable,
                 rel=2e-2)
