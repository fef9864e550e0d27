"""ChatSession: turns reuse the KV cache, survive interrupts, save and resume."""

from __future__ import annotations


import numpy as np
import pytest

import mlx_hermes
from mlx_hermes import ChatSession, HermesError, stream_generate
from mlx_hermes.chat import ContextFull

from .conftest import copy_model
from .test_generate import forcing


def recorder(store: list):
    """A logits processor that keeps the logits of each step."""
    def processor(_, logits):
        store.append(np.array(logits[0]))
        return logits
    return processor


def reply(session: ChatSession, text: str):
    chunks = list(session.send(text))
    return [c.token for c in chunks], chunks[-1].stats


def assert_session_consistent(session: ChatSession):
    assert all(c.offset == len(session.cached) for c in session.cache)


def test_second_turn_reuses_the_cache_and_matches_recomputation(loaded):
    model, tokenizer = loaded()
    session = ChatSession(model, tokenizer, system="You are Hermes.", max_tokens=12)
    reply(session, "Hi there")
    cached_before = len(session.cached)
    new_turn = session.prompt_ids("What is MLX?")
    ours_logits = []
    session.options["logits_processors"] = [recorder(ours_logits)]
    tokens, stats = reply(session, "What is MLX?")

    # Only the new turn (and the tail of the last reply not yet fed) is prefilled.
    assert stats["prompt_tokens"] == len(new_turn) - cached_before
    # ChatML's framing of a turn is 9 tokens; then the closing of the last reply
    # (<|im_end|> ▁ \n) and its last sampled token, which was never fed.
    closing = len(tokenizer.turn_end_ids) + 1
    assert stats["prompt_tokens"] <= len(tokenizer.encode("What is MLX?")) - 1 + 9 + closing
    assert cached_before > stats["prompt_tokens"]

    # The same conversation from scratch, without any cache.
    ref_logits = []
    ref = [c.token for c in stream_generate(model, tokenizer, new_turn, max_tokens=12,
                                            logits_processors=[recorder(ref_logits)])]
    assert tokens == ref
    first_ours, first_ref = ours_logits[0], ref_logits[0]
    assert np.abs(first_ours - first_ref).max() <= 1e-4 * np.abs(first_ref).max()
    assert_session_consistent(session)


def test_the_next_turn_has_exactly_the_templates_ids(loaded):
    """ChatSession's ids for a conversation are apply_chat_template's, literally
    (the reply's sampled tokens here are the template's own)."""
    from .test_tokenizer import CONVERSATION, IDS

    model, tokenizer = loaded()
    session = ChatSession(model, tokenizer, system="You are Hermes.", max_tokens=8,
                          logits_processors=[forcing([16230, 28808, 32000])])
    tokens, stats = reply(session, "Hi there")
    assert tokens == [16230, 28808, 32000] and session.messages[-1]["content"] == "Hello!"
    assert session.prompt_ids("What is 2+2?") == IDS[True]
    assert tokenizer.apply_chat_template(CONVERSATION) == IDS[True]

    # After a finished reply, a Ctrl-C'd one leaves /stats at the finished one's figures.
    session.options["logits_processors"] = []
    stream = session.send("Tell me more")
    next(stream)
    stream.close()
    assert session.last_stats == stats


def test_messages_and_tokens_follow_chatml(loaded):
    model, tokenizer = loaded()
    session = ChatSession(model, tokenizer, max_tokens=5)
    reply(session, "Hello")
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    text = tokenizer.decode(session.history)
    assert text.startswith("<s><|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert text.endswith("<|im_end|>\n")
    assert session.history.count(1) == 1


def test_save_and_load_resume_exactly(loaded, tmp_path):
    model, tokenizer = loaded()
    session = ChatSession(model, tokenizer, system="Be brief.", max_tokens=8)
    reply(session, "One")
    reply(session, "Two")
    path = tmp_path / "chat.safetensors"
    session.save(path)
    assert not list(tmp_path.glob(".*tmp*"))
    resumed = ChatSession.load(path, model, tokenizer, max_tokens=8)
    assert resumed.messages == session.messages and resumed.history == session.history
    a, stats_a = reply(session, "Three")
    b, stats_b = reply(resumed, "Three")
    assert a == b and stats_a["prompt_tokens"] == stats_b["prompt_tokens"]


def test_load_rejects_other_files_and_models(loaded, tmp_path, hf_checkpoints):
    model, tokenizer = loaded()
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_text("nope")
    with pytest.raises(HermesError, match="cannot read"):
        ChatSession.load(bogus, model, tokenizer)
    session = ChatSession(model, tokenizer, max_tokens=3)
    reply(session, "Hi")
    session.save(tmp_path / "c.safetensors")
    other, other_tok = loaded("odd")
    with pytest.raises(HermesError, match="different model"):
        ChatSession.load(tmp_path / "c.safetensors", other, other_tok)


def test_interrupted_reply_keeps_the_session_consistent(loaded):
    model, tokenizer = loaded()
    session = ChatSession(model, tokenizer, max_tokens=30)
    stream = session.send("Tell me a story")
    partial = [next(stream).token for _ in range(4)]
    stream.close()  # as the CLI does on Ctrl-C
    assert_session_consistent(session)
    assert session.messages[-1]["role"] == "assistant"
    closing = len(tokenizer.turn_end_ids)
    assert session.history[-closing - 4 : -closing] == partial
    assert session.last_stats is None  # no reply has finished yet

    # A KeyboardInterrupt raised inside the model's step, mid-decode.
    calls = {"n": 0}

    def interrupt(_, logits):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return logits

    session.options["logits_processors"] = [interrupt]
    with pytest.raises(KeyboardInterrupt):
        list(session.send("Go on"))
    assert_session_consistent(session)
    session.options["logits_processors"] = []

    # The next turn equals recomputing the conversation from scratch.
    target = session.prompt_ids("And then?")
    tokens, _ = reply(session, "And then?")
    ref = [c.token for c in stream_generate(model, tokenizer, target, max_tokens=30)]
    assert tokens == ref


def test_system_prompt_reset_and_dropping_turns(loaded):
    model, tokenizer = loaded()
    session = ChatSession(model, tokenizer, max_tokens=4)
    reply(session, "First")
    reply(session, "Second")
    session.set_system("You are terse.")
    assert session.messages[0] == {"role": "system", "content": "You are terse."}
    assert tokenizer.decode(session.history).startswith("<s><|im_start|>system\nYou are terse.")
    target = session.prompt_ids("Third")
    tokens, _ = reply(session, "Third")
    assert tokens == [c.token for c in stream_generate(model, tokenizer, target, max_tokens=4)]

    assert session.drop_oldest_turn()
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["Second", "Third"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "You are terse."}]
    reply(session, "Again")
    assert_session_consistent(session)


def test_full_context_raises_context_full(hf_checkpoint, tmp_path):
    small = copy_model(hf_checkpoint, tmp_path / "small", max_position_embeddings=64)
    model, tokenizer = mlx_hermes.load(small)
    session = ChatSession(model, tokenizer, max_tokens=20)
    reply(session, "Hello")
    with pytest.raises(ContextFull):
        list(session.send("This is a rather long message " * 2))
    assert session.drop_oldest_turn()
    reply(session, "This is a rather long message " * 2)


def test_empty_message(loaded):
    model, tokenizer = loaded()
    with pytest.raises(HermesError, match="empty"):
        list(ChatSession(model, tokenizer).send("  "))
