"""The checkpoint's own tokenizer (transformers), with the few rules Hermes needs.

Tokenization itself is never re-implemented: Llama-style tokenizers differ in
how they treat text after an added token, and only the checkpoint's files
know which behaviour is right for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Union

import copy

from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer, StreamingDetokenizer, TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

from .errors import HermesError, first_line

# Hermes 2's prompt format; used only when a checkpoint ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Hermes ends a turn with <|im_end|>; the base model's </s> also ends text.
_END_TOKENS = ("<|im_end|>", "</s>")


class Tokenizer:
    """encode / decode / apply_chat_template over the checkpoint's tokenizer."""

    def __init__(self, wrapper: TokenizerWrapper, eos_token_ids: Iterable[int] = ()):
        self._wrapper = wrapper
        self._hf = wrapper._tokenizer
        vocab = self._hf.get_vocab()
        ids = set(eos_token_ids) | set(wrapper.eos_token_ids)
        ids |= {vocab[t] for t in _END_TOKENS if t in vocab}
        self.eos_token_ids: frozenset[int] = frozenset(ids)
        self.bos_token_id: int | None = self._hf.bos_token_id
        self.vocab_size: int = len(self._hf)
        # mlx-lm picks its SentencePiece detokenizer only from a tokenizer.json;
        # without one (Hermes ships tokenizer.model) it falls back to a naive
        # one that repeats text around byte-fallback characters.
        spm = "<0x0A>" in vocab and "\u2581" in vocab
        self._spm_detokenizer = SPMStreamingDetokenizer(self._hf) if spm else None

    @classmethod
    def from_path(
        cls, path: Path, extra_eos_token_ids: Union[int, Iterable[int], None] = None
    ) -> "Tokenizer":
        """extra_eos_token_ids: e.g. config.json's eos_token_id (an int or a list)."""
        try:
            wrapper = load_mlx_lm_tokenizer(Path(path))
        except Exception as e:  # transformers raises many types for bad files
            raise HermesError(f"cannot load the tokenizer in {path}: {first_line(e)}") from e
        return cls(wrapper, set(_as_list(extra_eos_token_ids)) | _generation_config_eos(Path(path)))

    def encode(self, text: str) -> list[int]:
        """Text as is, with exactly one leading BOS."""
        ids = self._hf.encode(text, add_special_tokens=False)
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a chat: one BOS, then the rendered template.

        The single place where chat prompts are built, so the CLI, the chat
        session and the server all produce the same ids.
        """
        if not messages:
            return self.encode("")
        template = None if self._hf.chat_template else CHATML_TEMPLATE
        text = self._hf.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
        bos = self._hf.bos_token
        if bos and text.startswith(bos):  # some templates render the BOS themselves
            text = text[len(bos) :]
        return self.encode(text)

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (mlx-lm's): text in whole characters."""
        if self._spm_detokenizer is None:
            return self._wrapper.detokenizer
        detokenizer = copy.copy(self._spm_detokenizer)  # shares the token map
        detokenizer.reset()
        return detokenizer

    @property
    def hf_tokenizer(self):
        return self._hf


def _generation_config_eos(path: Path) -> set[int]:
    file = path / "generation_config.json"
    if not file.exists():
        return set()
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    return set(_as_list(eos))


def _as_list(value: Union[int, Iterable[int], None]) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
