"""`mlx-hermes perplexity`: the figure against one computed from transformers' logits."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

import mlx_hermes
from mlx_hermes import perplexity as ppl
from mlx_hermes.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog. " * 6 +
        "Mixtral routes each token to two of its eight experts. " * 4)


def reference_perplexity(torch_model, windows: list[list[int]]) -> float:
    """An independent computation: transformers' logits, torch's cross entropy."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = torch_model(ids).logits[0, :-1].double()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total, count = total + loss.item(), count + len(w) - 1
    return math.exp(total / count)


def test_perplexity_matches_transformers(hf_checkpoint, torch_models, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    result = CliRunner().invoke(main, ["perplexity", "-m", str(hf_checkpoint), "--data",
                                       str(data), "--context", "32", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    model, tokenizer = mlx_hermes.load(hf_checkpoint)
    windows = ppl.windows(tokenizer, [TEXT], 32)
    assert out["windows"] == len(windows) > 2 and out["tokens"] == sum(len(w) - 1 for w in windows)
    expected = reference_perplexity(torch_models("gqa"), windows)
    assert out["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert 0 < out["perplexity_se"] < out["perplexity"]


def test_compare_gives_kl_and_agreement(hf_checkpoint, mlx_lm_quantized, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXT.split(". ")) + "\n")
    same = CliRunner().invoke(main, ["perplexity", "-m", str(hf_checkpoint), "--data", str(data),
                                     "--compare", str(hf_checkpoint), "--json"])
    out = json.loads(same.stdout)
    assert abs(out["kl_divergence"]) < 1e-6 and out["top1_agreement"] == 1.0
    quantized = CliRunner().invoke(main, ["perplexity", "-m", str(mlx_lm_quantized(4, 32)),
                                          "--data", str(data), "--compare", str(hf_checkpoint)])
    assert quantized.exit_code == 0, quantized.output
    assert "against the reference: KL" in quantized.stdout


def test_bad_data_is_one_line(hf_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    result = CliRunner().invoke(main, ["perplexity", "-m", str(hf_checkpoint), "--data", str(bad)])
    assert result.exit_code == 1 and "bad.jsonl, line 2: not a JSON object" in result.stderr
    short = tmp_path / "short.txt"
    short.write_text("")
    result = CliRunner().invoke(main, ["perplexity", "-m", str(hf_checkpoint), "--data",
                                       str(short)])
    assert result.exit_code == 1 and "too short" in result.stderr


def test_a_reference_folder_is_streamed_layer_by_layer_with_the_same_figures(hf_checkpoints,
                                                                             mlx_lm_quantized):
    model, tokenizer = mlx_hermes.load(mlx_lm_quantized(4, 32))
    whole = ppl.perplexity(model, tokenizer, [TEXT], 32,
                           reference=mlx_hermes.load(hf_checkpoints["gqa"])[0])
    seen = []
    streamed = ppl.perplexity(model, tokenizer, [TEXT], 32, reference=hf_checkpoints["gqa"],
                              progress=lambda done, total: seen.append((done, total)))
    assert streamed["kl_divergence"] == pytest.approx(whole["kl_divergence"], rel=1e-4, abs=1e-7)
    assert streamed["top1_agreement"] == whole["top1_agreement"]
    assert streamed["perplexity"] == whole["perplexity"]
    layers = mlx_hermes.load(hf_checkpoints["gqa"])[0].args.num_hidden_layers
    assert seen[:layers] == [(i + 1, layers) for i in range(layers)]  # the layers, one by one


def test_streaming_holds_one_layer_at_a_time(hf_checkpoints):
    reference = ppl.StreamedReference(hf_checkpoints["odd"])
    held = []
    inner = reference.model.model
    reference.run([[1, 5, 6, 7]], progress=lambda done, total: held.append(
        sum(layer is not None for layer in inner.layers)))
    assert held == [2, 1, 0]  # after each of the 3 layers, that layer is gone
