"""`mlx-hermes batch`: a JSONL file of prompts in, a JSONL file of results out.

Each input line is one JSON object: `prompt` (a user turn, as `generate
--prompt` treats it; verbatim with `"raw": true`) or `messages` (a
conversation), and optionally `system`, `id`, `max_tokens`, `temperature`,
`top_p`, `top_k`, `min_p`, `repetition_penalty`, `stop` and `seed`. Blank
lines are skipped. Every prompt runs through the batching engine.

Results keep the input's order, one line each: `id` (the input's, else its
line number), `text`, `finish_reason`, `prompt_tokens`, `completion_tokens`;
a line that cannot run gives `{"id", "line", "error"}` instead (or stops the
run, with `on_error="stop"`, before anything is generated).

The output is appended a whole line at a time, in order, and flushed, so an
interrupted run leaves a valid file of the first lines; running again with
the same output continues after them (a torn last line, from a crash, is
dropped first).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .batching import DEFAULT_MAX_BATCH, Batcher, make_request
from .errors import HermesError, first_line
from .model import Model
from .tokenizer import Tokenizer

# a line's own settings, and the `generate` option each sets
LINE_OPTIONS = {"max_tokens": "max_tokens", "temperature": "temp", "top_p": "top_p",
                "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                "stop": "stop", "seed": "seed"}
LINE_FIELDS = {"prompt", "messages", "raw", "system", "id", *LINE_OPTIONS}


@dataclass
class Line:
    number: int  # in the input file, from 1
    id: Any
    request: Any = None  # batching.Request, or None
    error: Optional[str] = None

    def error_record(self) -> dict:
        return {"id": self.id, "line": self.number, "error": self.error}


def read_lines(path: Path, tokenizer: Tokenizer, defaults: dict,
               check: Callable[[Any], None]) -> list[Line]:
    """Every non-blank line of the input as a request, or with the error that
    keeps it from running. `defaults` are `generate` options for every line;
    `check(request)` raises if a request can never run."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HermesError(f"cannot read {path}: {first_line(e)}") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        line = Line(number, number)
        try:
            try:
                item = json.loads(raw)
            except ValueError as e:
                raise HermesError(f"not valid JSON: {e}") from None
            if not isinstance(item, dict):
                raise HermesError("a line must be a JSON object")
            line.id = item.get("id", number)
            line.request = _request(item, tokenizer, defaults)
            check(line.request)
        except (ValueError, HermesError, TypeError) as e:
            line.request, line.error = None, first_line(e)
        lines.append(line)
    return lines


def _request(item: dict, tokenizer: Tokenizer, defaults: dict):
    unknown = sorted(set(item) - LINE_FIELDS)
    if unknown:
        raise HermesError(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(LINE_FIELDS))})")
    prompt, messages, system = item.get("prompt"), item.get("messages"), item.get("system")
    if (prompt is None) == (messages is None):
        raise HermesError("give either \"prompt\" or \"messages\"")
    if system is not None and not isinstance(system, str):
        raise HermesError("\"system\" must be a string")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise HermesError("\"prompt\" must be a non-empty string")
        if item.get("raw"):
            if system is not None:
                raise HermesError("\"system\" needs the chat template: it cannot go with \"raw\"")
            ids = tokenizer.encode(prompt)
        else:
            ids = tokenizer.user_turn(prompt, system)
    else:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise HermesError("\"messages\" must be a list of {\"role\": ..., \"content\": ...}")
        if system is not None:
            if messages[0]["role"] == "system":
                raise HermesError("give the system prompt once: in \"system\" or in \"messages\"")
            messages = [{"role": "system", "content": system}] + messages
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    options = dict(defaults)
    options.update({LINE_OPTIONS[k]: v for k, v in item.items() if k in LINE_OPTIONS})
    return make_request(tokenizer, ids, options)


def resume_point(path: Path, lines: list[Line]) -> int:
    """How many results `path` already holds for these lines (0 if it does
    not exist). A torn last line is cut off; results that do not match the
    input's ids are an error, not something to append to."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a line torn by a crash: drop it
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    records = data.decode("utf-8", errors="replace").splitlines()
    if len(records) > len(lines):
        raise HermesError(f"{path} has {len(records)} results but the input only {len(lines)} "
                          "lines: is it the output of another input? Use another --output")
    for k, (record, line) in enumerate(zip(records, lines), 1):
        try:
            got = json.loads(record).get("id")
        except (ValueError, AttributeError):
            raise HermesError(f"{path}, line {k}, is not a result: use another --output") from None
        if got != line.id:
            raise HermesError(f"{path}, line {k}, is for id {got!r}, but input line "
                              f"{line.number} has id {line.id!r}: is it the output of another "
                              "input? Use another --output")
    return len(records)


def run(model: Model, tokenizer: Tokenizer, input_path: Path, output_path: Path, *,
        defaults: Optional[dict] = None, max_batch: int = DEFAULT_MAX_BATCH,
        on_error: str = "skip",
        progress: Optional[Callable[[int, int, float], None]] = None) -> dict:
    """Run every line of `input_path` not yet in `output_path`. Returns
    counts: lines, skipped (already done), done, errors, generated tokens,
    seconds. `progress(lines done, lines, aggregate tok/s)`."""
    if on_error not in ("skip", "stop"):
        raise HermesError(f"on_error must be skip or stop, not {on_error!r}")
    batcher = Batcher(model, tokenizer, max_batch=max_batch)
    try:
        lines = read_lines(input_path, tokenizer, defaults or {}, batcher.check)
        bad = next((line for line in lines if line.error), None)
        if bad is not None and on_error == "stop":
            raise HermesError(f"{input_path}, line {bad.number}: {bad.error}")
        skipped = resume_point(output_path, lines)
        todo = lines[skipped:]
        for k, line in enumerate(todo):
            if line.request is not None:
                batcher.add(k, line.request)
        return _generate(batcher, todo, output_path, skipped, len(lines), progress)
    finally:
        batcher.close()


def _generate(batcher: Batcher, todo: list[Line], output_path: Path, skipped: int, total: int,
              progress: Optional[Callable[[int, int, float], None]]) -> dict:
    start = time.perf_counter()
    results: dict[int, dict] = {k: line.error_record() for k, line in enumerate(todo)
                                if line.error}
    texts: dict[int, list[str]] = {}
    written, tokens, errors = 0, 0, len(results)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "a", encoding="utf-8") as out:
        def flush() -> None:
            nonlocal written
            while written in results:
                out.write(json.dumps(results.pop(written), ensure_ascii=False) + "\n")
                written += 1
            out.flush()
            os.fsync(out.fileno())

        flush()
        while batcher.busy:
            events = batcher.step()
            for k, e in batcher.failed():
                todo[k].error = first_line(e)
                results[k] = todo[k].error_record()
                errors += 1
            for k, chunk in events:
                tokens += 1
                texts.setdefault(k, []).append(chunk.text)
                if chunk.finish_reason:
                    results[k] = {"id": todo[k].id, "text": "".join(texts.pop(k)),
                                  "finish_reason": chunk.finish_reason,
                                  "prompt_tokens": chunk.stats["prompt_tokens"],
                                  "completion_tokens": chunk.stats["generated_tokens"]}
            if results.keys() & {written}:
                flush()
                if progress is not None:
                    elapsed = time.perf_counter() - start
                    progress(skipped + written, total, tokens / elapsed if elapsed else 0.0)
        flush()
    if progress is not None:
        elapsed = time.perf_counter() - start
        progress(skipped + written, total, tokens / elapsed if elapsed else 0.0)
    return {"lines": total, "skipped": skipped, "done": written, "errors": errors,
            "generated_tokens": tokens, "seconds": time.perf_counter() - start}
