"""`mlx-hermes profile`: figures, byte counts, chip table, fit advice, bad arguments."""

from __future__ import annotations

import json
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_hermes import chip as chips
from mlx_hermes import profile as prof
from mlx_hermes.cli import main

from .test_cli import mlx_hermes_command

# `system_profiler SPDisplaysDataType` on a 38-core M2 Max, abridged
M2_MAX_DISPLAYS = """Graphics/Displays:

    Apple M2 Max:

      Chipset Model: Apple M2 Max
      Type: GPU
      Bus: Built-In
      Total Number of Cores: 38
      Vendor: Apple (0x106b)
      Metal Support: Metal 3
"""


def run(*args):
    return CliRunner().invoke(main, ["profile", *map(str, args)])


@pytest.fixture(scope="module")
def tiny_bf16():
    return prof.synthetic_model("tiny", bits=4, group_size=64, dtype=mx.bfloat16)


def test_bytes_per_token_equals_a_hand_count(tiny_bf16):
    # tiny: hidden 64, expert FFN 128, 3 layers, 4 heads over 2 kv heads (dim 16), 8 experts,
    # top-2, vocab 32002; 4-bit weights, a bf16 scale and bias per 64 inputs.
    def linear(out, inp):
        return out * inp // 2 + 2 * 2 * out * (inp // 64)
    dense = 2 * linear(64, 64) + 2 * linear(32, 64) + linear(8, 64) + 2 * 64 * 2  # + 2 norms
    experts = 8 * (2 * linear(128, 64) + linear(64, 128))
    layer = dense + experts * 2 // 8
    head = linear(32002, 64)
    embedding_row = linear(32002, 64) // 32002
    assert prof.bytes_per_token(tiny_bf16) == 3 * layer + 64 * 2 + head + embedding_row
    assert prof.model_bytes(tiny_bf16) == 3 * (dense + experts) + 64 * 2 + 2 * head


def test_real_shape_at_4_bits_is_about_26_gb():
    # shapes only: the lazy model is never evaluated
    size = prof.quantized_size(prof.HERMES_8X7B, 4)
    assert 26.0e9 < size < 26.6e9  # ~4.5 bits per weight of 46.7B parameters


def test_synthetic_model_routes_over_many_experts(tiny_bf16):
    router_class = type(tiny_bf16.layers[0].block_sparse_moe.gate)
    with prof._ExpertCounter(tiny_bf16) as counter:
        tiny_bf16(mx.array([list(range(100, 164))]))  # a prompt
        tiny_bf16(mx.array([[7]]))  # and a decoded token (CUDA: through the kernels)
    counts = np.array([c.tolist() for c in counter.counts])
    assert counts.shape == (3, 8) and (counts.sum(axis=1) == 65 * 2).all()
    assert (counts > 0).sum() >= 12  # not collapsed onto a few experts
    assert type(tiny_bf16.layers[0].block_sparse_moe.gate) is router_class  # uninstalled


def test_mlx_lm_twin_computes_the_same_logits():
    # groups of 32: at group 64 the tiny model's rows (hidden 64) are one group each,
    # which MLX's CUDA quantized_matmul gets wrong (benchmarks/mlx_cuda_bugs.md)
    model = prof.synthetic_model("tiny", group_size=32, dtype=mx.float32)
    twin = prof.mlx_lm_twin(model, mx.float32)
    tokens = mx.array([[1, 500, 900, 31000, 7]])
    ours, theirs = np.array(model(tokens)), np.array(twin(tokens))
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(ours).max()


def test_json_has_the_figures():
    result = run("--synthetic", "tiny", "--prompt-tokens", 16, "--gen-tokens", 4, "--trials", 2,
                 "--compare-mlx-lm", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in ("prompt_tps", "decode_tps", "ttft_s", "peak_memory_gb", "bytes_per_token",
                "bandwidth_gbs", "peak_bandwidth_gbs", "roofline_fraction", "expert_counts",
                "time_split", "fit", "speedup_vs_mlx_lm", "mlx-lm"):
        assert key in out
    assert out["decode_tps"] > 0 and out["prompt_tps"] > 0
    assert len(out["mlx-hermes"]["decode_tps_trials"]) == 2  # each trial, then mean and spread
    assert len(out["expert_counts"]) == 3 and len(out["expert_counts"][0]) == 8
    assert out["bandwidth_gbs"] == pytest.approx(out["bytes_per_token"] * out["decode_tps"] / 1e9)
    assert out["roofline_fraction"] == pytest.approx(out["bandwidth_gbs"] /
                                                     out["peak_bandwidth_gbs"])
    assert not out["extrapolated"]
    assert "building" in result.stderr  # progress while the model is built
    # then each phase and trial, with the time left once a run has been timed
    for phase in ("warming up mlx-hermes", "warming up mlx-lm", "trial 1/2: mlx-hermes",
                  "trial 2/2: mlx-lm", "counting the experts", "timing attention"):
        assert f"profile: {phase}" in result.stderr
    assert "trial 2/2: mlx-lm (about" in result.stderr and " left)" in result.stderr
    # float32 scales on a CPU read more than a GPU's bf16 ones; both are given
    if mx.default_device() == mx.cpu:
        assert out["bytes_per_token_16bit"] < out["bytes_per_token"]


def test_fewer_layers_extrapolate_to_the_full_model(tiny_bf16):
    result = run("--synthetic", "tiny", "--layers", 2, "--prompt-tokens", 8, "--gen-tokens", 3,
                 "--trials", 1, "--json")
    out = json.loads(result.stdout)
    assert out["extrapolated"] and out["model_layers"] == 2 and out["full_layers"] == 3
    # the CLI's dtype: float32 on the CPU, bf16 on a GPU
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    full = prof.bytes_per_token(prof.synthetic_model("tiny", dtype=dtype))
    assert out["bytes_per_token"] == full
    table = run("--synthetic", "tiny", "--layers", 2, "--prompt-tokens", 8, "--gen-tokens", 3,
                "--trials", 1)
    assert "extrapolated from 2 of 3 layers" in table.stdout


def test_table_output():
    result = run("--synthetic", "tiny", "--prompt-tokens", 8, "--gen-tokens", 3, "--trials", 1)
    assert result.exit_code == 0
    for text in ("decode tok/s", "weights read per token", "of it; roofline decode",
                 "one decode step: attention", "experts chosen per layer", "4-bit g64"):
        assert text in result.stdout


@pytest.mark.parametrize("brand,cores,gbs", [
    ("Apple M1", 8, 68.25), ("Apple M1 Max", 32, 400), ("Apple M2 Ultra", 76, 800),
    ("Apple M3 Pro", 18, 150), ("Apple M3 Max", 30, 300), ("Apple M3 Max", 40, 400),
    ("Apple M4 Pro", 20, 273), ("Apple M4 Max", 32, 410), ("Apple M4 Max", 40, 546),
    ("Apple M3 Max", None, 300),  # variant unknown: the lower figure
])
def test_chip_table(brand, cores, gbs):
    assert chips.mac_bandwidth(brand, cores) == gbs


def test_chip_from_recorded_mac_output():
    chip = chips.parse_mac("Apple M2 Max\n", "34359738368\n", M2_MAX_DISPLAYS)
    assert (chip.name, chip.gpu_cores, chip.memory_bytes) == ("Apple M2 Max", 38, 32 * 2**30)
    assert chip.rated_gbs == chip.peak_gbs == 400


def test_detect_elsewhere_measures_a_ceiling():
    chip = chips.detect()
    assert chip.memory_bytes > 0 and not chip.name.startswith("Apple")
    assert 0.1 < chips.measure_bandwidth(megabytes=32, repeats=2) < 10_000


def test_fit_advice_on_made_up_memory():
    def rows(limit):
        return {a["label"].split(" g")[0] if a["recipe"] in ("uniform", "mixed") else
                a["recipe"]: a for a in prof.fit_advice(limit)}
    big = rows(48 * 2**30)  # a 64 GB Mac's working set
    assert big["uniform 4-bit"]["fits"] and big["uniform 4-bit"]["max_context"] == 32768
    assert big["uniform 5-bit"]["fits"] and big["uniform 5-bit"]["max_context"] == 32768
    assert big["uniform 8-bit"]["fits"] and big["uniform 8-bit"]["max_context"] < 10000
    assert not rows(40 * 2**30)["uniform 8-bit"]["fits"]
    small = rows(12 * 2**30)
    assert not any(a["fits"] for a in small.values())
    tight = rows(28 * 2**30)  # 32 GB Mac, limit raised
    assert tight["uniform 4-bit"]["fits"] and 0 < tight["uniform 4-bit"]["max_context"] < 32768
    default_32gb = rows(21.8e9)  # its default working set: only the small-Mac recipes
    assert [k for k, a in default_32gb.items() if a["fits"]] == ["fit-32gb", "fit-24gb"]


@pytest.mark.parametrize("args,message", [
    ([], "give either --model or --synthetic"),
    (["--synthetic", "tiny", "--model", "x"], "give either --model or --synthetic"),
    (["--model", "x", "--layers", "2"], "--layers applies to --synthetic only"),
    (["--synthetic", "tiny", "--layers", "5"], "--layers must be between 2 and 3"),
    (["--synthetic", "tiny", "--layers", "1"], "--layers must be between 2 and 3"),
    (["--synthetic", "tiny", "--trials", "0"], "--trials >= 1"),
    (["--synthetic", "tiny", "--prompt-tokens", "40000"], "exceeds the context"),
    (["--synthetic", "huge"], "'huge' is not one of"),
    (["--model", "/no/such/folder"], "does not exist"),
    (["--synthetic", "tiny", "--batch", "1,x"], "--batch takes stream counts"),
    (["--synthetic", "tiny", "--batch", "0"], "--batch takes stream counts"),
    (["--synthetic", "tiny", "--batch", "2", "--layers", "2"], "--batch measures the whole"),
    (["--synthetic", "tiny", "--batch", "2", "--gen-tokens", "3"], "--gen-tokens must be at least 4"),
])
def test_bad_arguments(args, message):
    result = run(*args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output


def test_full_build_that_cannot_fit_is_refused(monkeypatch):
    small = chips.Chip("CPU (test)", 16 * 2**30)
    monkeypatch.setattr(chips, "detect", lambda: small)
    result = run("--synthetic", "8x7b")
    assert result.exit_code != 0 and "measure with --layers N" in result.stderr


def test_batch_profile_against_mlx_lm(tiny_model):
    result = run("--model", tiny_model, "--batch", "1,3", "--prompt-tokens", 8, "--gen-tokens", 6,
                 "--trials", 1, "--compare-mlx-lm", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["aggregate_tps"] > 0 and r["mlx_lm"]["aggregate_tps"] > 0
        assert r["per_stream_tps"] == pytest.approx(r["aggregate_tps"] / r["batch"])
        assert r["gbs"] > 0 and r["vs_mlx_lm"] > 0
    table = run("--synthetic", "tiny", "--batch", "2", "--prompt-tokens", 8, "--gen-tokens", 5,
                "--trials", 1)
    assert table.exit_code == 0 and "aggregate tok/s" in table.stdout


def test_expert_bytes_per_step_grow_with_distinct_experts(tiny_bf16):
    from mlx_hermes.batch_profile import bytes_per_step
    from mlx_hermes.profile import bytes_per_token

    model = tiny_bf16
    assert bytes_per_step(model, 1) == pytest.approx(bytes_per_token(model))
    steps = [bytes_per_step(model, n) for n in (1, 2, 8, 64)]
    assert steps == sorted(steps) and steps[-1] < steps[0] * 64


def test_profile_a_model_folder(tiny_model):
    result = run("--model", tiny_model, "--prompt-tokens", 8, "--gen-tokens", 3, "--trials", 1,
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bytes_per_token"] > 0


def test_profile_process_smoke():
    done = subprocess.run(mlx_hermes_command() + ["profile", "--synthetic", "tiny",
                                                  "--prompt-tokens", "8", "--gen-tokens", "3",
                                                  "--trials", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "decode tok/s" in done.stdout


def test_synthetic_models_stored_as_each_recipe_read_fewer_bytes():
    """profile --synthetic 8x7b --recipe R: the model is built as R stores it, so bytes
    per token (and the roofline) follow the recipe's size."""
    from mlx_hermes.formats import recipe

    per_token = {}
    for name in ("uniform", "fit-32gb", "fit-24gb"):
        model = prof.synthetic_model("8x7b", 2, dtype=mx.bfloat16, fast_paths=None,
                                     stored_as=recipe(name))
        experts = model.layers[0].block_sparse_moe.switch_mlp
        assert experts.gate_proj.bits == recipe(name).experts.bits
        assert model.layers[0].self_attn.v_proj.bits == recipe(name).v_proj.bits
        per_token[name] = prof.bytes_per_token(model, full_layers=32)
        del model
    assert per_token["uniform"] > per_token["fit-32gb"] > per_token["fit-24gb"]
    assert 7.0e9 < per_token["uniform"] < 7.4e9  # the ~7.2 GB a 4-bit token reads


def test_recipe_options_apply_to_synthetic_models_only():
    result = run("--model", "x", "--recipe", "fit-32gb")
    assert result.exit_code != 0 and "apply to --synthetic only" in result.output


def test_local_cost_only_from_the_users_figures():
    cost = prof.local_cost(decode_tps=50.0, watts=90.0, kwh_price=0.30, cloud_price=0.6)
    # a million tokens at 50 tok/s: 20,000 s at 90 W = 0.5 kWh
    assert cost["kwh_per_million_tokens"] == pytest.approx(0.5)
    assert cost["cost_per_million_tokens"] == pytest.approx(0.15)
    table = run("--synthetic", "tiny", "--prompt-tokens", 8, "--gen-tokens", 3, "--trials", 1,
                "--watts", 90, "--kwh-price", 0.3, "--cloud-price", 0.6)
    assert table.exit_code == 0, table.output
    assert "electricity:" in table.stdout and "the cloud price given: 0.6" in table.stdout
    plain = run("--synthetic", "tiny", "--prompt-tokens", 8, "--gen-tokens", 3, "--trials", 1)
    assert "electricity" not in plain.stdout  # no invented power figures
    assert "needs both --watts and --kwh-price" in run("--synthetic", "tiny", "--watts", 90).output
