"""Continuous batching (mlx_hermes/batching.py): in float32 on the CPU every
sequence of a batch gets exactly the tokens it gets alone."""

from __future__ import annotations

import pytest

import mlx_hermes
from mlx_hermes import HermesError, batch_generate, stream_batch_generate
from mlx_hermes.batching import Batcher, Request, kv_token_bytes
from mlx_hermes.generate import stream_generate
from mlx_hermes.sampling import SamplingParams

PROMPTS = ["Hello there", "Write a poem about the sea, the sky and everything in between",
           "x", "One two three four five six seven eight nine ten eleven twelve", "Why?",
           "The quick brown fox jumps", "<|im_start|>user\nHi<|im_end|>\n"]


def solo(model, tokenizer, prompt, **options) -> list[int]:
    return [c.token for c in stream_generate(model, tokenizer, prompt, **options)]


def run(batcher: Batcher, joining: dict = None, cancel: dict = None) -> dict:
    """Step until done; `joining[step]` = [(key, Request)] added at that step,
    `cancel[step]` = keys cancelled then. Returns each key's tokens and last chunk."""
    tokens, last, step = {}, {}, 0
    while batcher.busy or (joining and any(s >= step for s in joining)):
        for key, request in (joining or {}).get(step, []):
            batcher.add(key, request)
        for key in (cancel or {}).get(step, []):
            assert batcher.cancel(key) is not None
        for key, chunk in batcher.step():
            tokens.setdefault(key, []).append(chunk.token)
            last[key] = chunk
        step += 1
    return {"tokens": tokens, "last": last}


@pytest.mark.parametrize("name", ["gqa", "odd", "mqa"])
def test_batched_greedy_equals_solo_token_for_token(loaded, name):
    model, tokenizer = loaded(name)
    expected = [mlx_hermes.generate(model, tokenizer, p, max_tokens=24) for p in PROMPTS]
    assert batch_generate(model, tokenizer, PROMPTS, max_tokens=24) == expected


def test_a_batch_past_the_sort_threshold_still_equals_solo(loaded):
    # 20 sequences x top-2 = 40 (token, expert) pairs a step: the sorted dispatch (moe.py)
    model, tokenizer = loaded("odd")
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 3)][:20]
    expected = [solo(model, tokenizer, p, max_tokens=12) for p in prompts]
    got = {}
    for i, chunk in stream_batch_generate(model, tokenizer, prompts, max_tokens=12, max_batch=20):
        got.setdefault(i, []).append(chunk.token)
    assert [got[i] for i in range(len(prompts))] == expected


def test_sequences_join_mid_flight_and_leave_early(loaded):
    model, tokenizer = loaded("odd")
    ids = [tokenizer.encode(p) for p in PROMPTS]
    # stop strings, different max_tokens, a cancelled neighbour, joiners at different steps
    options = [dict(max_tokens=30), dict(max_tokens=5), dict(max_tokens=30, stop=["e"]),
               dict(max_tokens=17), dict(max_tokens=30), dict(max_tokens=9),
               dict(max_tokens=30)]
    expected = {i: solo(model, tokenizer, ids[i], **o) for i, o in enumerate(options)}
    batcher = Batcher(model, tokenizer, max_batch=4, prefill_step_size=4,
                      busy_prefill_step_size=2)
    joining = {0: [(0, Request(ids[0], **options[0])), (1, Request(ids[1], **options[1]))],
               3: [(2, Request(ids[2], **options[2])), (3, Request(ids[3], **options[3]))],
               7: [(4, Request(ids[4], **options[4])), (5, Request(ids[5], **options[5])),
                   (6, Request(ids[6], **options[6])), ("doomed", Request(ids[0], max_tokens=50))]}
    result = run(batcher, joining, cancel={20: ["doomed"]})
    batcher.close()
    for i in expected:
        assert result["tokens"][i] == expected[i], f"sequence {i}"
    assert result["last"][2].finish_reason == "stop" and result["last"][1].finish_reason == "length"
    assert "doomed" not in result["last"] or result["last"]["doomed"].finish_reason is None
    assert batcher.running == 0 and batcher.waiting == 0


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(loaded):
    model, tokenizer = loaded("gqa")
    per = [{"seed": 10 + i, "temp": 0.9 if i % 2 else 0.6, "top_p": 0.9} for i in range(5)]
    expected = [mlx_hermes.generate(model, tokenizer, p, max_tokens=16, **o)
                for p, o in zip(PROMPTS, per)]
    assert batch_generate(model, tokenizer, PROMPTS[:5], max_tokens=16, per_prompt=per) == expected
    # and unseeded requests do not share draws
    texts = batch_generate(model, tokenizer, ["Hello"] * 4, max_tokens=16, temp=1.0)
    assert len(set(texts)) > 1


def test_per_prompt_options_and_token_id_prompts(loaded):
    model, tokenizer = loaded("gqa")
    ids = tokenizer.user_turn("Hi")
    per = [{"max_tokens": 3}, {"max_tokens": 7, "stop": ["\n"]}, {}]
    chunks = list(stream_batch_generate(model, tokenizer, [ids, "Hello", PROMPTS[1]],
                                        max_tokens=5, per_prompt=per))
    finals = {i: c for i, c in chunks if c.finish_reason}
    assert finals[0].stats["generated_tokens"] == 3
    assert finals[2].stats["generated_tokens"] == 5
    assert finals[0].stats["prompt_tokens"] == len(ids)
    assert {"ttft_s", "decode_tps", "peak_memory_gb"} <= set(finals[1].stats)


@pytest.mark.parametrize("call,message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(kv_bits=4), "kv_bits"),
    (dict(bogus=1), "unknown option 'bogus'"),
    (dict(per_prompt=[{}]), "per_prompt has 1 entries for 2 prompts"),
    (dict(max_batch=0), "max_batch"),
    (dict(temp=-1), "temp"),
    (dict(max_tokens=10**6), "context"),
])
def test_bad_options_are_clear_errors(loaded, call, message):
    model, tokenizer = loaded("gqa")
    with pytest.raises(HermesError, match=message):
        batch_generate(model, tokenizer, ["a", "b"], **call)


def test_an_empty_prompt_is_refused(loaded):
    model, tokenizer = loaded("gqa")
    with pytest.raises(HermesError, match="empty"):
        batch_generate(model, tokenizer, ["a", ""])


def test_memory_admission_waits_and_refuses(loaded):
    model, tokenizer = loaded("gqa")
    ids = [tokenizer.encode(p) for p in PROMPTS[:3]]
    # room for one sequence of (prompt + 20 tokens + a 256-token step) at a time, not two
    one = 2 * (len(max(ids, key=len)) + 20 + 256) * kv_token_bytes(model)
    batcher = Batcher(model, tokenizer, max_batch=8, kv_budget_bytes=int(one * 1.5))
    with pytest.raises(HermesError, match="KV cache"):
        batcher.add("huge", Request(ids[0], max_tokens=5000))
    for i, x in enumerate(ids):
        batcher.add(i, Request(x, max_tokens=20))
    most = 0
    tokens = {}
    while batcher.busy:
        for key, chunk in batcher.step():
            tokens.setdefault(key, []).append(chunk.token)
        most = max(most, batcher.running)
        assert batcher.running + batcher.waiting <= 3
    batcher.close()
    assert most == 1  # they ran one after another
    assert [tokens[i] for i in range(3)] == [solo(model, tokenizer, x, max_tokens=20) for x in ids]


def test_a_model_split_over_machines_is_refused(loaded):
    model, tokenizer = loaded("gqa")
    model.coordination = object()
    try:
        with pytest.raises(HermesError, match="one machine"):
            Batcher(model, tokenizer)
    finally:
        del model.coordination


def test_greedy_requests_share_one_sampler():
    assert SamplingParams().sampler() is SamplingParams(seed=3).sampler()


def test_logprobs_are_the_models_before_sampling_and_equal_alone_and_batched(loaded):
    import mlx.core as mx

    model, tokenizer = loaded("gqa")
    ids = tokenizer.encode("Hello there")
    solo_chunks = list(stream_generate(model, tokenizer, ids, max_tokens=6, logprobs=3))
    first = solo_chunks[0].logprobs[0]
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    expected = (logits - mx.logsumexp(logits)).tolist()
    assert first.token == solo_chunks[0].token
    assert abs(first.logprob - expected[first.token]) < 1e-4
    assert [t for t, _ in first.top] == sorted(range(len(expected)), key=lambda t: -expected[t])[:3]
    for c in solo_chunks:  # greedy: the chosen token is the most likely one
        (lp,) = c.logprobs
        assert lp.top[0][0] == c.token and abs(lp.top[0][1] - lp.logprob) < 1e-6
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    batched = [c for i, c in stream_batch_generate(model, tokenizer, [ids, PROMPTS[1]],
                                                   max_tokens=6, logprobs=3) if i == 0]
    for a, b in zip(solo_chunks, batched):
        assert a.logprobs[0].token == b.logprobs[0].token
        assert abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 1e-4
    assert all(c.logprobs is None for c in stream_generate(model, tokenizer, ids, max_tokens=2))
