"""Streaming text generation.

The token loop is mlx-lm's `generate_step` (chunked prefill, double-buffered
decode with `mx.async_eval`, samplers and logits processors); this module adds
what a user of Hermes sees: prompts as text or ids, whole-character text
chunks, stop strings, end-of-turn tokens, context checks and statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream, wired_limit

from . import grammar as grammars
from .cache import make_cache
from .errors import HermesError
from .model import Model
from .sampling import SamplingParams
from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]


@dataclass
class Chunk:
    """One generated token and the text it completes.

    text is "" while a multi-byte character or a possible stop string is
    still incomplete. The last chunk carries `stats` and `finish_reason`
    ("stop": an end-of-turn token or a stop string; "length": max_tokens).
    """

    text: str
    token: int
    stats: Optional[dict] = None
    finish_reason: Optional[str] = None
    # with the `logprobs` option: per token (one here; more where chunks were
    # joined), its TokenLogprob
    logprobs: Optional[list] = None


@dataclass
class TokenLogprob:
    """A generated token's log-probability and the `top` most likely tokens'
    (id, log-probability), most likely first. From the model's distribution
    after the penalties (repetition, presence, frequency), before temperature
    and the top-p / top-k / min-p filters: what the model thought, not what
    the sampler was allowed to pick."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logprobs: mx.array, token: int, top: int) -> TokenLogprob:
    """TokenLogprob of `token` from a row of log-probabilities [V]."""
    top_ids: list[int] = []
    if top > 0:
        top_ids = mx.argpartition(-logprobs, kth=top - 1)[:top].tolist()
    values = logprobs[mx.array([token] + top_ids)].astype(mx.float32).tolist()
    pairs = sorted(zip(top_ids, values[1:]), key=lambda p: -p[1])
    return TokenLogprob(token, values[0], pairs)


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    sampling: Optional[SamplingParams] = None,
    stop: Optional[Iterable[str]] = None,
    logits_processors: Optional[list[Callable]] = None,
    kv_bits: Optional[int] = None,
    cache: Optional[list] = None,
    prefill_step_size: int = 2048,
    progress: Optional[Callable[[int, int], None]] = None,
    logprobs: Optional[int] = None,
    json_schema: Any = None,
    grammar: Optional[str] = None,
    **sampling_options: Any,
) -> Iterator[Chunk]:
    """Generate from `prompt`: raw text (tokenized as is, with one BOS) or
    token ids (used as given; build chat prompts with
    `tokenizer.apply_chat_template`). Sampling is `sampling`, or its fields
    as keywords (`temp=0.7, top_p=0.9, seed=1`, ...; greedy by default).
    Pass `cache` (from `make_cache`) to continue where an earlier call left
    off: the prompt then holds only the new tokens. `progress(done, total)`
    is called during prefill. `logprobs=N` gives each chunk the token's
    TokenLogprob with the N most likely alternatives (0: none).
    `json_schema` (a JSON schema as a dict or text, or True for any JSON
    object) constrains the reply to JSON that matches it, `grammar` (an
    llguidance grammar, e.g. tools.call_grammar) to that grammar."""
    sampling = sampling_of(sampling, sampling_options)
    ids = prompt_ids(tokenizer, prompt)
    if max_tokens < 1:
        raise HermesError(f"max_tokens must be at least 1, got {max_tokens}")
    if cache is None:
        cache = make_cache(model, kv_bits)
    check_context(model, cache[0].offset + len(ids), max_tokens)

    sampler = sampling.sampler()
    # a model split over several machines (distributed.shard) has its own rules
    coordination = getattr(model, "coordination", None)
    if coordination is not None:
        sampler, progress = coordination.sampler(sampler), coordination.progress(progress)
    processors = (sampling.logits_processors() + list(logits_processors or [])
                  + grammars.constraint(tokenizer, json_schema, grammar))
    reply = Continuation(tokenizer, len(ids), max_tokens, stop)

    with wired_limit(model, [generation_stream]):
        steps = generate_step(
            mx.array(ids),
            model,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors or None,
            prompt_cache=cache,
            prefill_step_size=prefill_step_size,
            prompt_progress_callback=progress,
        )
        try:
            for token, token_logprobs in steps:
                chunk = reply.add(token, None if logprobs is None else
                                  token_logprob(token_logprobs, token, logprobs))
                yield chunk
                if chunk.finish_reason:
                    return
        finally:
            steps.close()
            if coordination is not None:
                coordination.finished(generation_stream)


def generate(model: Model, tokenizer: Tokenizer, prompt: Prompt, **options) -> str:
    """The whole completion as one string; options as for `stream_generate`."""
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **options))


def sampling_of(sampling: Optional[SamplingParams], options: dict) -> SamplingParams:
    """`sampling`, or one made from its fields given as keywords (None: unset)."""
    if sampling is None:
        unknown = set(options) - set(SamplingParams.names())
        if unknown:
            raise HermesError(f"unknown option {sorted(unknown)[0]!r}")
        return SamplingParams(**{k: v for k, v in options.items() if v is not None})
    if options:
        raise HermesError("give sampling options either as `sampling` or as keywords")
    return sampling


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """Raw text tokenized as is (with one BOS), or token ids as given."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids or (isinstance(prompt, str) and not prompt):
        raise HermesError("the prompt is empty")
    return ids


def check_context(model: Model, prompt_tokens: int, max_tokens: int) -> None:
    limit = model.args.max_position_embeddings
    if prompt_tokens + max_tokens > limit:
        raise HermesError(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds "
            f"the model's context of {limit} tokens"
        )


class Continuation:
    """What one sequence's generated tokens become, token by token: text in
    whole characters, cut at a stop string (never emitted), ended by an
    end-of-turn token or max_tokens, with statistics on the last chunk. The
    one rule for this, used by `stream_generate` and the batching engine."""

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: int, max_tokens: int,
                 stop: Optional[Iterable[str]] = None, cached_tokens: int = 0):
        self.detokenizer = tokenizer.detokenizer
        self.stops = StopStrings(stop or ())
        self.eos = tokenizer.eos_token_ids
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens  # of prompt_tokens, already in the KV cache
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.start = time.perf_counter()  # restarted when a batch admits the sequence
        self.first: Optional[float] = None

    def add(self, token: int, logprob: Optional["TokenLogprob"] = None) -> Chunk:
        """The chunk for the next generated token; `finish_reason` set on the last."""
        chunk = self._add(token)
        if logprob is not None:
            chunk.logprobs = [logprob]
        return chunk

    def _add(self, token: int) -> Chunk:
        self.first = self.first or time.perf_counter()
        self.tokens.append(token)
        detokenizer = self.detokenizer
        if token in self.eos:
            detokenizer.finalize()
            return Chunk(self.stops.flush(detokenizer.last_segment), token, self.stats(), "stop")
        detokenizer.add_token(token)
        text, hit = self.stops.feed(detokenizer.last_segment)
        if hit:
            return Chunk(text, token, self.stats(), "stop")
        if len(self.tokens) == self.max_tokens:
            detokenizer.finalize()
            text += self.stops.flush(detokenizer.last_segment)
            return Chunk(text, token, self.stats(), "length")
        return Chunk(text, token)

    def stats(self) -> dict:
        end = time.perf_counter()
        first = self.first or end
        n = len(self.tokens)
        new = self.prompt_tokens - self.cached_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prompt_tps": new / (first - self.start) if first > self.start else 0.0,
            "ttft_s": first - self.start,
            "generated_tokens": n,
            # the first token comes out of prefill, so it is not counted here
            "decode_tps": (n - 1) / (end - first) if n > 1 else 0.0,
            "decode_s": end - first,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }


class StopStrings:
    """Cuts streamed text at the first stop string, holding back any tail
    that might be the start of one, so no stop text is ever emitted."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if s.startswith(buf[-k:]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self, text: str) -> str:
        """The rest of the text at the end of generation."""
        out, hit = self.feed(text)
        if not hit:
            out, self.pending = out + self.pending, ""
        return out
