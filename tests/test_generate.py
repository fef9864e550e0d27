"""Streaming generation: text, sampling, stopping, context and statistics."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_hermes
from mlx_hermes import HermesError, chip, generate, stream_generate
from mlx_hermes.generate import StopStrings
from mlx_hermes.sampling import SamplingParams


def forcing(tokens: list[int]):
    """A logits processor that makes the model emit exactly `tokens`."""
    step = {"i": 0}

    def processor(_, logits):
        i = min(step["i"], len(tokens) - 1)
        step["i"] += 1
        mask = mx.full(logits.shape, -1e9, dtype=logits.dtype)
        mask[..., tokens[i]] = 0
        return logits + mask

    return processor


@pytest.mark.parametrize("text", [
    "Hello, world! naïve café",
    "日本語 🦙 ꙮ 𝔘𝔫𝔦 Ελληνικά",  # 🦙, ꙮ and 𝔘𝔫𝔦 are byte-fallback pieces
])
def test_streamed_text_equals_full_decode(loaded, text):
    model, tokenizer = loaded()
    target = tokenizer.encode(text)[1:]
    pieces = [tokenizer.piece(i) for i in target]
    assert any(p.startswith("<0x") for p in pieces) == ("🦙" in text)
    chunks = list(stream_generate(model, tokenizer, "x", max_tokens=len(target),
                                  logits_processors=[forcing(target)]))
    assert [c.token for c in chunks] == target
    assert "".join(c.text for c in chunks) == tokenizer.decode(target) == text
    assert all("\ufffd" not in c.text for c in chunks)


def test_random_text_streams_like_its_decode(loaded):
    model, tokenizer = loaded()
    rng = np.random.default_rng(0)
    alphabet = list("abc XYZ,.!?'\n\t") + list("éßñ日本語Ωж") + ["🦙", "ꙮ", "𝔘", "🫠"]
    for _ in range(5):
        text = "".join(rng.choice(alphabet, size=30))
        target = tokenizer.encode(text)[1:]
        chunks = list(stream_generate(model, tokenizer, "x", max_tokens=len(target),
                                      logits_processors=[forcing(target)]))
        assert "".join(c.text for c in chunks) == tokenizer.decode(target)


def test_greedy_and_seeded_sampling_are_deterministic(loaded):
    model, tokenizer = loaded()
    assert generate(model, tokenizer, "Once upon", max_tokens=20) == \
        generate(model, tokenizer, "Once upon", max_tokens=20)

    def tokens(seed):
        return [c.token for c in stream_generate(model, tokenizer, "Once upon", max_tokens=20,
                                                 temp=1.0, seed=seed)]
    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_greedy_matches_argmax_of_the_model(loaded):
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = loaded()
    ids = tokenizer.encode("The sea")
    cache = make_prompt_cache(model)
    logits, expected = model(mx.array([ids]), cache=cache), []
    for _ in range(10):
        expected.append(mx.argmax(logits[0, -1]).item())
        logits = model(mx.array([[expected[-1]]]), cache=cache)
    got = [c.token for c in stream_generate(model, tokenizer, ids, max_tokens=10,
                                            prefill_step_size=2)]  # prefill in chunks
    assert got == expected


def test_stop_strings_are_trimmed(loaded):
    model, tokenizer = loaded()
    full = generate(model, tokenizer, "Tell me", max_tokens=40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    chunks = list(stream_generate(model, tokenizer, "Tell me", max_tokens=40, stop=[stop]))
    out = "".join(c.text for c in chunks)
    assert out == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stats is not None


def test_stop_string_matcher_holds_back_partial_matches():
    stops = StopStrings(["<END>"])
    assert stops.feed("abc<E") == ("abc", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("D>tail") == ("", True)
    stops = StopStrings(["<END>"])
    assert stops.feed("x<") == ("x", False)
    assert stops.flush("y") == "<y"


@pytest.mark.parametrize("eos", [32000, 2])
def test_generation_stops_at_end_of_turn_tokens(loaded, eos):
    model, tokenizer = loaded()
    forced = tokenizer.encode("Fine, thanks.")[1:] + [eos, 100, 101]
    chunks = list(stream_generate(model, tokenizer, "x", max_tokens=50,
                                  logits_processors=[forcing(forced)]))
    assert chunks[-1].token == eos and chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == "Fine, thanks."


def test_max_tokens_and_stats(loaded):
    model, tokenizer = loaded()
    chunks = list(stream_generate(model, tokenizer, "Hello", max_tokens=7))
    assert len(chunks) == 7 and chunks[-1].finish_reason == "length"
    assert all(c.stats is None for c in chunks[:-1])
    stats = chunks[-1].stats
    assert set(stats) == {"prompt_tokens", "cached_tokens", "prompt_tps", "ttft_s",
                          "generated_tokens", "decode_tps", "decode_s", "peak_memory_gb"}
    assert stats["prompt_tokens"] == len(tokenizer.encode("Hello"))
    assert stats["generated_tokens"] == 7
    assert stats["prompt_tps"] > 0 and stats["decode_tps"] > 0 and stats["peak_memory_gb"] > 0


def test_sampling_filters_shape_the_distribution():
    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))

    def draws(n=300, **options):
        sampler = SamplingParams(seed=0, **options).sampler()
        return {sampler(logprobs).item() for _ in range(n)}

    assert draws(temp=1.0) == {0, 1, 2, 3}
    assert draws(temp=1.0, top_k=2) == {0, 1}
    assert draws(temp=1.0, top_p=0.7) <= {0, 1}
    assert draws(temp=1.0, min_p=0.5) == {0, 1}  # 0.15 < 0.5 * 0.5
    assert draws(temp=0.0) == {0}


def test_a_seed_belongs_to_its_request(loaded):
    """A seeded request repeats exactly, and leaves MLX's global generator
    alone: later unseeded requests do not repeat each other."""
    model, tokenizer = loaded()

    def tokens(**options):
        return [c.token for c in stream_generate(model, tokenizer, "Once upon", max_tokens=20,
                                                 temp=1.0, **options)]
    mx.random.seed(3)
    seeded = tokens(seed=7)
    global_state = mx.random.state[0].tolist()
    unseeded = [tokens(), tokens()]
    assert seeded == tokens(seed=7) and unseeded[0] != unseeded[1]
    assert mx.random.state[0].tolist() == global_state  # never drawn from

    sampling = SamplingParams(temp=1.0, seed=7)
    assert [c.token for c in stream_generate(model, tokenizer, "Once upon", max_tokens=20,
                                             sampling=sampling)] == seeded


def test_every_sampling_option_is_checked():
    for bad, message in [({"temp": -1}, "temp"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
                         ({"min_p": 1}, "min_p"), ({"repetition_penalty": 0}, "repetition"),
                         ({"presence_penalty": 3}, "presence"),
                         ({"frequency_penalty": -3}, "frequency")]:
        with pytest.raises(HermesError, match=message):
            SamplingParams(**bad)


def test_repetition_penalty_scales_the_logits_of_recent_tokens():
    """mlx-lm's rule: a recent token's logit is divided by the penalty if
    positive, multiplied if negative; other tokens keep theirs."""
    (penalty,) = SamplingParams(repetition_penalty=2.0, repetition_context_size=3) \
        .logits_processors()
    logits = mx.array([[4.0, -4.0, 1.0, 3.0, -1.0]])
    out = penalty(mx.array([3, 0, 1, 0]), logits)  # the last 3: 0, 1, 0
    assert out.tolist() == [[2.0, -8.0, 1.0, 3.0, -1.0]]


def test_repetition_penalty_discourages_repeats(loaded):
    model, tokenizer = loaded()
    prompt = tokenizer.encode("a b a b a b a b")
    penalised = [c.token for c in stream_generate(model, tokenizer, prompt, max_tokens=30,
                                                  repetition_penalty=100.0,
                                                  repetition_context_size=64)]
    # Under a penalty this large no token of the window comes back, prompt included.
    assert len(set(penalised)) == len(penalised) == 30
    assert not set(penalised) & set(prompt)


@pytest.mark.skipif(chip.on_cuda(),
                    reason="refused on CUDA (cache.check_kv_bits): MLX's CUDA build gets the "
                    "quantized KV cache's attention wrong or lacks it (benchmarks/mlx_cuda_bugs.md)")
def test_quantized_kv_cache_follows_the_float_one(loaded):
    model, tokenizer = loaded("mqa")  # head dim 32
    from mlx_hermes.cache import make_cache

    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog")
    float_logits = model(mx.array([ids]), cache=make_cache(model))
    q8 = make_cache(model, kv_bits=8)
    model(mx.array([ids[:-1]]), cache=q8)
    q8_logits = model(mx.array([ids[-1:]]), cache=q8)
    a, b = np.array(float_logits[0, -1]), np.array(q8_logits[0, -1])
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    text = generate(model, tokenizer, ids, max_tokens=8, kv_bits=4)
    assert isinstance(text, str)


def test_bad_inputs(loaded):
    model, tokenizer = loaded()
    with pytest.raises(HermesError, match="empty"):
        generate(model, tokenizer, "")
    with pytest.raises(HermesError, match="max_tokens"):
        generate(model, tokenizer, "hi", max_tokens=0)
    with pytest.raises(HermesError, match="context of 32768"):
        generate(model, tokenizer, [1] * 32000, max_tokens=1000)
    with pytest.raises(HermesError, match="top_p"):
        generate(model, tokenizer, "hi", top_p=0)
    with pytest.raises(HermesError, match="kv_bits"):
        generate(model, tokenizer, "hi", kv_bits=3)


def test_prefill_reports_progress(loaded):
    model, tokenizer = loaded()
    seen = []
    generate(model, tokenizer, list(range(1, 41)), max_tokens=1, prefill_step_size=16,
             progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 40) and seen[-1][0] >= 32 and all(t == 40 for _, t in seen)


def test_public_api():
    for name in ("load", "generate", "stream_generate", "ChatSession", "Chunk"):
        assert hasattr(mlx_hermes, name)
