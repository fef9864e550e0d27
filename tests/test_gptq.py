"""GPTQ's pieces against MLX's own quantization: the packing, the identity case
(where GPTQ must be round-to-nearest exactly) and the error it is for."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_hermes.formats import QUANT_BITS
from mlx_hermes_convert import gptq


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_packing_is_mlx_own(bits):
    mx.random.seed(bits)
    w = mx.random.normal((6, 256))
    q, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    codes = mx.round((w.reshape(6, 4, 64) - biases[..., None]) / scales[..., None])
    codes = mx.clip(codes, 0, 2**bits - 1).reshape(6, 256)
    assert np.array_equal(np.array(gptq.pack(codes, bits)), np.array(q))


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 128)])
def test_identity_hessian_is_round_to_nearest(bits, group_size):
    """Inputs that never co-vary give no column another's error to carry."""
    mx.random.seed(1)
    w = mx.random.normal((40, 256))
    got = gptq.gptq(w, gptq.inverse_cholesky(mx.eye(256)), bits, group_size, mx.float32)
    want = mx.quantize(w, group_size=group_size, bits=bits)
    for a, b in zip(got, want):
        assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_moves_the_outputs_less_than_rounding_to_nearest(bits):
    mx.random.seed(2)
    x = mx.random.normal((2048, 24)) @ mx.random.normal((24, 128))  # inputs that co-vary
    x = x + 0.1 * mx.random.normal(x.shape)
    w = mx.random.normal((64, 128))
    hessian = gptq.Hessian()
    hessian.add(x)
    learned = gptq.gptq(w, gptq.inverse_cholesky(hessian.sum), bits, 32, mx.float32)
    nearest = mx.quantize(w, group_size=32, bits=bits)

    def output_error(q):
        w_hat = mx.dequantize(*q, group_size=32, bits=bits)
        return float(mx.linalg.norm(x @ (w - w_hat).T))

    assert output_error(learned) < 0.7 * output_error(nearest)


def test_hessian_sums_over_calls():
    x = mx.random.normal((10, 8))
    h = gptq.Hessian()
    h.add(x[:4])
    h.add(x[4:][None])  # any leading shape: rows are the inputs
    assert h.rows == 10
    assert np.allclose(np.array(h.sum), np.array(x.T @ x), atol=1e-4)


@pytest.mark.parametrize("n", [300, 1537])  # one block; uneven halves over three levels
def test_the_factorizations_by_halves_equal_lapack(n, monkeypatch):
    monkeypatch.setattr(gptq, "BLOCK", 256)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2 * n, n)).astype(np.float32)
    h = x.T @ x + n * np.eye(n, dtype=np.float32)
    lower = gptq.cholesky(h)
    assert np.allclose(lower, np.linalg.cholesky(h), atol=1e-4 * np.abs(lower).max())
    assert np.array_equal(lower, np.tril(lower))
    inverse = gptq.inverse_lower(lower)
    assert np.allclose(inverse @ lower, np.eye(n), atol=1e-4)


def test_inverse_factor_is_the_upper_cholesky_of_the_damped_inverse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 600)).astype(np.float32)
    h = (x.T @ x).astype(np.float64)
    h[5, :] = h[:, 5] = 0  # an input that is always 0
    upper = np.array(gptq.inverse_cholesky(mx.array(h.astype(np.float32))), dtype=np.float64)
    assert np.array_equal(upper, np.triu(upper))
    h[5, 5] = 1
    h[np.diag_indices_from(h)] += gptq.DAMPING * np.mean(np.diagonal(h))
    want = np.linalg.inv(h)
    assert np.abs(upper.T @ upper - want).max() < 1e-4 * np.abs(want).max()
