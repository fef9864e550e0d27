"""Structured output (grammar.py): JSON that matches a schema, from a random model."""

from __future__ import annotations

import json

import pytest

import mlx_hermes
from mlx_hermes import HermesError, batch_generate
from mlx_hermes.grammar import compile_schema

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 2,
                                  "items": {"enum": ["a", "b", "c"]}}}}


def matches_person(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"name", "age", "tags"}
            and isinstance(value["name"], str) and len(value["name"]) <= 8
            and isinstance(value["age"], int) and 0 <= value["age"] <= 120
            and len(value["tags"]) <= 2 and set(value["tags"]) <= {"a", "b", "c"})


@pytest.mark.parametrize("seed", range(4))
def test_sampled_output_parses_and_matches_the_schema(loaded, seed):
    model, tokenizer = loaded("odd")
    chunks = list(mlx_hermes.stream_generate(model, tokenizer, tokenizer.user_turn("Who?"),
                                             max_tokens=80, temp=1.0, seed=seed,
                                             json_schema=PERSON))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop", text  # it ended at the end of the value
    assert matches_person(json.loads(text))
    assert "\n" not in text and "  " not in text  # compact


def test_batched_structured_output(loaded):
    model, tokenizer = loaded("gqa")
    prompts = [tokenizer.user_turn(p) for p in ("A", "B", "C")]
    texts = batch_generate(model, tokenizer, prompts, max_tokens=80, json_schema=PERSON,
                           per_prompt=[{}, {"json_schema": None, "max_tokens": 5}, {}])
    assert matches_person(json.loads(texts[0])) and matches_person(json.loads(texts[2]))
    # the same as alone, token for token (greedy)
    assert texts[0] == mlx_hermes.generate(model, tokenizer, prompts[0], max_tokens=80,
                                           json_schema=PERSON)


def test_any_object_ends_complete_or_says_length(loaded):
    model, tokenizer = loaded("gqa")
    for max_tokens in (3, 200):
        chunks = list(mlx_hermes.stream_generate(model, tokenizer, tokenizer.user_turn("Hi"),
                                                 max_tokens=max_tokens, json_schema=True))
        text = "".join(c.text for c in chunks)
        assert text.startswith("{")
        if chunks[-1].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert chunks[-1].finish_reason == "length"
    assert chunks  # the short one cannot finish: "length", never "stop"


@pytest.mark.parametrize("schema,message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "schema"),
    ({"type": "strange"}, "schema"),
])
def test_bad_schemas_are_named(loaded, schema, message):
    _, tokenizer = loaded("gqa")
    with pytest.raises(HermesError, match=message):
        compile_schema(tokenizer, schema)
