"""Function calling, in the Hermes convention (Nous Research's Hermes 2 Pro).

The tools' signatures go into the system prompt inside `<tools></tools>`;
the model calls one by answering

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and each result comes back in a `tool` turn as
`<tool_response>...</tool_response>`. Hermes 2 Mixtral DPO predates this
convention, so a call it writes on its own may be malformed: when a call is
required (`tool_choice` "required" or a named function) the reply is
constrained by a grammar to exactly one well-formed call whose name and
arguments match the tools' schemas; with "auto" the reply is free and a call
is read out of it only if it is well formed.

One place for the convention: the OpenAI and Ollama routes and the Python
API all render, constrain and parse through this module.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Optional, Union

from .errors import HermesError
from .grammar import COMPACT

CALL_SCHEMA = ('{"properties": {"arguments": {"title": "Arguments", "type": "object"}, '
               '"name": {"title": "Name", "type": "string"}}, "required": ["arguments", "name"], '
               '"title": "FunctionCall", "type": "object"}')
SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available "
    "tools: <tools> {tools} </tools> Use the following pydantic model json schema for each tool "
    "call you will make: {schema} For each function call return a json object with function "
    "name and arguments within <tool_call></tool_call> XML tags as follows:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>")
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema of the arguments


def parse_tools(tools: Optional[list]) -> list[Tool]:
    """OpenAI's and Ollama's `tools` (the same shape): `{"type": "function",
    "function": {"name", "description", "parameters"}}`."""
    out = []
    for i, t in enumerate(tools or []):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or t.get("type", "function") != "function":
            raise HermesError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise HermesError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -")
        parameters = f.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise HermesError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append(Tool(name, f.get("description") or "", parameters))
    if len({t.name for t in out}) < len(out):
        raise HermesError("two tools have the same name")
    return out


def choice(tools: list[Tool], tool_choice: Union[str, dict, None]) -> Optional[list[Tool]]:
    """The tools a reply must call one of (None: it may answer freely).
    "none" is handled by not offering the tools at all."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not tools:
            raise HermesError("tool_choice \"required\" needs tools")
        return tools
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        named = [t for t in tools if t.name == name]
        if not named:
            raise HermesError(f"tool_choice names {name!r}, which is not among the tools")
        return named
    raise HermesError(f"tool_choice must be none, auto, required or a named function, "
                      f"not {tool_choice!r}")


def messages_with_tools(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """The conversation as ChatML messages: the tools' signatures in the system
    prompt (after the caller's own), assistant tool calls as `<tool_call>`
    text, tool results as `tool` turns in `<tool_response>`."""
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        elif role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        signatures = " ".join(json.dumps({"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.parameters}})
            for t in tools)
        system = SYSTEM.format(tools=signatures, schema=CALL_SCHEMA)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _call_text(call: dict) -> str:
    f = call.get("function", call)
    arguments = f.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return ("<tool_call>\n" + json.dumps({"name": f.get("name"), "arguments": arguments})
            + "\n</tool_call>")


def call_grammar(tools: list[Tool]) -> str:
    """An llguidance grammar (Lark) for exactly one call of one of `tools`,
    its arguments matching that tool's schema."""
    import llguidance

    calls = [{"type": "object", "additionalProperties": False,
              "required": ["name", "arguments"],
              "properties": {"name": {"const": t.name}, "arguments": t.parameters}}
             for t in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    lark = ('start: "<tool_call>\\n" call "\\n</tool_call>"\n'
            "call: %json " + json.dumps({**schema, "x-guidance": COMPACT}))
    return llguidance.LLMatcher.grammar_from_lark(lark)


@dataclass
class Call:
    id: str
    name: str
    arguments: dict


def parse_calls(text: str, tools: list[Tool]) -> tuple[str, list[Call]]:
    """The text outside any calls, and the well-formed calls of known tools in
    `text`; anything else stays text."""
    names = {t.name for t in tools}
    calls, kept, at = [], [], 0
    for m in _CALL.finditer(text):
        try:
            value = json.loads(m.group(1))
        except ValueError:
            continue
        if (not isinstance(value, dict) or value.get("name") not in names
                or not isinstance(value.get("arguments", {}), dict)):
            continue
        kept.append(text[at:m.start()])
        at = m.end()
        calls.append(Call(f"call_{uuid.uuid4().hex[:24]}", value["name"],
                          value.get("arguments", {})))
    kept.append(text[at:])
    return "".join(kept).strip() if calls else text, calls

