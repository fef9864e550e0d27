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


def test_the_recipe_for_each_mac_size():
    """`convert --fit`: the largest recipe whose weights, a 4k context and the margin fit
    the Mac's default working set (recorded for 16, 32 and 128 GB, macOS's rule otherwise)."""
    from mlx_hermes.memory import mac_working_set, recipe_for_mac

    expected = {24: "fit-24gb", 32: "fit-32gb", 48: "uniform 5-bit g64",
                64: "uniform 6-bit g64", 96: "uniform 8-bit g64", 128: "uniform 8-bit g64",
                192: "uniform 8-bit g64"}
    for gb, label in expected.items():
        row, why = recipe_for_mac(gb)
        assert row["label"].startswith(label) and row["max_context"] >= 4096, (gb, row)
        assert f"a {gb} GB Mac's GPU may use" in why
    assert mac_working_set(16) == (10.9, "recorded on an M1")
    assert mac_working_set(32)[0] == 21.8 and mac_working_set(24) == (16.0, "macOS's rule")
    with pytest.raises(HermesError, match="no recipe fits a 16 GB Mac.*two Macs"):
        recipe_for_mac(16)


def test_small_mac_recipes_keep_their_size_bounds():
    from mlx_hermes.formats import recipe
    from mlx_hermes.profile import HERMES_8X7B, recipe_size

    assert recipe_size(HERMES_8X7B, recipe("fit-32gb")) <= 19.5e9  # 32 GB Mac, 8k context
    assert recipe_size(HERMES_8X7B, recipe("fit-24gb")) <= 14.0e9  # 24 GB Mac, 4k context
    assert 26.0e9 < recipe_size(HERMES_8X7B, recipe("uniform", 4)) < 26.6e9
