"""`mlx-hermes serve`: the model behind OpenAI- and Ollama-compatible HTTP APIs.

FastAPI parses and validates; `Engine` queues and generates, batching
concurrent requests (and a request's several prompts or `n` choices). Each API speaks
its own dialect, errors included: OpenAI clients get `{"error": {...}}` and
server-sent events, Ollama clients get `{"error": "..."}` and
newline-delimited JSON. Everything is checked (types, model name, context)
before a request is queued, so a bad request costs nothing and never reaches
the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import hashlib
import json
import secrets
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException

from . import __version__, grammar, tools
from .batching import DEFAULT_MAX_BATCH
from .engine import Busy, Done, Engine, Failed
from .errors import HermesError
from .generate import Chunk, TokenLogprob
from .model import Model
from .sampling import SamplingParams
from .tokenizer import Tokenizer


log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# Hermes's ChatML as an Ollama (Go) template, and its stop word, for /api/show.
CHATML_TEMPLATE = ("{{- if or .System .Tools }}<|im_start|>system\n{{ .System }}"
                   "{{ if .Tools }} <tools> {{ .Tools }} </tools>{{ end }}<|im_end|>\n{{ end }}"
                   "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                   "{{ end }}<|im_start|>assistant\n")
STOP_WORDS = ("<|im_end|>",)
KEPT_LOADED_UNTIL = "2318-01-01T00:00:00Z"  # /api/ps: as Ollama says of keep_alive -1
DISCONNECT_POLL_S = 0.5  # how often a request asks whether its client is still there
RETRY_AFTER_S = 5  # what a 503 (a full queue, a shutdown) tells the client to wait
# The Ollama release whose API this server follows (clients read /api/version to
# decide what to send): logprobs in /api/chat and /api/generate, as ollama-python 0.6 speaks it.
OLLAMA_API_VERSION = "0.13.0"
# Browser pages and editor extensions Ollama lets in by default (CORS); --allow-origin adds more.
DEFAULT_ORIGINS = r"(https?://(localhost|127\.0\.0\.1|0\.0\.0\.0)(:\d+)?" \
                  r"|(app|file|tauri|vscode-webview)://.*)"


# ---- request bodies ----------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send many fields we need not read

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's clients send `"n": null`, `"stream": null` and Ollama's
        `"content": null` for "not given": null means the field's default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class TextPart(_Body):
    type: str
    text: Optional[str] = None


class OpenAIMessage(_Body):
    role: str
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list] = None  # an assistant turn that called tools


class _OpenAISampling(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)  # not OpenAI's, but common in local servers
    min_p: Optional[float] = Field(None, ge=0, lt=1)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[dict] = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Union[str, dict, None] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict] = None


class CompletionRequest(_OpenAISampling):
    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # the legacy API: how many alternatives


class OllamaMessage(_Body):
    role: str
    content: str = ""
    images: Optional[list] = None
    tool_calls: Optional[list] = None


class OllamaOptions(_Body):
    num_predict: Optional[int] = Field(None, ge=-2)
    num_ctx: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_k: Optional[int] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    min_p: Optional[float] = Field(None, ge=0, lt=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    repeat_penalty: Optional[float] = Field(None, gt=0)
    repeat_last_n: Optional[int] = Field(None, ge=1)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None


class _OllamaRequest(_Body):
    model: str
    stream: bool = True
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    format: Optional[Any] = None
    keep_alive: Optional[Any] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class OllamaShowRequest(_Body):
    model: Optional[str] = None
    name: Optional[str] = None  # older clients
    verbose: bool = False


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: Optional[list] = None


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: Optional[str] = None
    raw: bool = False
    context: Optional[list[int]] = None
    images: Optional[list] = None


# ---- the app -----------------------------------------------------------------------------

def create_app(model: Model, tokenizer: Tokenizer, *, name: str, api_key: Optional[str] = None,
               allow_origins: tuple[str, ...] = (),
               max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = 32,
               max_context: Optional[int] = None,
               cache_bytes: int = 2 << 30, kv_bits: Optional[int] = None,
               defaults: Optional[dict] = None, weights_bytes: int = 0) -> FastAPI:
    """An ASGI app serving `model` under `name`. `defaults` are sampling options
    (as for `stream_generate`) used where a request gives none; a missing
    max_tokens means "to the end of the context"."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                    cache_bytes=cache_bytes, kv_bits=kv_bits)
    context = min(max_context or model.args.max_position_embeddings,
                  model.args.max_position_embeddings)
    server = _Server(engine, name, context, dict(defaults or {}), weights_bytes)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer <key>",
                           "invalid_api_key")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()  # on Ctrl-C: stop the running generation, refuse the waiting ones

    app = FastAPI(title="mlx-hermes", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(CORSMiddleware, allow_origin_regex=DEFAULT_ORIGINS,
                       allow_origins=list(allow_origins), allow_methods=["*"],
                       allow_headers=["*"], expose_headers=["Retry-After"])
    router = APIRouter(dependencies=[Depends(check_key)])
    server.add_routes(router)
    app.include_router(router)

    @app.get("/health")
    def health() -> dict:
        running = engine.running
        return {"status": "ok", "model": name, "busy": running > 0, "running": running,
                "waiting": engine.waiting, "max_batch": engine.max_batch}

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.code)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(request, exc.status_code, str(exc.detail), "not_found")

    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(request, 500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crashed)
    return app


def _error(request: Request, status: int, message: str,
           code: str = "invalid_request_error") -> JSONResponse:
    """An error in the dialect of the API that was called (a 503 says when to retry)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": code}}, status_code=status, headers=headers)


def _describe(errors: list) -> str:
    """The first validation error as one line, e.g. `body.temperature: ...`."""
    if not errors:
        return "invalid request"
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ())) or "body"
    return f"{where}: {e.get('msg', 'invalid')}"


class _Server:
    def __init__(self, engine: Engine, name: str, context: int, defaults: dict,
                 weights_bytes: int):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.name = name
        self.context = context
        self.defaults = defaults
        self.weights_bytes = weights_bytes
        self.created = int(time.time())

    def add_routes(self, r: APIRouter) -> None:
        r.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        r.add_api_route("/v1/completions", self.completions, methods=["POST"])
        r.add_api_route("/v1/models", self.models, methods=["GET"])
        r.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"])
        r.add_api_route("/api/chat", self.ollama_chat, methods=["POST"])
        r.add_api_route("/api/generate", self.ollama_generate, methods=["POST"])
        r.add_api_route("/api/tags", self.tags, methods=["GET"])
        r.add_api_route("/api/show", self.show, methods=["POST"])
        r.add_api_route("/api/ps", self.ps, methods=["GET"])
        r.add_api_route("/api/version", self.version, methods=["GET"])
        r.add_api_route("/", self.root, methods=["GET", "HEAD"])

    # ---- shared ------------------------------------------------------------------------

    def check_model(self, requested: Optional[str], ollama: bool = False) -> None:
        if requested is None and not ollama:
            return
        if requested in (self.name, f"{self.name}:latest"):
            return
        message = (f"model '{requested}' not found" if ollama else
                   f"The model `{requested}` does not exist; this server runs `{self.name}`")
        raise ApiError(404, message, "model_not_found")

    def options(self, max_tokens: Optional[int], prompt_tokens: int, *, context: int,
                cap: bool, logprobs: Optional[int] = None, json_schema: Any = None,
                grammar: Optional[str] = None, **given: Any) -> dict:
        """`stream_generate` options: the request's values over the server's
        defaults, checked; max_tokens fitted to the context."""
        room = context - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) does not fit the context "
                                f"of {context} tokens", "context_length_exceeded")
        if max_tokens is None:
            max_tokens = self.defaults.get("max_tokens") or room
            cap = True
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}")
        if max_tokens > room:
            if not cap:
                raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens "
                                    f"({max_tokens}) exceeds the context of {context} tokens",
                               "context_length_exceeded")
            max_tokens = room
        opts = {k: v for k, v in self.defaults.items() if k != "max_tokens"}
        opts.update({k: v for k, v in given.items() if v is not None})
        try:
            sampling, rest = SamplingParams.pick(opts)
        except HermesError as e:
            raise ApiError(400, str(e)) from None
        stop = rest.get("stop")
        return {"sampling": sampling, "stop": [stop] if isinstance(stop, str) else list(stop or []),
                "max_tokens": max_tokens, "logprobs": logprobs,
                "json_schema": self.schema(json_schema), "grammar": grammar}

    def schema(self, schema: Any) -> Any:
        """A request's JSON schema (or True: any JSON object), checked now: one
        that the grammar engine cannot compile is a 400 naming the problem."""
        if schema is None:
            return None
        try:
            grammar.compile_schema(self.tokenizer, schema)
        except HermesError as e:
            raise ApiError(400, str(e)) from None
        return schema

    def chat_ids(self, messages: list[dict], offered: list = ()) -> list[int]:
        """A conversation's prompt; with tools offered (or tool turns in it),
        in Hermes' function-calling convention (tools.py)."""
        for m in messages:
            if m["role"] == "developer":  # OpenAI's newer name for it
                m["role"] = "system"
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise ApiError(400, f"unsupported message role '{m['role']}': use system, "
                                    "developer, user, assistant or tool")
        if offered or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = tools.messages_with_tools(messages, list(offered))
        return self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            add_generation_prompt=True)

    def tools(self, given: Optional[list], tool_choice: Any) -> tuple[list, Optional[str]]:
        """The tools offered to the model, and the grammar that forces a call
        (tool_choice "required" or a named function; None otherwise)."""
        try:
            offered = tools.parse_tools(given)
            if tool_choice == "none":
                return [], None
            forced = tools.choice(offered, tool_choice)
        except HermesError as e:
            raise ApiError(400, str(e)) from None
        return offered, tools.call_grammar(forced) if forced else None

    def start(self, request: Request, jobs: list[tuple[list[int], dict]],
              stream: bool) -> AsyncIterator[tuple[int, Union[Chunk, Done, Failed]]]:
        """Queue every (ids, options) job now, each a sequence of the batch (a
        full queue is an error before any response starts), and return their
        events as (job index, event)."""
        most = self.engine.max_batch + self.engine.max_queue
        if len(jobs) > most:
            raise ApiError(400, f"this request asks for {len(jobs)} sequences; the server runs "
                                f"{self.engine.max_batch} at once and queues "
                                f"{self.engine.max_queue}")
        inbox = _Inbox(asyncio.get_running_loop())
        for i, (ids, options) in enumerate(jobs):
            try:
                job = self.engine.submit(ids, options, functools.partial(inbox.put, i))
            except (Busy, HermesError) as e:
                for queued in inbox.jobs:
                    queued.cancel()
                if isinstance(e, Busy):
                    raise ApiError(503, str(e), "server_busy") from None
                raise ApiError(400, str(e)) from None
            inbox.jobs.append(job)
        return self._events(request, inbox, stream)

    async def _events(self, request: Request, inbox: "_Inbox",
                      stream: bool) -> AsyncIterator[tuple[int, Union[Chunk, Done, Failed]]]:
        """A client that goes away cancels its jobs within DISCONNECT_POLL_S:
        we ask whether it is still there that often, tokens arriving or not
        (Starlette would notice a stream's disconnect only at its next write)."""
        open_jobs = set(range(len(inbox.jobs)))
        asked = time.monotonic()
        try:
            while open_jobs:
                try:
                    batch = await asyncio.wait_for(inbox.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    batch = []
                if time.monotonic() - asked >= DISCONNECT_POLL_S:
                    asked = time.monotonic()
                    if await request.is_disconnected():
                        return
                for i, event in batch:
                    yield i, event
                    if isinstance(event, (Done, Failed)):
                        open_jobs.discard(i)
        finally:
            for job in inbox.jobs:
                job.cancel()

    # ---- OpenAI ------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        body = await _parse(request, ChatCompletionRequest)
        self.check_model(body.model)
        offered, forced = self.tools(body.tools, body.tool_choice)
        if forced and body.response_format and body.response_format.get("type") != "text":
            raise ApiError(400, "a required tool call cannot be combined with response_format")
        messages = [{"role": m.role, "content": _openai_text(m.content),
                     "tool_calls": m.tool_calls} for m in body.messages]
        ids = self.chat_ids(messages, offered)
        max_tokens = (body.max_tokens if body.max_completion_tokens is None
                      else body.max_completion_tokens)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true")
        options = self.options(max_tokens, len(ids), context=self.context, cap=False,
                               logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                               json_schema=_response_format(body.response_format),
                               grammar=forced, **_openai_sampling(body))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": self.name}
        events = self.start(request, _choices(ids, options, body.n), body.stream)
        tok = self.tokenizer

        def logprobs(entries: Optional[list]) -> Optional[dict]:
            if not body.logprobs:
                return None
            return {"content": [_openai_logprob(tok, e) for e in entries or []], "refusal": None}

        def message(text: str, finish: str) -> tuple[dict, str]:
            """The assistant message of a reply, tool calls read out of it."""
            content, calls = tools.parse_calls(text, offered) if offered else (text, [])
            if not calls:
                return {"role": "assistant", "content": text}, finish
            return {"role": "assistant", "content": content or None,
                    "tool_calls": [_openai_call(c) for c in calls]}, (
                        "tool_calls" if finish == "stop" else finish)

        if not body.stream:
            texts, dones, lps = await _collect(events, body.n)
            choices = []
            for i, (text, done, lp) in enumerate(zip(texts, dones, lps)):
                reply, finish = message(text, done.finish_reason)
                choices.append({"index": i, "message": reply, "logprobs": logprobs(lp),
                                "finish_reason": finish})
            return {**head, "object": "chat.completion", "choices": choices,
                    "usage": _usage(dones, prompts=1)}

        usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse() -> AsyncIterator[str]:
            chunk = {**head, "object": "chat.completion.chunk"}

            def choice(i: int, delta: dict, finish: Optional[str] = None,
                       entries: Optional[list] = None) -> str:
                return _sse({**chunk, "choices": [{"index": i, "delta": delta,
                                                   "logprobs": logprobs(entries),
                                                   "finish_reason": finish}]})

            for i in range(body.n):
                yield choice(i, {"role": "assistant", "content": ""})
            dones = {}
            held: dict[int, list[str]] = {}  # with tools offered: a reply is read whole
            async for i, event in events:
                if isinstance(event, Failed):
                    yield _sse({"error": {"message": event.message, "type": "server_error"}})
                    return
                if isinstance(event, Chunk) and offered:
                    held.setdefault(i, []).append(event.text)
                    if event.logprobs:
                        yield choice(i, {}, entries=event.logprobs)
                elif isinstance(event, Chunk) and (event.text or event.logprobs):
                    yield choice(i, {"content": event.text}, entries=event.logprobs)
                if isinstance(event, Done):
                    dones[i] = event
                    finish = event.finish_reason
                    if offered:
                        reply, finish = message("".join(held.pop(i, [])), finish)
                        delta = {"content": reply["content"]} if reply["content"] else {}
                        if reply.get("tool_calls"):
                            delta["tool_calls"] = [{"index": k, **c} for k, c in
                                                   enumerate(reply["tool_calls"])]
                        if delta:
                            yield choice(i, delta)
                    yield choice(i, {}, finish)
            if usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(dones, prompts=1)})
            yield "data: [DONE]\n\n"

        return _stream(sse(), "text/event-stream")

    async def completions(self, request: Request):
        body = await _parse(request, CompletionRequest)
        self.check_model(body.model)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not prompts or not all(prompts):
            raise ApiError(400, "the prompt is empty")
        if body.echo:
            raise ApiError(400, "echo is not supported")
        # OpenAI's legacy endpoint stops at 16 tokens unless told otherwise.
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        jobs = []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt)
            options = self.options(max_tokens, len(ids), context=self.context, cap=False,
                                   logprobs=body.logprobs, **_openai_sampling(body))
            jobs += _choices(ids, options, body.n)  # choice p * n + j: prompt p's j-th
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.name}
        events = self.start(request, jobs, body.stream)
        tok = self.tokenizer

        def logprobs(entries: Optional[list]) -> Optional[dict]:
            return None if body.logprobs is None else _legacy_logprobs(tok, entries or [])

        if not body.stream:
            texts, dones, lps = await _collect(events, len(jobs))
            return {**head, "choices": [{"index": i, "text": text, "logprobs": logprobs(lp),
                                         "finish_reason": done.finish_reason}
                                        for i, (text, done, lp) in enumerate(zip(texts, dones,
                                                                                 lps))],
                    "usage": _usage(dones, prompts=len(prompts))}

        usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse() -> AsyncIterator[str]:
            dones = {}
            async for i, event in events:
                if isinstance(event, Failed):
                    yield _sse({"error": {"message": event.message, "type": "server_error"}})
                    return
                if isinstance(event, Chunk) and (event.text or event.logprobs):
                    yield _sse({**head, "choices": [{"index": i, "text": event.text,
                                                     "logprobs": logprobs(event.logprobs),
                                                     "finish_reason": None}]})
                if isinstance(event, Done):
                    dones[i] = event
                    yield _sse({**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                                     "finish_reason": event.finish_reason}]})
            if usage:
                yield _sse({**head, "choices": [], "usage": _usage(dones, prompts=len(prompts))})
            yield "data: [DONE]\n\n"

        return _stream(sse(), "text/event-stream")

    def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    def model(self, model_id: str) -> dict:
        self.check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "mlx-hermes"}

    # ---- Ollama ------------------------------------------------------------------------

    async def ollama_chat(self, request: Request):
        body = await _parse(request, OllamaChatRequest)
        self.check_model(body.model, ollama=True)
        _ollama_unsupported(None, any(m.images for m in body.messages))
        if not body.messages:  # Ollama's way of loading a model: nothing to generate
            return {"model": body.model, "created_at": _now(), "message": {
                "role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
        offered, _ = self.tools(body.tools, "auto")  # Ollama has no tool_choice
        messages = [{"role": m.role, "content": m.content, "tool_calls": m.tool_calls}
                    for m in body.messages]
        ids = self.chat_ids(messages, offered)
        return await self._ollama(request, body, ids, "chat", offered)

    async def ollama_generate(self, request: Request):
        body = await _parse(request, OllamaGenerateRequest)
        self.check_model(body.model, ollama=True)
        _ollama_unsupported(None, bool(body.images))
        if not body.prompt:
            return {"model": body.model, "created_at": _now(), "response": "", "done": True,
                    "done_reason": "load"}
        if body.raw:
            ids = self.tokenizer.encode(body.prompt)
        else:
            context = list(body.context or [])  # an earlier reply's: continue that conversation
            if not all(0 <= i < self.tokenizer.vocab_size for i in context):
                raise ApiError(400, "context holds ids outside the vocabulary")
            ids = self.tokenizer.user_turn(body.prompt, body.system, after=context)
        return await self._ollama(request, body, ids, "generate")

    async def _ollama(self, request: Request, body: _OllamaRequest, ids: list[int], kind: str,
                      offered: list = ()):
        o = body.options
        context = min(o.num_ctx, self.context) if o.num_ctx else self.context
        # Ollama: -1 and -2 mean "until the context is full"; it never refuses a long num_predict.
        max_tokens = None if o.num_predict is None else (
            context if o.num_predict < 0 else o.num_predict)
        if o.num_predict == 0:
            raise ApiError(400, "options.num_predict must not be 0")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true")
        options = self.options(max_tokens, len(ids), context=context, cap=True,
                               logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                               json_schema=_ollama_format(body.format),
                               temp=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p,
                               seed=o.seed, stop=o.stop, repetition_penalty=o.repeat_penalty,
                               repetition_context_size=o.repeat_last_n,
                               presence_penalty=o.presence_penalty,
                               frequency_penalty=o.frequency_penalty)
        start = time.perf_counter_ns()
        events = self.start(request, [(ids, options)], body.stream)

        def part(text: str, entries: Optional[list] = None) -> dict:
            field = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {
                "response": text}
            if body.logprobs:
                field["logprobs"] = [_ollama_logprob(self.tokenizer, e) for e in entries or []]
            return {"model": body.model, "created_at": _now(), **field}

        def final(done: Done, text: str = "", entries: Optional[list] = None) -> dict:
            calls = []
            if offered:
                text, calls = tools.parse_calls(text, list(offered))
            out = {**part(text, entries), "done": True, "done_reason": done.finish_reason,
                   "total_duration": time.perf_counter_ns() - start, "load_duration": 0,
                   # the whole prompt, as current Ollama counts it; the cached part apart
                   "prompt_eval_count": done.prompt_tokens,
                   "prompt_eval_cached_count": done.cached_tokens,
                   "prompt_eval_duration": int(done.prefill_s * 1e9),
                   "eval_count": done.generated_tokens,
                   "eval_duration": int(done.decode_s * 1e9)}
            if kind == "generate":
                out["context"] = done.ids
            if calls:
                out["message"]["tool_calls"] = [
                    {"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            return out

        if not body.stream:
            (text,), (done,), (entries,) = await _collect(events, 1)
            return final(done, text, entries)

        async def ndjson() -> AsyncIterator[str]:
            held: list[str] = []  # with tools offered: the reply is read whole
            async for _, event in events:
                if isinstance(event, Failed):
                    yield json.dumps({"error": event.message}) + "\n"
                    return
                if isinstance(event, Chunk) and offered:
                    held.append(event.text)
                elif isinstance(event, Chunk) and (event.text or event.logprobs):
                    yield json.dumps({**part(event.text, event.logprobs), "done": False}) + "\n"
                if isinstance(event, Done):
                    yield json.dumps(final(event, "".join(held))) + "\n"

        return _stream(ndjson(), "application/x-ndjson")

    def _details(self) -> dict:
        bits = {getattr(m, "bits", None) for _, m in self.engine.model.named_modules()} - {None}
        return {"parent_model": "", "format": "safetensors", "family": "mixtral",
                "families": ["mixtral"], "parameter_size": _parameter_size(self.engine.model.args),
                "quantization_level": f"Q{min(bits)}" if bits else "F16"}

    def _digest(self) -> str:
        return hashlib.sha256(f"{self.name}{self.weights_bytes}".encode()).hexdigest()

    def tags(self) -> dict:
        return {"models": [{
            "name": f"{self.name}:latest", "model": f"{self.name}:latest",
            "modified_at": datetime.fromtimestamp(self.created, timezone.utc).isoformat(),
            "size": self.weights_bytes, "digest": self._digest(), "details": self._details()}]}

    async def show(self, request: Request) -> dict:
        """What Ollama's /api/show says of a model: Continue reads num_ctx, the
        stop words and the template here; LlamaIndex calls it before each request."""
        body = await _parse(request, OllamaShowRequest)
        self.check_model(body.model or body.name, ollama=True)
        a = self.engine.model.args
        parameters = [f"num_ctx {self.context}"] + [f'stop "{s}"' for s in STOP_WORDS]
        for ours, theirs in (("temp", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                             ("min_p", "min_p"), ("max_tokens", "num_predict")):
            if self.defaults.get(ours) is not None:
                parameters.append(f"{theirs} {self.defaults[ours]}")
        return {
            "modelfile": f"# served by mlx-hermes {__version__}\nFROM {self.name}\n"
                         f'TEMPLATE """{CHATML_TEMPLATE}"""\n'
                         + "".join(f"PARAMETER {p}\n" for p in parameters),
            "parameters": "\n".join(parameters),
            "template": CHATML_TEMPLATE,
            "details": self._details(),
            "model_info": {
                "general.architecture": "mixtral",
                "general.parameter_count": _parameter_count(a),
                "mixtral.context_length": a.max_position_embeddings,
                "mixtral.embedding_length": a.hidden_size,
                "mixtral.block_count": a.num_hidden_layers,
                "mixtral.feed_forward_length": a.intermediate_size,
                "mixtral.attention.head_count": a.num_attention_heads,
                "mixtral.attention.head_count_kv": a.num_key_value_heads,
                "mixtral.attention.key_length": a.dims_per_head,
                "mixtral.attention.layer_norm_rms_epsilon": a.rms_norm_eps,
                "mixtral.expert_count": a.num_local_experts,
                "mixtral.expert_used_count": a.num_experts_per_tok,
                "mixtral.rope.freq_base": a.rope_theta,
                "mixtral.vocab_size": a.vocab_size,
            },
            "capabilities": ["completion", "tools"],
            "modified_at": datetime.fromtimestamp(self.created, timezone.utc).isoformat(),
        }

    def ps(self) -> dict:
        """The loaded model: it stays loaded for as long as the server runs
        (`keep_alive` is accepted, and changes nothing)."""
        return {"models": [{
            "name": f"{self.name}:latest", "model": f"{self.name}:latest",
            "size": self.weights_bytes, "size_vram": self.weights_bytes,
            "digest": self._digest(), "details": self._details(),
            "expires_at": KEPT_LOADED_UNTIL, "context_length": self.context}]}

    def version(self) -> dict:
        return {"version": OLLAMA_API_VERSION}

    def root(self) -> PlainTextResponse:
        return PlainTextResponse("mlx-hermes is running")


# ---- helpers -------------------------------------------------------------------------------

def _openai_text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text":
            raise ApiError(400, f"content of type '{part.type}' is not supported: text only")
        parts.append(part.text or "")
    return "".join(parts)


def _openai_sampling(body: _OpenAISampling) -> dict:
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise ApiError(400, "stop takes at most 4 strings")
    return {"temp": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
            "min_p": body.min_p, "seed": body.seed, "stop": body.stop,
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty}


def _response_format(fmt: Optional[dict]) -> Any:
    """OpenAI's response_format as a json_schema option: text (None), any
    object (json_object) or a schema (json_schema; `strict` or not, the
    output always matches it)."""
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return True
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise ApiError(400, f"response_format type {fmt.get('type')!r} is not supported: use text, "
                        "json_object or json_schema")


def _ollama_format(fmt: Any) -> Any:
    """Ollama's format: "json" (any JSON object) or a JSON schema."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return True
    if isinstance(fmt, dict):
        return fmt
    raise ApiError(400, f"format must be \"json\" or a JSON schema, not {fmt!r}")


def _openai_call(call: "tools.Call") -> dict:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}


def _ollama_unsupported(_, images: bool) -> None:
    if images:
        raise ApiError(400, "images are not supported: this model reads text only")


class _Inbox:
    """Events from the engine's thread to the event loop, in batches, as
    (job index, event) pairs.

    One wake-up per batch, not per token: a fast model (or a client that
    reads slowly) must not flood the loop with callbacks and starve other
    requests of it. Consecutive chunks of one job are joined into one."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.jobs: list = []
        self._lock = threading.Lock()
        self._pending: list = []
        self._ready = asyncio.Event()

    def put(self, index: int, event) -> None:  # on the engine's thread
        with self._lock:
            self._pending.append((index, event))
            if len(self._pending) > 1:
                return  # a wake-up is already on its way
        try:
            self.loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop is gone: nobody is listening
            for job in self.jobs:
                job.cancel()

    async def get(self) -> list:
        await self._ready.wait()
        self._ready.clear()
        with self._lock:
            batch, self._pending = self._pending, []
        out: list = []
        last: dict[int, int] = {}  # job -> where its latest chunk is in out, if nothing since
        for index, event in batch:
            at = last.get(index)
            if isinstance(event, Chunk) and at is not None:
                before = out[at][1]
                joined = (before.logprobs or []) + (event.logprobs or [])
                out[at] = (index, Chunk(before.text + event.text, event.token,
                                        logprobs=joined or None))
                continue
            out.append((index, event))
            if isinstance(event, Chunk):
                last[index] = len(out) - 1
            else:
                last.pop(index, None)
        return out


async def _parse(request: Request, cls: type[BaseModel]) -> Any:
    """The body as `cls`, whatever the Content-Type (curl -d sends a form type,
    and Ollama's own examples do just that)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, _describe(e.errors())) from None


async def _collect(events: AsyncIterator, n: int) -> tuple[list[str], list[Done], list[list]]:
    """Each of n jobs' whole text, Done and token logprobs (if asked for)."""
    texts: list[list[str]] = [[] for _ in range(n)]
    dones: list[Optional[Done]] = [None] * n
    logprobs: list[list] = [[] for _ in range(n)]
    async for i, event in events:
        if isinstance(event, Failed):
            if event.retry:
                raise ApiError(503, event.message, "server_shutting_down")
            raise ApiError(500, event.message, "server_error")
        if isinstance(event, Chunk):
            texts[i].append(event.text)
            logprobs[i] += event.logprobs or []
        if isinstance(event, Done):
            dones[i] = event
    if any(d is None for d in dones):
        raise ApiError(499, "the client went away", "cancelled")
    return ["".join(t) for t in texts], dones, logprobs


def _token(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    data = tokenizer.token_bytes(token)
    return data.decode("utf-8", errors="replace"), list(data)


def _openai_logprob(tokenizer: Tokenizer, lp: TokenLogprob) -> dict:
    """Chat completions' shape: token, logprob, bytes, top_logprobs."""
    def entry(token: int, logprob: float) -> dict:
        text, data = _token(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": data}
    return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def _legacy_logprobs(tokenizer: Tokenizer, entries: list) -> dict:
    """/v1/completions' shape: parallel lists, offsets into the choice's text."""
    tokens = [_token(tokenizer, e.token)[0] for e in entries]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token(tokenizer, t)[0]: v for t, v in e.top} for e in entries],
            "text_offset": offsets}


def _ollama_logprob(tokenizer: Tokenizer, lp: TokenLogprob) -> dict:
    return {"token": _token(tokenizer, lp.token)[0], "logprob": lp.logprob,
            "top_logprobs": [{"token": _token(tokenizer, t)[0], "logprob": v}
                             for t, v in lp.top]}


def _choices(ids: list[int], options: dict, n: int) -> list[tuple[list[int], dict]]:
    """n jobs for one prompt: OpenAI's `n` choices. With a seed, choice j
    samples with seed + j, so the choices differ and each is repeatable."""
    seed = options["sampling"].seed
    if n == 1 or seed is None:
        return [(ids, options)] * n
    return [(ids, {**options, "sampling": dataclasses.replace(options["sampling"], seed=seed + j)})
            for j in range(n)]


def _usage(dones: Union[list[Done], dict[int, Done]], prompts: int) -> dict:
    """Token counts of a response of `prompts` prompts with n choices each
    (jobs p * n ... p * n + n - 1 share prompt p): each prompt counted once.
    `dones` by job index, as a list or a dict."""
    if isinstance(dones, dict):
        dones = [dones[i] for i in sorted(dones)]
    n = max(1, len(dones) // prompts)
    firsts = dones[::n]
    prompt_tokens = sum(d.prompt_tokens for d in firsts)
    completion = sum(d.generated_tokens for d in dones)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(d.cached_tokens for d in firsts)}}


def _stream(body: AsyncIterator[str], media_type: str) -> StreamingResponse:
    return StreamingResponse(body, media_type=media_type,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _parameter_count(a) -> int:
    attention = a.hidden_size * a.dims_per_head * (2 * a.num_attention_heads
                                                   + 2 * a.num_key_value_heads)
    experts = 3 * a.hidden_size * a.intermediate_size * a.num_local_experts
    router = a.hidden_size * a.num_local_experts
    return a.num_hidden_layers * (attention + experts + router) + 2 * a.vocab_size * a.hidden_size


def _parameter_size(a) -> str:
    total = _parameter_count(a)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if total >= scale:
            return f"{total / scale:.1f}{unit}"
    return str(total)


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8080,
        log_level: str = "info") -> None:
    """Serve until Ctrl-C."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # End the generations first, so open streams finish at once and
            # uvicorn's graceful shutdown has no connection to wait for.
            app.state.engine.cancel_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its clean shutdown: done
        pass
