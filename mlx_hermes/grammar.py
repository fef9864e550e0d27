"""Structured output: generation constrained to valid JSON, or to a JSON schema.

A logits processor that allows, at each step, only the tokens that keep the
text a prefix of some value the schema accepts; once the value is complete,
only the end of the turn. The grammar engine is llguidance (the one
llama.cpp uses): it compiles JSON schemas to token masks for any vocabulary
and depends on nothing else. xgrammar, the other choice, requires torch,
transformers and triton, which `serve` must not pull in.

JSON is kept compact (`, ` and `: ` between items, no other whitespace), so
a model cannot spend its tokens on runs of blanks and a short `max_tokens`
still has room for the value; if the value is cut short anyway, the reply's
finish_reason is "length", never "stop".
"""

from __future__ import annotations

import functools
import json
from typing import Any, Optional, Union

import mlx.core as mx

from .errors import HermesError
from .tokenizer import Tokenizer

# what `json_schema=` accepts for "any JSON object" (OpenAI's json_object, Ollama's "json")
ANY_OBJECT = {"type": "object"}
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

Schema = Union[dict, str, bool]


def compile_schema(tokenizer: Tokenizer, schema: Schema) -> str:
    """The llguidance grammar for `schema` (a dict, its JSON text, or True
    for any JSON object); a HermesError naming the problem if it cannot be
    compiled."""
    if schema is True:
        schema = ANY_OBJECT
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise HermesError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise HermesError("a JSON schema must be a JSON object")
    return _compile(tokenizer, json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _compile(tokenizer: Tokenizer, schema: str) -> str:
    """One compilation per distinct schema: the server checks a request's schema
    when it arrives and the engine compiles it again when the sequence starts."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
    except ValueError as e:
        raise HermesError(f"invalid JSON schema: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar, _llg_tokenizer(tokenizer))
    if error and not error.startswith("WARNING"):
        raise HermesError(f"unsupported JSON schema: {error.splitlines()[0]}")
    return grammar


class JsonConstraint:
    """An mlx-lm logits processor, `(tokens, logits) -> logits`, for one
    sequence: its first call sees the prompt, each later one the prompt and
    what was generated so far, of which it consumes the new tokens."""

    def __init__(self, tokenizer: Tokenizer, grammar: str):
        import llguidance

        self.matcher = llguidance.LLMatcher(_llg_tokenizer(tokenizer), grammar)
        if self.matcher.is_error():
            raise HermesError(f"unsupported JSON schema: {self.matcher.get_error()}")
        self.vocab = tokenizer.vocab_size
        self.start: Optional[int] = None  # context length at the first call: the prompt

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = tokens.shape[-1]
        if self.start is None:
            self.start = n
        else:
            new = tokens[self.start:n].tolist() if tokens.ndim == 1 else (
                tokens[0, self.start:n].tolist())
            self.start = n
            for t in new:
                self.matcher.consume_token(int(t))
        allowed = mx.array(memoryview(self.matcher.compute_logit_bias()), dtype=mx.uint8)
        allowed = allowed[: logits.shape[-1]]
        if allowed.shape[0] < logits.shape[-1]:  # a padded vocabulary: the padding never
            allowed = mx.concatenate([allowed, mx.zeros(logits.shape[-1] - allowed.shape[0],
                                                        mx.uint8)])
        return mx.where(allowed > 0, logits, mx.array(-mx.inf, logits.dtype))


def constraint(tokenizer: Tokenizer, schema: Optional[Schema] = None,
               grammar: Optional[str] = None) -> list:
    """The logits processors for `json_schema=schema`, or for an llguidance
    `grammar` (e.g. tools.call_grammar); [] for neither."""
    if grammar is not None:
        return [JsonConstraint(tokenizer, grammar)]
    if schema is None or schema is False:
        return []
    return [JsonConstraint(tokenizer, compile_schema(tokenizer, schema))]


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes, the
    end-of-turn id, and a way to tokenize text."""

    def __init__(self, tokenizer: Tokenizer):
        self.special_token_ids = sorted(set(tokenizer.added_tokens.values()))
        special = set(self.special_token_ids)
        # llguidance's mark for a special token: its text after a 0xFF byte, which no
        # text contains, so that grammars never match it as text
        self.tokens = [b"\xff" + tokenizer.token_bytes(i) if i in special
                       else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        # the byte token <0xFF> would read as that mark with no name; no UTF-8 text
        # holds the byte, so it becomes a special token that grammars never allow
        self.tokens = [b"\xff<0xFF>" if t == b"\xff" else t for t in self.tokens]
        end = tokenizer.token_id("<|im_end|>")
        self.eos_token_id = end if end is not None else min(tokenizer.eos_token_ids)
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: Union[str, bytes]) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode_exact(text)


@functools.lru_cache(maxsize=4)
def _llg_tokenizer(tokenizer: Tokenizer) -> Any:
    import llguidance

    vocab = _Vocabulary(tokenizer)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab),
                                  eos_token=sorted(tokenizer.eos_token_ids | {vocab.eos_token_id}))
