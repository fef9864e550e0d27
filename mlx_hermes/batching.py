"""Continuous batching: many sequences decoded together, one step at a time.

A decoded token reads every dense weight of the model; N sequences decoded in
one step share those reads, and on Metal, from 16 streams up, each expert's
reads too (moe.py's sort rule). The stepping is mlx-lm's `BatchGenerator`:
prompts are prefilled in chunks between decode steps, sequences of different
lengths share a left-padded `BatchKVCache` with masks, and join and leave at
any step. (Per-sequence caches would need one attention call per sequence and
layer; the padded cache keeps one per layer, and its padding is trimmed
whenever the longest sequence leaves.)

What this module adds, and why it is ours:
- **Memory admission.** A sequence reserves KV cache for its prompt plus its
  `max_tokens` when it is admitted, and is admitted only while the batch's
  cache fits the budget (`memory.kv_budget`: on a Mac the GPU working set
  less the weights). It is never preempted: what runs, finishes. A request
  waits until it fits; one that cannot fit even alone is refused by `check`.
  mlx-lm's generator admits by count only.
- **What a sequence's tokens become** (`Continuation`, shared with the
  single-stream path): whole characters, stop strings, end-of-turn tokens,
  statistics. mlx-lm's generator stops on token sequences, not text.
- **Each sequence's own sampler and seed** (`SamplingParams`): greedy rows
  share one sampler and are sampled in one call.
- **A prefix cache** (mlx-lm's `LRUPromptCache`): an admitted sequence starts
  from the longest cached prefix of its prompt, and leaves its cache behind.
- **Short prefill chunks while others decode** (`busy_prefill_step_size`):
  a prompt joining a busy batch delays each running stream by at most one
  chunk per step; an idle batch prefills in long chunks.

At temperature 0, in float32 on the CPU, every sequence gets exactly the
tokens it gets alone (tests). In bf16 on a GPU, batched matrix products may
round differently, so a batched sequence can part from its solo text after a
near tie.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache, LRUPromptCache

from . import grammar
from .cache import trim_to
from .errors import HermesError
from .generate import (Chunk, Continuation, Prompt, check_context, prompt_ids, sampling_of,
                       token_logprob)
from .memory import GB, kv_budget
from .model import Model
from .sampling import SamplingParams, greedy
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# On Metal, MLX's gathered quantized matmul reads an expert once for all of
# its tokens only from 4 token-expert pairs per expert on average (moe.py):
# with 8 experts and top-2 that is 16 sequences. Below it the dense weights
# are still shared, the experts are not.
DEFAULT_MAX_BATCH = 16
# Prompt tokens prefilled per step while other sequences decode: the most a
# running stream waits for a newcomer per token. Long prompts run in chunks of
# PREFILL_STEP_SIZE when nothing else is decoding.
BUSY_PREFILL_STEP_SIZE = 256
PREFILL_STEP_SIZE = 2048
IDLE_PREFILL_BATCH = 8  # prompts prefilled together when nothing decodes


@dataclass
class Request:
    """One prompt to continue, and how."""

    ids: list[int]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    logits_processors: Sequence[Callable] = ()
    logprobs: Optional[int] = None  # each token's TokenLogprob, with this many alternatives
    json_schema: Any = None  # the reply is JSON matching it (grammar.py); True: any object
    grammar: Optional[str] = None  # or matches this llguidance grammar (tools.call_grammar)


# what a request may set, besides SamplingParams' fields and `sampling`
REQUEST_OPTIONS = ("max_tokens", "stop", "logits_processors", "logprobs", "json_schema",
                   "grammar")


def make_request(tokenizer: Tokenizer, prompt: Prompt, options: dict) -> Request:
    """A Request from a prompt (text or ids) and `generate`'s options."""
    options = dict(options)
    sampling = options.pop("sampling", None)
    mine = {k: options.pop(k) for k in REQUEST_OPTIONS if k in options}
    mine = {k: v for k, v in mine.items() if v is not None}
    if options.pop("kv_bits", None) is not None:
        raise HermesError("kv_bits cannot be used with batching: mlx-lm's quantized KV cache "
                          "cannot join a batch; generate one prompt at a time instead")
    options.pop("prefill_step_size", None)
    request = Request(prompt_ids(tokenizer, prompt), sampling=sampling_of(sampling, options),
                      **mine)
    if isinstance(request.stop, str):
        request.stop = (request.stop,)
    if request.max_tokens < 1:
        raise HermesError(f"max_tokens must be at least 1, got {request.max_tokens}")
    if request.json_schema is not None:
        grammar.compile_schema(tokenizer, request.json_schema)  # a bad schema fails now
    return request


class _Sequence:
    def __init__(self, key: Hashable, request: Request, tokenizer: Tokenizer):
        self.key = key
        self.request = request
        self.added = time.perf_counter()
        self.uid: Optional[int] = None  # BatchGenerator's, once admitted
        self.decoding = False  # its prompt is prefilled
        self.reply = Continuation(tokenizer, len(request.ids), request.max_tokens, request.stop)

    @property
    def reservation(self) -> int:
        """Tokens of KV cache it may come to hold (the cache grows in steps)."""
        return len(self.request.ids) + self.request.max_tokens + BatchKVCache.step


class Batcher:
    """Sequences decoded together: `add` them (keyed as you like), call `step`
    until `busy` is false; each step gives `(key, Chunk)` pairs, the last
    chunk of a sequence with `finish_reason` and `stats`. Driven from one
    thread."""

    def __init__(self, model: Model, tokenizer: Tokenizer, *,
                 max_batch: int = DEFAULT_MAX_BATCH, kv_budget_bytes: Optional[int] = None,
                 prompt_cache: Optional[LRUPromptCache] = None,
                 prefill_step_size: int = PREFILL_STEP_SIZE,
                 busy_prefill_step_size: int = BUSY_PREFILL_STEP_SIZE,
                 progress: Optional[Callable[[Hashable, int, int], None]] = None):
        if getattr(model, "coordination", None) is not None:
            raise HermesError("batching runs on one machine: a model split over several "
                              "(mlx.launch) generates one sequence at a time")
        if max_batch < 1:
            raise HermesError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.kv_budget = kv_budget_bytes if kv_budget_bytes is not None else kv_budget()
        self.token_bytes = kv_token_bytes(model)
        self.prompt_cache = prompt_cache
        self.prefill_step_size = prefill_step_size
        self.busy_prefill_step_size = busy_prefill_step_size
        self.progress = progress
        self._gen = BatchGenerator(
            model, sampler=greedy, completion_batch_size=max_batch,
            prefill_batch_size=min(IDLE_PREFILL_BATCH, max_batch),
            prefill_step_size=prefill_step_size,
            stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)])
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}  # by uid
        self._keys: dict[Hashable, _Sequence] = {}
        self._failed: list[tuple[Hashable, Exception]] = []

    # ---- what is here ------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._keys)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def kv_bytes(self, reservations: Iterable[int]) -> int:
        """KV cache a batch of these reservations may take: each row of the
        left-padded cache is as long as the longest, and joining or growing
        copies the cache, so twice that."""
        reservations = list(reservations)
        if not reservations:
            return 0
        return 2 * len(reservations) * max(reservations) * self.token_bytes

    def check(self, request: Request) -> None:
        """Raise a HermesError if `request` can never run here."""
        check_context(self.model, len(request.ids), request.max_tokens)
        need = self.kv_bytes([_Sequence(None, request, self.tokenizer).reservation])
        if need > self.kv_budget:
            raise HermesError(
                f"the prompt ({len(request.ids)} tokens) plus max_tokens ({request.max_tokens}) "
                f"needs {need / GB:.2f} GB of KV cache, but only {self.kv_budget / GB:.2f} GB "
                "is free for it: ask for fewer tokens")

    # ---- changes -----------------------------------------------------------------------

    def add(self, key: Hashable, request: Request) -> None:
        """Queue a sequence; it joins the batch at a step where it fits."""
        if key in self._keys:
            raise HermesError(f"a sequence with key {key!r} is already here")
        self.check(request)
        seq = _Sequence(key, request, self.tokenizer)
        self._keys[key] = seq
        self._waiting.append(seq)

    def cancel(self, key: Hashable) -> Optional[dict]:
        """Drop a sequence now; its statistics, or None if it is not here."""
        seq = self._keys.pop(key, None)
        if seq is None:
            return None
        if seq.uid is None:
            self._waiting.remove(seq)
        else:
            del self._running[seq.uid]
            removed = self._gen.remove([seq.uid], return_prompt_caches=seq.decoding)
            if seq.uid in removed:
                self._keep(*removed[seq.uid][::-1])
        return seq.reply.stats()

    def close(self) -> None:
        """Drop every sequence (keeping nothing: this may follow a step that
        was interrupted half-way) and give back the wired memory limit."""
        self._waiting.clear()
        self._running.clear()
        self._keys.clear()
        self._gen.close()

    def failed(self) -> list[tuple[Hashable, Exception]]:
        """Sequences dropped since the last call because they could not start
        (e.g. a logits processor that raised), with what went wrong."""
        failed, self._failed = self._failed, []
        return failed

    def step(self) -> list[tuple[Hashable, Chunk]]:
        """Admit what fits, then one decode step for the running sequences
        (and one prefill chunk for joining ones)."""
        self._admit()
        if not self._running:
            return []
        decoding = any(s.decoding for s in self._running.values())
        # read by BatchGenerator at every step: short chunks while others decode
        self._gen.prefill_step_size = (self.busy_prefill_step_size if decoding
                                       else self.prefill_step_size)
        self._gen.prefill_batch_size = 1 if decoding else min(IDLE_PREFILL_BATCH, self.max_batch)
        prompt_responses, responses = self._gen.next()
        for p in prompt_responses:
            seq = self._running[p.uid]
            seq.decoding = seq.decoding or p.end_of_prompt
            if self.progress is not None:
                self.progress(seq.key, *p.progress)
        events = []
        for r in responses:
            seq = self._running[r.uid]
            top = seq.request.logprobs
            chunk = seq.reply.add(r.token, None if top is None else
                                  token_logprob(r.logprobs, r.token, top))
            events.append((seq.key, chunk))
            if chunk.finish_reason is None:
                continue
            del self._running[r.uid], self._keys[seq.key]
            if r.finish_reason is None:  # a stop string: the generator does not know
                cache, tokens = self._gen.remove([r.uid], return_prompt_caches=True)[r.uid]
            else:
                cache, tokens = r.prompt_cache, r.all_tokens
            self._keep(tokens, cache)
        return events

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            reservations = [s.reservation for s in self._running.values()] + [seq.reservation]
            if self._running and self.kv_bytes(reservations) > self.kv_budget:
                return  # it waits for a running sequence to finish
            self._waiting.popleft()
            try:
                self._start(seq)
            except Exception as e:  # this sequence fails alone; failed() tells
                del self._keys[seq.key]
                self._failed.append((seq.key, e))

    def _start(self, seq: _Sequence) -> None:
        ids = seq.request.ids
        cache, rest = (None, ids) if self.prompt_cache is None else (
            self.prompt_cache.fetch_nearest_cache("model", ids))
        if cache is not None and not rest:  # all cached: recompute the last for its logits
            trim_to(cache, len(ids) - 1)
            rest = ids[-1:]
        cached = len(ids) - len(rest)
        request = seq.request
        (seq.uid,) = self._gen.insert(
            [rest], max_tokens=[request.max_tokens],
            caches=None if cache is None else [cache],
            all_tokens=[ids[:cached]],
            samplers=[request.sampling.sampler()],
            logits_processors=[request.sampling.logits_processors()
                               + list(request.logits_processors)
                               + grammar.constraint(self.tokenizer, request.json_schema,
                                                    request.grammar)])
        seq.reply.cached_tokens = cached
        seq.reply.start = time.perf_counter()
        self._running[seq.uid] = seq
        log.debug("sequence %r joins: %d prompt tokens (%d cached), %d running", seq.key,
                  len(ids), cached, len(self._running))

    def _keep(self, tokens: list[int], cache: Optional[list]) -> None:
        """A finished sequence's KV cache into the prefix cache."""
        if self.prompt_cache is None or not cache or not tokens:
            return
        keep = trim_to(cache, len(tokens))
        if keep > 0:
            self.prompt_cache.insert_cache("model", list(tokens[:keep]), cache)


def kv_token_bytes(model: Model) -> int:
    """Bytes of KV cache per token, at the model's activation dtype."""
    a = model.args
    itemsize = model.model.norm.weight.dtype.size
    return 2 * a.num_hidden_layers * a.num_key_value_heads * a.dims_per_head * itemsize


# ---- the Python API ----------------------------------------------------------------------

def stream_batch_generate(model: Model, tokenizer: Tokenizer, prompts: Sequence[Prompt], *,
                          max_batch: int = DEFAULT_MAX_BATCH,
                          per_prompt: Optional[Sequence[dict]] = None,
                          progress: Optional[Callable[[int, int], None]] = None,
                          **options: Any) -> Iterator[tuple[int, Chunk]]:
    """Generate from every prompt, up to `max_batch` at a time, yielding
    `(index, Chunk)` pairs as tokens arrive (each prompt's last chunk has
    `finish_reason` and `stats`). `options` are `generate`'s (max_tokens,
    stop, temp, top_p, seed, ...) for every prompt; `per_prompt[i]` overrides
    them for prompt i (e.g. its own `max_tokens`, `stop` or `seed`). Prompts
    are text (as `generate` takes it) or token ids. `progress(done, total)`
    is called as prompts finish."""
    if per_prompt is not None and len(per_prompt) != len(prompts):
        raise HermesError(f"per_prompt has {len(per_prompt)} entries for {len(prompts)} prompts")
    requests = [make_request(tokenizer, p, {**options, **(per_prompt[i] if per_prompt else {})})
                for i, p in enumerate(prompts)]
    batcher = Batcher(model, tokenizer, max_batch=max_batch)
    try:
        for i, request in enumerate(requests):
            batcher.add(i, request)
        done = 0
        while batcher.busy:
            events = batcher.step()
            for i, e in batcher.failed():
                raise e
            for i, chunk in events:
                yield i, chunk
                if chunk.finish_reason and progress is not None:
                    done += 1
                    progress(done, len(requests))
    finally:
        batcher.close()
        mx.clear_cache()


def batch_generate(model: Model, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                   **options: Any) -> list[str]:
    """Each prompt's completion, in the order of `prompts`; options as for
    `stream_batch_generate`."""
    texts = [[] for _ in prompts]
    for i, chunk in stream_batch_generate(model, tokenizer, prompts, **options):
        texts[i].append(chunk.text)
    return ["".join(t) for t in texts]
