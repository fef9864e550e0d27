"""Function calling in Hermes' convention (tools.py), in Python and through the server."""

from __future__ import annotations


import pytest

import mlx_hermes
from mlx_hermes import HermesError, tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}


def test_the_prompt_holds_the_tools_calls_and_results():
    offered = tools.parse_tools([WEATHER, TIME])
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "content": "{\"temp\": 21}"}]
    out = tools.messages_with_tools(messages, offered)
    assert out[0]["content"].startswith("Be brief.\n\nYou are a function calling AI model.")
    assert "<tools> {\"type\": \"function\", \"function\": {\"name\": \"get_weather\"" in out[0][
        "content"]
    assert out[2]["content"] == ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
                                 "{\"city\": \"Paris\"}}\n</tool_call>")
    assert out[3] == {"role": "tool",
                      "content": "<tool_response>\n{\"temp\": 21}\n</tool_response>"}


def test_calls_are_read_out_of_a_reply_only_when_well_formed():
    offered = tools.parse_tools([WEATHER])
    text, calls = tools.parse_calls(
        "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n"
        "</tool_call>", offered)
    assert text == "Sure." and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Oslo"})] and calls[0].id.startswith("call_")
    for bad in ("<tool_call>{not json}</tool_call>",
                "<tool_call>{\"name\": \"launch\", \"arguments\": {}}</tool_call>", "plain"):
        assert tools.parse_calls(bad, offered) == (bad, [])


@pytest.mark.parametrize("given,choice,message", [
    ([{"type": "function"}], "auto", r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "a b"}}], "auto", "name"),
    ([WEATHER, WEATHER], "auto", "same name"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    ([], "required", "needs tools"),
    ([WEATHER], "sometimes", "tool_choice"),
])
def test_bad_tools_are_clear_errors(given, choice, message):
    with pytest.raises(HermesError, match=message):
        tools.choice(tools.parse_tools(given), choice)


@pytest.mark.parametrize("seed", range(3))
def test_a_forced_call_is_well_formed_and_matches_the_schema(loaded, seed):
    model, tokenizer = loaded("odd")
    offered = tools.parse_tools([WEATHER, TIME])
    messages = tools.messages_with_tools([{"role": "user", "content": "Weather?"}], offered)
    ids = tokenizer.apply_chat_template(messages)
    chunks = list(mlx_hermes.stream_generate(
        model, tokenizer, ids, max_tokens=80, temp=1.0, seed=seed,
        grammar=tools.call_grammar(tools.choice(offered, "required"))))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop", text
    _, calls = tools.parse_calls(text, offered)
    assert len(calls) == 1 and calls[0].name in ("get_weather", "get_time")
    if calls[0].name == "get_weather":
        args = calls[0].arguments
        assert set(args) <= {"city", "unit"} and len(args["city"]) <= 12
