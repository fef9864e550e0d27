"""Tensor parallelism: ranks started with `mlx.launch --backend ring` on loopback
compute what one process computes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_hermes
from mlx_hermes import HermesError
from mlx_hermes.distributed import check_split
from mlx_hermes.model import ModelArgs

from . import tp_worker
from .conftest import write_hf_checkpoint
from .test_cli import mlx_hermes_command

# mlx's launcher beside this Python, or on PATH (an install with --target keeps it elsewhere)
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or \
    shutil.which("mlx.launch") or "mlx.launch"
WORKER = Path(__file__).parent / "tp_worker.py"
# 12 query heads (not a power of two) over 4 kv heads, 6 experts: splits over 2 and 4 ranks
SHAPE = dict(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=12,
             num_key_value_heads=4, head_dim=16, num_local_experts=6)


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("tp") / "tp", seed=5, **SHAPE)


@pytest.fixture(scope="module")
def tp_quantized(tp_model, tmp_path_factory) -> Path:
    from mlx_hermes_convert import convert  # ours: mlx-lm's ignores head_dim != hidden / heads

    out = tmp_path_factory.mktemp("tpq") / "q4"
    convert(str(tp_model), str(out), bits=4, group_size=32, dtype="float32")
    return out


@pytest.fixture(scope="module")
def reference(tp_model) -> dict:
    return tp_worker.compute(*mlx_hermes.load(tp_model))


def launch(n: int, *args: str, env: dict | None = None, timeout: int = 240,
           stdin: str | None = None) -> subprocess.CompletedProcess:
    extra = [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
    return subprocess.run([LAUNCH, "-n", str(n), "--backend", "ring", *extra,
                           "--", *args], capture_output=True, text=True, timeout=timeout,
                          input=stdin, env={**os.environ, **(env or {})})


def exit_codes(done: subprocess.CompletedProcess) -> dict[int, int]:
    """mlx.launch exits 0 whatever the ranks do; it prints their codes."""
    found = re.findall(r"Node with rank (\d+) exited with code (-?\d+)", done.stdout + done.stderr)
    return {int(r): int(c) for r, c in found}


def run_worker(tmp_path: Path, n: int, model: Path, mode: str) -> list[dict]:
    done = launch(n, sys.executable, str(WORKER), str(model), str(tmp_path), mode)
    assert not exit_codes(done), done.stdout + done.stderr
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(n)]


def assert_same(ranks: list[dict], ref: dict) -> None:
    for r, got in enumerate(ranks):
        for key in ("prefill", "decode", "long"):
            if key in got:
                scale = np.abs(ref[key]).max()
                assert np.abs(got[key] - ref[key]).max() <= 1e-5 * scale, (r, key)
        assert got["greedy"].tolist() == ref["greedy"].tolist(), r
        assert got["sampled"].tolist() == ref["sampled"].tolist(), r


def split_and_replicated(model) -> tuple[int, int]:
    split = replicated = 0
    for name, p in tree_flatten(model.parameters()):
        if re.search(r"self_attn\.(qkv|[qkvo])_proj|switch_mlp", name):
            split += p.nbytes
        else:
            replicated += p.nbytes
    return split, replicated


def test_two_ranks_match_one_process_past_4k_tokens(tp_model, reference, tmp_path):
    ranks = run_worker(tmp_path, 2, tp_model, "check")
    assert "long" in ranks[0]
    assert_same(ranks, reference)

    model, _ = mlx_hermes.load(tp_model)
    split, replicated = split_and_replicated(model)
    layer = max(sum(p.nbytes for _, p in tree_flatten(lay.parameters())) for lay in model.layers)
    for got in ranks:
        assert int(got["param_bytes"]) == replicated + split // 2
        # loading holds this rank's part plus at most about one layer in full
        assert int(got["peak_bytes"]) <= 1.1 * (int(got["param_bytes"]) + layer)


def test_four_ranks_match_one_process(tp_model, reference, tmp_path):
    assert_same(run_worker(tmp_path, 4, tp_model, "short"), reference)


@pytest.mark.parametrize("quantized", [False, True])
def test_sums_evaluated_on_the_host_match_one_process(tp_model, tp_quantized, reference, tmp_path,
                                                      quantized):
    """The CUDA way of summing over ranks (distributed.host_all_sum: each
    collective evaluated where it stands), taken here on purpose, for MLX's
    float and quantized sharded linears."""
    model = tp_quantized if quantized else tp_model
    ref = tp_worker.compute(*mlx_hermes.load(model), long_prompt=False) if quantized else reference
    ranks = run_worker(tmp_path, 2, model, "host")
    assert all(r["host_summed"].tolist() == [True, True] for r in ranks)
    assert_same(ranks, ref)


def test_quantized_experts_split_with_their_scales(tp_quantized, tmp_path):
    ref = tp_worker.compute(*mlx_hermes.load(tp_quantized), long_prompt=False)
    assert_same(run_worker(tmp_path, 2, tp_quantized, "short"), ref)


def test_a_split_block_adds_the_residual_after_the_ranks_sum():
    """On CUDA a decoder layer adds its residual inside the MoE block's last
    kernel (KernelMoeBlock.plus); a block split over ranks must sum the ranks'
    parts first, or each rank would add the residual once. Its `plus` wins
    over the kernel block's whatever is installed first."""
    import mlx.core as mx

    from mlx_hermes.cuda_qmv import KernelMoeBlock
    from mlx_hermes.distributed import ShardedMoeBlock
    from mlx_hermes.moe import SparseMoeBlock
    from mlx_hermes.specialize import install

    kernel_then_split = install(install(SparseMoeBlock(16, 32, 4, 2), KernelMoeBlock),
                                ShardedMoeBlock)
    assert isinstance(kernel_then_split, KernelMoeBlock)
    assert type(kernel_then_split).plus is ShardedMoeBlock.plus
    split = install(SparseMoeBlock(16, 32, 4, 2), ShardedMoeBlock)
    split.group = mx.distributed.init()  # one rank here
    x, residual = mx.random.normal((2, 3, 16)), mx.random.normal((2, 3, 16))
    assert mx.array_equal(split.plus(x, residual), residual + split(x))


def test_a_split_that_does_not_divide_is_a_clear_error():
    args = ModelArgs(**SHAPE, vocab_size=32002)
    with pytest.raises(HermesError, match="4 key/value heads .* do not divide by 3"):
        check_split(args, 3)
    with pytest.raises(HermesError, match="48 inputs of o_proj are not a whole number of "
                                          "quantization groups of 32"):
        check_split(args, 4, {"o_proj": 32, "down_proj": 32})
    check_split(args, 2, {"o_proj": 32, "down_proj": 32})


def test_a_killed_rank_stops_the_others(tp_model, tmp_path):
    start = time.time()
    done = launch(2, sys.executable, str(WORKER), str(tp_model), str(tmp_path), "die")
    assert time.time() - start < 120
    out = done.stdout + done.stderr
    assert "rank 1 dies now" in out
    # the launcher's signal, or the backend's lost connection, whichever reaches rank 0 first
    assert re.search(r"error: rank 0/2: (stopped by the launcher: another rank failed|lost the "
                     r"connection to another rank)", out), out
    assert "Traceback" not in out
    assert exit_codes(done) == {0: 1, 1: -9}


def test_a_stuck_rank_is_caught_by_the_timeout(tp_model, tmp_path):
    done = launch(2, sys.executable, str(WORKER), str(tp_model), str(tmp_path), "hang",
                  env={"MLX_HERMES_RANK_TIMEOUT": "4"})
    out = done.stdout + done.stderr
    assert "error: rank 0/2: no progress for 4 s: another rank is gone or stuck" in out
    assert "error: rank 1/2: stopped by the launcher" in out
    assert exit_codes(done) == {0: 1, 1: 1}


def test_generate_chat_and_profile_under_mlx_launch(tp_model):
    model, tokenizer = mlx_hermes.load(tp_model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    expected = mlx_hermes.generate(model, tokenizer, ids, max_tokens=10, temp=0.0)
    hermes = mlx_hermes_command()

    done = launch(2, *hermes, "generate", "-m", str(tp_model), "-p", "Hello there", "--temp", "0",
                  "--max-tokens", "10")
    assert not exit_codes(done), done.stderr
    assert done.stdout == expected + "\n"  # rank 0 alone prints
    assert done.stderr.count("generation:") == 1

    done = launch(2, *hermes, "chat", "-m", str(tp_model), "--temp", "0", "--max-tokens", "10",
                  stdin="Hello there\n/save x\n/exit\n")
    assert not exit_codes(done), done.stderr
    assert done.stdout.count(expected) == 1
    assert done.stderr.count("/save is not available when the model is split") == 1

    done = launch(2, *hermes, "profile", "-m", str(tp_model), "--prompt-tokens", "16",
                  "--gen-tokens", "4", "--trials", "1", "--json")
    assert not exit_codes(done), done.stderr
    ranks = json.loads(done.stdout)["ranks"]
    split, replicated = split_and_replicated(model)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["weights_gb"] * 1e9 == pytest.approx(replicated + split / 2, rel=1e-5)
        assert r["comm_ms_per_token"] > 0 and r["decode_tps"] > 0
