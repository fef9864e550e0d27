"""`mlx-hermes convert`: correct, loadable by mlx-lm, atomic, and strict about input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import mlx_hermes
import mlx_hermes_convert
from mlx_hermes import HermesError
from mlx_hermes.cli import main
from mlx_hermes_convert import converter, gptq, writer

from .conftest import SHAPES, copy_model, edit_weights, write_hf_checkpoint
from .test_cli import mlx_hermes_command
from .test_quantized import mlx_lm_logits

PROMPT = "The quick brown fox jumps over the lazy dog, then"


def logits(path, tokens, **kw):
    model, _ = mlx_hermes.load(path, **kw)
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tokens(hf_checkpoint):
    _, tokenizer = mlx_hermes.load(hf_checkpoint, lazy=True)
    return tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory):
    """Our conversions of the fp32 one-file checkpoint, float32 scales."""
    root = tmp_path_factory.mktemp("conv")
    cache = {}

    def get(bits, recipe):
        if (bits, recipe) not in cache:
            out = root / f"q{bits}{recipe}"
            mlx_hermes_convert.convert(str(hf_checkpoint), str(out), bits=bits, group_size=32,
                                       recipe=recipe, dtype="float32")
            cache[bits, recipe] = out
        return cache[bits, recipe]

    return get


# Random tiny weights are wide, so 4-bit noise compounds more than in the real model.
TOLERANCE = {2: 1.4, 3: 0.9, 4: 0.6, 5: 0.35, 8: 0.05}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("recipe", ["uniform", "mixed"])
def test_converted_logits_stay_close_to_the_source(hf_checkpoint, converted, tokens, bits,
                                                   recipe):
    source = logits(hf_checkpoint, tokens)
    out = converted(bits, recipe)
    ours = logits(out, tokens)
    assert rel(ours, source) < TOLERANCE[bits]
    # mlx-lm loads our folder unchanged and computes the same thing
    assert np.abs(mlx_lm_logits(out, tokens) - ours).max() <= 1e-4 * np.abs(ours).max()


def test_uniform_equals_mlx_lm_own_conversion(converted, mlx_lm_quantized, tokens):
    ours = logits(converted(4, "uniform"), tokens)
    theirs = logits(mlx_lm_quantized(4, 32), tokens)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_mixed_recipe_spends_bits_where_it_pays(converted, hf_checkpoint, tokens):
    config = json.loads((converted(4, "mixed") / "config.json").read_text())
    q = config["quantization"]
    assert q["model.layers.0.block_sparse_moe.gate"]["bits"] == 8
    assert q["model.layers.0.self_attn.v_proj"]["bits"] == 6
    assert q["lm_head"]["bits"] == q["model.embed_tokens"]["bits"] == 6
    assert q["model.layers.0.block_sparse_moe.switch_mlp.up_proj"]["bits"] == 4
    assert q["model.layers.0.self_attn.q_proj"]["bits"] == 4
    assert config["quantization_config"] == q
    source = logits(hf_checkpoint, tokens)
    assert rel(logits(converted(4, "mixed"), tokens), source) < \
        rel(logits(converted(4, "uniform"), tokens), source)


def test_sharded_bf16_source_and_sharded_output(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 2_500_000)
    monkeypatch.setattr(converter, "split_into_shards",
                        lambda specs: writer.split_into_shards(specs, 2_500_000))
    out = tmp_path / "out"
    # groups of 32: at 64 the tiny model's rows (hidden 64) are one group each, which
    # MLX's CUDA quantized_matmul gets wrong (benchmarks/mlx_cuda_bugs.md)
    summary = mlx_hermes_convert.convert(str(tiny_model), str(out), bits=4, group_size=32)
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 2 and files == summary["files"]
    assert all(p.stat().st_size <= 3_000_000 for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json",
                 "README.md", "config.json"):
        assert (out / name).exists()
    card = (out / "README.md").read_text()
    assert "bits per weight" in card and " MB |" in card and "0.00 GB" not in card
    assert 4.9 < summary["bits_per_weight"] < 5.1  # 4 bits + bf16 scale and bias per 32
    model, tokenizer = mlx_hermes.load(out)
    ids = tokenizer.encode(PROMPT)
    ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))  # bf16 where a GPU loads it
    assert rel(ours, logits(tiny_model, ids)) < 0.6


def test_sharded_checkpoint_converts_like_the_one_file_one(converted, tmp_path,
                                                                       tokens):
    sharded = write_hf_checkpoint(tmp_path / "sharded", shards=3, **SHAPES["gqa"])
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    out = tmp_path / "out"
    mlx_hermes_convert.convert(str(sharded), str(out), bits=4, group_size=32, dtype="float32")
    assert np.array_equal(logits(out, tokens), logits(converted(4, "uniform"), tokens))


def test_cli_conversion_with_progress_and_report(hf_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(hf_checkpoint), "--mlx-path",
                                       str(out), "--bits", "8", "--group-size", "32",
                                       "--report"])
    assert result.exit_code == 0, result.output
    assert "converting" in result.stderr and "100%" in result.stderr
    assert "bits per weight" in result.stdout and "KL(source || converted)" in result.stdout
    for kind in ("experts", "attention", "router", "embeddings"):
        assert kind in result.stdout


def test_report_prefers_more_bits(hf_checkpoint, converted):
    four = mlx_hermes_convert.quality_report(hf_checkpoint, converted(4, "uniform"))
    eight = mlx_hermes_convert.quality_report(hf_checkpoint, converted(8, "uniform"))
    assert eight["kl_mean"] < four["kl_mean"] / 4
    assert eight["relative_error"]["experts"] < four["relative_error"]["experts"] / 4
    assert four["top1_agreement"] <= eight["top1_agreement"]


def convert_error(*args) -> str:
    result = CliRunner().invoke(main, ["convert", *map(str, args)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "converting" not in result.stderr  # no progress bar for work never started
    return errors[0]


def test_the_output_may_not_overlap_the_source(hf_checkpoint, tmp_path):
    src = copy_model(hf_checkpoint, tmp_path / "src")
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src / "sub", tmp_path):
        message = convert_error("--hf-path", src, "--mlx-path", out, "--force")
        assert "overlap" in message
    assert "overlap" in convert_error("--hf-path", tmp_path / "src" / ".." / "src",
                                      "--mlx-path", src, "--force")
    assert sorted(p.name for p in src.iterdir()) == before


def test_outputs_that_cannot_be_made_are_one_line_errors(hf_checkpoint, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "file.txt is a file, not a folder" in convert_error(
        "--hf-path", hf_checkpoint, "--mlx-path", a_file / "out")
    assert "cannot create /proc/nope/out" in convert_error(
        "--hf-path", hf_checkpoint, "--mlx-path", "/proc/nope/out")


def test_sigterm_cleans_up_like_ctrl_c(hf_checkpoint, tmp_path, monkeypatch):
    import os
    import signal

    real = converter.convert_item
    calls = {"n": 0}

    def terminated(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill -TERM` from outside would
        yield from real(*args)

    monkeypatch.setattr(converter, "convert_item", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(main, ["convert", "--hf-path", str(hf_checkpoint),
                                           "--mlx-path", str(tmp_path / "out"),
                                           "--group-size", "32"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143 and "terminated" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_dead_conversions_are_removed(hf_checkpoint, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / f".out.converting-{dead.pid}"
    leftover.mkdir()
    (leftover / "model-00001-of-00009.safetensors").write_bytes(b"half")
    mlx_hermes_convert.convert(str(hf_checkpoint), str(tmp_path / "out"), group_size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture
def broken(hf_checkpoint, tmp_path):
    return copy_model(hf_checkpoint, tmp_path / "src")


def test_bad_sources(broken, tmp_path):
    out = tmp_path / "out"
    config = json.loads((broken / "config.json").read_text())

    (broken / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "'llama'" in convert_error("--hf-path", broken, "--mlx-path", out)
    (broken / "config.json").write_text("{")
    assert "config.json" in convert_error("--hf-path", broken, "--mlx-path", out)
    (broken / "config.json").write_text(json.dumps(config))

    assert "group size 64 does not divide" in convert_error(
        "--hf-path", broken, "--mlx-path", out, "--group-size", "64")
    assert "'7' is not one of" in convert_error("--hf-path", broken, "--mlx-path", out,
                                                 "--bits", "7")

    edit_weights(broken, lambda w: w.pop("model.layers.1.block_sparse_moe.experts.2.w2.weight"))
    assert "missing tensor model.layers.1.block_sparse_moe.experts.2.w2.weight" in \
        convert_error("--hf-path", broken, "--mlx-path", out, "--group-size", "32")

    def reshape(w):
        w["model.layers.1.block_sparse_moe.experts.2.w2.weight"] = mx.zeros((64, 32))
    edit_weights(broken, reshape)
    assert "experts.2.w2.weight has shape [64, 32], expected [64, 96]" in \
        convert_error("--hf-path", broken, "--mlx-path", out, "--group-size", "32")

    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-1000])
    assert "truncated" in convert_error("--hf-path", broken, "--mlx-path", out)
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    assert "not a valid safetensors file" in convert_error("--hf-path", broken, "--mlx-path", out)
    assert not out.exists()


def test_existing_output_and_already_quantized_source(hf_checkpoint, converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert "already exists; pass --force" in convert_error("--hf-path", hf_checkpoint,
                                                           "--mlx-path", out)
    assert "already quantized" in convert_error("--hf-path", converted(4, "uniform"),
                                                "--mlx-path", tmp_path / "again")


def test_interruption_leaves_nothing_behind(hf_checkpoint, tmp_path, monkeypatch):
    real = converter.convert_item
    calls = {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        yield from real(*args)

    monkeypatch.setattr(converter, "convert_item", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        mlx_hermes_convert.convert(str(hf_checkpoint), str(out), group_size=32)
    assert list(tmp_path.iterdir()) == []

    # With --force, the old output survives an interrupted replacement.
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        mlx_hermes_convert.convert(str(hf_checkpoint), str(out), group_size=32, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "keep.txt").read_text() == "old"


def test_force_replaces_the_output(hf_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    mlx_hermes_convert.convert(str(hf_checkpoint), str(out), group_size=32, force=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_convert_process_smoke(hf_checkpoint, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(mlx_hermes_command() + ["convert", "--hf-path", str(hf_checkpoint),
                                                  "--mlx-path", str(out), "--group-size", "32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").exists()


def test_runtime_does_not_import_the_converter():
    import sys

    code = "import sys, mlx_hermes.cli, mlx_hermes; print('mlx_hermes_convert' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False"
    with pytest.raises(HermesError):
        mlx_hermes_convert.convert("/no/such/source", "/tmp/never")


# ---- recipes for smaller Macs ----------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """Dimensions that groups of 128 divide, and 5 layers: the fit-24gb recipe widens
    down_proj in the first and last 2 only."""
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=5,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    return write_hf_checkpoint(tmp_path_factory.mktemp("wide") / "wide", seed=3, **shape)


@pytest.mark.parametrize("recipe,experts_bits", [("fit-32gb", 3), ("fit-24gb", 2)])
def test_small_mac_recipes_load_in_both_runtimes(wide_checkpoint, tmp_path, recipe, experts_bits):
    out = tmp_path / recipe
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(wide_checkpoint),
                                       "--mlx-path", str(out), "--recipe", recipe,
                                       "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert f"bits per weight ({recipe} (experts {experts_bits}-bit g128))" in result.stdout
    q = json.loads((out / "config.json").read_text())["quantization"]
    layer = "model.layers.{}.block_sparse_moe"
    assert q[layer.format(2) + ".switch_mlp.gate_proj"] == {"group_size": 128, "bits": experts_bits}
    assert q[layer.format(0) + ".gate"]["bits"] == 8  # the router
    assert q["model.layers.0.self_attn.v_proj"]["bits"] == 6
    widened = 3 if recipe == "fit-24gb" else experts_bits
    assert q[layer.format(0) + ".switch_mlp.down_proj"]["bits"] == widened
    assert q[layer.format(4) + ".switch_mlp.down_proj"]["bits"] == widened
    assert q[layer.format(2) + ".switch_mlp.down_proj"]["bits"] == experts_bits
    _, tokenizer = mlx_hermes.load(wide_checkpoint, lazy=True)
    tokens = tokenizer.encode(PROMPT)
    ours = logits(out, tokens)
    assert np.isfinite(ours).all()
    # mlx-lm loads the folder unchanged and computes the same logits
    assert np.abs(mlx_lm_logits(out, tokens) - ours).max() <= 1e-4 * np.abs(ours).max()
    # fewer bits cost more than 4-bit does
    four = tmp_path / "four"
    mlx_hermes_convert.convert(str(wide_checkpoint), str(four), bits=4, dtype="float32")
    source = logits(wide_checkpoint, tokens)
    assert rel(logits(four, tokens), source) < rel(ours, source)


def test_recipes_refuse_what_they_would_ignore(wide_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert "sets its own bits" in convert_error("--hf-path", wide_checkpoint, "--mlx-path", out,
                                                "--recipe", "fit-32gb", "--bits", "4")
    assert "--fit picks the recipe" in convert_error("--hf-path", wide_checkpoint,
                                                     "--mlx-path", out, "--fit", "32",
                                                     "--recipe", "mixed")
    message = convert_error("--hf-path", wide_checkpoint, "--mlx-path", out, "--fit", "16")
    assert "no recipe fits a 16 GB Mac" in message and "two Macs" in message
    assert not out.exists()


def test_fit_names_its_choice(wide_checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(wide_checkpoint),
                                       "--mlx-path", str(tmp_path / "out"), "--fit", "24"])
    assert result.exit_code == 0, result.output
    assert "--fit 24: fit-24gb (experts 2-bit g128): a 24 GB Mac's GPU may use 16.0 GB" in \
        result.stderr


# ---- learned rounding (GPTQ) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory):
    """Real text the tokenizer knows: a module of Python's standard library."""
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text(Path(json.__file__).read_text())
    return path


def test_gptq_conversion_loads_everywhere_and_beats_rounding_to_nearest(
        wide_checkpoint, calibration_text, tmp_path):
    from mlx_hermes import perplexity

    out = tmp_path / "gptq"
    result = CliRunner().invoke(main, ["convert", "--hf-path", str(wide_checkpoint),
                                       "--mlx-path", str(out), "--recipe", "fit-24gb",
                                       "--dtype", "float32", "--calibration",
                                       str(calibration_text), "--calibration-tokens", "1024"])
    assert result.exit_code == 0, result.output
    assert "converting (GPTQ)" in result.stderr and "100%" in result.stderr
    assert "rounded by GPTQ, calibrated on 1024 tokens of" in result.stdout
    assert "| rounding | GPTQ, calibrated on 1024 tokens" in (out / "README.md").read_text()
    nearest = tmp_path / "nearest"
    mlx_hermes_convert.convert(str(wide_checkpoint), str(nearest), recipe="fit-24gb",
                               dtype="float32")
    # the same layout, widths and sizes as rounding to nearest: only the codes differ
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((nearest / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == json.loads((nearest / "model.safetensors.index.json").read_text())

    _, tokenizer = mlx_hermes.load(wide_checkpoint, lazy=True)
    tokens = tokenizer.encode(PROMPT)
    ours = logits(out, tokens)
    assert np.abs(mlx_lm_logits(out, tokens) - ours).max() <= 1e-4 * np.abs(ours).max()
    # on the text it was calibrated on, the model strays less from the source
    reference, _ = mlx_hermes.load(wide_checkpoint)
    texts = [calibration_text.read_text()]
    kl = {}
    for name, path in (("gptq", out), ("nearest", nearest)):
        model, _ = mlx_hermes.load(path)
        kl[name] = perplexity.perplexity(model, tokenizer, texts, 256, reference,
                                         max_windows=4)["kl_divergence"]
    assert kl["gptq"] < 0.75 * kl["nearest"], kl


def test_gptq_bad_inputs(wide_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert "--calibration /no/such.txt: no such file" in convert_error(
        "--hf-path", wide_checkpoint, "--mlx-path", out, "--calibration", "/no/such.txt")
    assert "--calibration-tokens needs --calibration" in convert_error(
        "--hf-path", wide_checkpoint, "--mlx-path", out, "--calibration-tokens", "64")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "too short" in convert_error("--hf-path", wide_checkpoint, "--mlx-path", out,
                                        "--calibration", empty)
    assert not out.exists()


def test_interrupted_gptq_leaves_nothing(wide_checkpoint, calibration_text, tmp_path,
                                         monkeypatch):
    real = gptq.gptq
    calls = {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the first layer
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gptq, "gptq", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        mlx_hermes_convert.convert(str(wide_checkpoint), str(out), recipe="fit-24gb",
                                   calibration=calibration_text, calibration_tokens=256)
    assert list(tmp_path.iterdir()) == []


def test_gptq_progress_moves_within_layers_and_never_back(wide_checkpoint, calibration_text,
                                                          tmp_path):
    calls = {"nearest": [], "gptq": []}
    for name, calibration in (("nearest", None), ("gptq", calibration_text)):
        mlx_hermes_convert.convert(str(wide_checkpoint), str(tmp_path / name), recipe="fit-24gb",
                                   calibration=calibration, calibration_tokens=256,
                                   progress=lambda done, total, c=calls[name]: c.append(
                                       (done, total)))
    nearest, learned = calls["nearest"], calls["gptq"]
    assert learned[-1] == nearest[-1] and learned[-1][0] == learned[-1][1]
    assert [d for d, _ in learned] == sorted(d for d, _ in learned)
    # within each layer's GPTQ, each expert reports as it finishes (5 layers, 4 experts)
    within = {d for d, _ in learned} - {d for d, _ in nearest}
    assert len(within) >= 5 * 4
