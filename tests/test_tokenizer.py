"""The checkpoint's tokenizer, with Hermes' BOS, ChatML and EOS rules.

Prompt ids are tested literally: a dependency upgrade that changes them must
fail here, loudly.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

import mlx_hermes
from mlx_hermes.tokenizer import Tokenizer

from .conftest import TOKENIZER

CONVERSATION = [{"role": "system", "content": "You are Hermes."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2+2?"}]
TEXT = ("<|im_start|>system\nYou are Hermes.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
# The ids are those of the checkpoint's tokenizer.model (SentencePiece), cut at added tokens.
IDS = {
    True: [1, 32001, 1587, 13, 1976, 460, 14741, 274, 28723, 32000, 28705, 13, 32001, 2188, 13,
           23809, 736, 32000, 28705, 13, 32001, 13892, 13, 16230, 28808, 32000, 28705, 13, 32001,
           2188, 13, 3195, 349, 28705, 28750, 28806, 28750, 28804, 32000, 28705, 13, 32001, 13892,
           13],
    False: [1, 32001, 6574, 13, 1976, 460, 14741, 274, 28723, 32000, 13, 32001, 1838, 13, 23809,
            736, 32000, 13, 32001, 489, 11143, 13, 16230, 28808, 32000, 13, 32001, 1838, 13, 3195,
            349, 28705, 28750, 28806, 28750, 28804, 32000, 13, 32001, 489, 11143, 13],
}


def with_config(folder: Path, **changes) -> Path:
    """The shared tokenizer files, with tokenizer_config.json changed."""
    shutil.copytree(TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "not-legacy"])
def flagged(request, tmp_path_factory) -> tuple[bool, Tokenizer]:
    folder = with_config(tmp_path_factory.mktemp("tok") / "t", legacy=request.param)
    return request.param, Tokenizer.from_path(folder)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_path(TOKENIZER)


def test_vendored_tokenizer_is_the_real_one():
    digest = hashlib.sha256((TOKENIZER / "tokenizer.model").read_bytes()).hexdigest()
    assert digest == "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def test_the_shared_fixture_is_legacy_and_gives_the_legacy_ids(tokenizer):
    assert tokenizer.legacy
    assert tokenizer.apply_chat_template(CONVERSATION) == IDS[True]


def test_chat_ids_follow_the_legacy_flag_literally(flagged):
    legacy, tokenizer = flagged
    assert tokenizer.apply_chat_template(CONVERSATION) == IDS[legacy]
    assert tokenizer.encode(TEXT) == IDS[legacy]


def test_a_missing_legacy_flag_means_legacy(tmp_path):
    tokenizer = Tokenizer.from_path(with_config(tmp_path / "t", legacy=None))
    assert tokenizer.apply_chat_template(CONVERSATION) == IDS[True]


def test_raw_text_literally(flagged):
    legacy, tokenizer = flagged
    assert tokenizer.encode("Hello") == [1, 22557]
    assert tokenizer.encode(" Hello") == ([1, 28705, 22557] if legacy else [1, 22557])


def test_decoding_a_prompt_gives_the_template_text(flagged):
    _, tokenizer = flagged
    ids = tokenizer.apply_chat_template(CONVERSATION)
    assert tokenizer.decode(ids) == "<s>" + TEXT
    assert tokenizer.decode(ids[1:]) == TEXT
    # special: BOS and the EOS <|im_end|>; <|im_start|> is only an added token here
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT.replace("<|im_end|>", "")
    assert tokenizer.render_chat(CONVERSATION) == TEXT


def test_text_round_trips_and_streams_as_it_decodes(tokenizer):
    """decode(encode(text)) == text, and the streaming detokenizer gives the same
    text token by token (byte-fallback characters, spaces, added tokens)."""
    rng = random.Random(0)
    alphabet = list("ab c\n\t é日🦙<|>.,0") + ["<|im_end|>", "<|im_start|>", " the", "  "]
    texts = ["Hello world", "  two  spaces ", "naïve café 日本語 🦙🦙", "\n", " ", "a<|im_end|> b"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(200)]
    for text in texts:
        ids = tokenizer.encode(text)[1:]
        assert tokenizer.decode(ids) == text, (text, ids)
        streamer = tokenizer.detokenizer
        pieces = []
        for i in ids:
            streamer.add_token(i)
            pieces.append(streamer.last_segment)
            assert "\ufffd" not in pieces[-1], "a partial character was released"
        streamer.finalize()
        assert "".join(pieces) + streamer.last_segment == text


def test_a_broken_byte_sequence_decodes_to_a_replacement_character(tokenizer):
    byte = tokenizer.token_id("<0xF0>")
    assert tokenizer.decode([byte, tokenizer.token_id("▁a")]) == "\ufffd a"


def test_eos_ids_hold_im_end_and_end_of_text(tokenizer):
    assert {32000, 2} <= tokenizer.eos_token_ids


def test_a_reply_is_closed_as_the_template_closes_a_turn(flagged):
    legacy, tokenizer = flagged
    end = [32000, 28705, 13] if legacy else [32000, 13]
    assert tokenizer.turn_end_ids == end
    assert tokenizer.close_reply([5, 6, 32000]) == [5, 6] + end  # ended by <|im_end|>
    assert tokenizer.close_reply([5, 6, 2]) == [5, 6] + end  # by </s>
    assert tokenizer.close_reply([5, 6]) == [5, 6] + end  # by max_tokens
    assert tokenizer.close_reply([5, 6] + end) == [5, 6] + end  # already closed


def test_tokenizer_json_alone_is_used_when_there_is_no_tokenizer_model(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    folder = tmp_path / "json-only"
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    alone = Tokenizer.from_path(folder)
    assert alone.vocab_size == 32002 and {32000, 2} <= alone.eos_token_ids
    ids = alone.apply_chat_template(CONVERSATION)
    assert ids[:2] == [1, 32001] and ids.count(32000) == 4
    assert alone.decode(ids) == "<s>" + TEXT


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(mlx_hermes.HermesError, match="has no tokenizer"):
        Tokenizer.from_path(tmp_path)


def test_load_returns_the_same_tokenizer(hf_checkpoint):
    _, tokenizer = mlx_hermes.load(hf_checkpoint, lazy=True)
    assert tokenizer.vocab_size == 32002
    assert {32000, 2} <= tokenizer.eos_token_ids
    assert tokenizer.apply_chat_template(CONVERSATION) == IDS[True]
