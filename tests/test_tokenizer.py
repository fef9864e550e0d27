"""The checkpoint's own tokenizer, with Hermes' BOS, ChatML and EOS rules."""

from __future__ import annotations

import hashlib

import pytest

import mlx_hermes
from mlx_hermes.tokenizer import Tokenizer

from .conftest import TOKENIZER


@pytest.fixture(scope="module")
def tokenizer(hf_checkpoint) -> Tokenizer:
    return Tokenizer.from_path(hf_checkpoint, extra_eos_token_ids=32000)


def test_vendored_tokenizer_is_the_real_one():
    digest = hashlib.sha256((TOKENIZER / "tokenizer.model").read_bytes()).hexdigest()
    assert digest == "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def test_encode_adds_exactly_one_bos(tokenizer):
    ids = tokenizer.encode("Hello world")
    assert ids[0] == 1 and ids.count(1) == 1
    assert tokenizer.decode(ids[1:]) == "Hello world"


def test_chat_template_is_one_bos_then_chatml(tokenizer):
    hf = tokenizer.hf_tokenizer
    messages = [{"role": "system", "content": "You are Hermes."},
                {"role": "user", "content": "Hi there"}]
    ids = tokenizer.apply_chat_template(messages)
    text = ("<|im_start|>system\nYou are Hermes.<|im_end|>\n"
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert ids == [1] + hf.encode(text, add_special_tokens=False)
    assert ids.count(1) == 1
    assert ids[1] == 32001 and ids.count(32000) == 2
    assert tokenizer.decode(ids) == "<s>" + text
    no_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert tokenizer.decode(no_prompt).endswith("Hi there<|im_end|>\n")


def test_eos_ids_hold_im_end_and_end_of_text(tokenizer):
    assert {32000, 2} <= tokenizer.eos_token_ids


def test_load_returns_the_same_tokenizer(hf_checkpoint):
    _, tokenizer = mlx_hermes.load(hf_checkpoint, lazy=True)
    assert tokenizer.vocab_size == 32002
    assert {32000, 2} <= tokenizer.eos_token_ids
