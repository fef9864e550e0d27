"""Will it fit: weights + KV cache against a Mac's GPU working set, on recorded values."""

from __future__ import annotations

import pytest

from mlx_hermes import HermesError, ModelArgs
from mlx_hermes.memory import check_fits, fit_problem, kv_cache_bytes, metal_working_set

HERMES = ModelArgs()  # the real 8x7B shape

# Metal's recommendedMaxWorkingSetSize as reported on real machines:
# M2 Max 32 GB, "recommendedMaxWorkingSetSize = 21845.34 MB" (ollama/ollama#434);
# M1 16 GB, 10922.67 MB (abetlen/llama-cpp-python#687);
# M5 Max 128 GB, 107.52 GiB stock (antirez/ds4#893).
M2_MAX_32GB = int(21845.34 * 2**20)
M1_16GB = int(10922.67 * 2**20)
M5_MAX_128GB = int(107.52 * 2**30)

Q4_WEIGHTS = 26_400_000_000  # 4-bit group-64 Hermes 2 Mixtral, as converted


def test_kv_cache_size_of_the_real_model():
    # 32 layers x 8 kv heads x 128 dims x (K and V) x 2 bytes = 128 KiB per token
    assert kv_cache_bytes(HERMES, 1) == 131072
    assert kv_cache_bytes(HERMES, 32768) == 4 * 2**30
    assert kv_cache_bytes(HERMES, 32768, kv_bits=4) < kv_cache_bytes(HERMES, 32768) / 3


def test_4bit_model_does_not_fit_a_32gb_mac_by_default():
    message = fit_problem(Q4_WEIGHTS, kv_cache_bytes(HERMES, 32768), M2_MAX_32GB, 32768)
    assert "22.9 GB" in message and "smaller quantization" in message
    assert "sudo sysctl iogpu.wired_limit_mb=" in message and "--kv-bits 4" in message
    assert fit_problem(Q4_WEIGHTS, kv_cache_bytes(HERMES, 32768), M1_16GB, 32768)


def test_4bit_model_fits_a_128gb_mac_with_full_context():
    assert fit_problem(Q4_WEIGHTS, kv_cache_bytes(HERMES, 32768), M5_MAX_128GB, 32768) is None


def test_check_fits_reads_the_folder(tiny_model):
    check_fits(tiny_model, 1000, limit=M1_16GB)  # a few MB: fits
    with pytest.raises(HermesError, match="may use only 0.0 GB"):
        check_fits(tiny_model, 1000, limit=1000)
    if metal_working_set() is None:  # CPU or CUDA: nothing to check
        check_fits(tiny_model, 10**9)
