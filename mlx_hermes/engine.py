"""One model serving many requests: a queue, one worker thread, a prefix cache.

Requests run one at a time on a single worker thread, so at temperature 0
each gets exactly what it would get alone, and MLX is only ever driven from
one thread. The queue is bounded: a request that finds it full is refused at
once (`Busy`) instead of piling up.

Every finished request leaves its KV cache in mlx-lm's `LRUPromptCache`
under the tokens it holds; a later request that starts with those tokens
(the next turn of a chat) prefills only what is new. The cache has a byte
budget and drops the least recently used entries first: an unbounded one
once ran a Mac out of memory (mlx-lm #883).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from mlx_lm.models.cache import LRUPromptCache

from .cache import make_cache, trim_to
from .errors import HermesError, first_line
from .generate import Chunk, stream_generate
from .model import Model
from .tokenizer import Tokenizer


log = logging.getLogger(__name__)


class Busy(HermesError):
    """The queue is full."""


@dataclass
class Done:
    """The last event of a job: how it ended and what it cost."""

    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int  # the whole prompt
    cached_tokens: int  # of which came from the prefix cache
    generated_tokens: int
    prefill_s: float
    decode_s: float
    ids: list[int] = field(repr=False)  # prompt + generated: what the cache now holds


@dataclass
class Failed:
    """The job could not run; `message` is one line for the client."""

    message: str


Event = Union[Chunk, Done, Failed]


@dataclass
class Job:
    ids: list[int]
    options: dict  # keyword arguments of `stream_generate`
    sink: Callable[[Event], None]  # called on the worker thread, in order
    cancelled: threading.Event = field(default_factory=threading.Event)
    sink_failed: bool = False  # its sink raised: nothing more goes to it

    def cancel(self) -> None:
        """Stop as soon as the current token is done (or skip it if queued)."""
        self.cancelled.set()


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, *, max_queue: int = 32,
                 cache_bytes: int = 2 << 30, kv_bits: Optional[int] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.kv_bits = kv_bits
        self.max_queue = max_queue
        self.prompt_cache = LRUPromptCache(max_size=64, max_bytes=cache_bytes)
        self._jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.active: Optional[Job] = None
        self._worker = threading.Thread(target=self._run, name="mlx-hermes-engine", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, ids: list[int], options: dict, sink: Callable[[Event], None]) -> Job:
        """Queue a generation; its events go to `sink`. Raises Busy when full."""
        job = Job(list(ids), options, sink)
        with self._lock:
            if self._waiting >= self.max_queue:
                raise Busy(f"the server is busy: {self._waiting} requests are waiting")
            self._waiting += 1
        self._jobs.put(job)
        return job

    def cancel_all(self) -> None:
        """Stop the running job after its current token, and every waiting one."""
        for job in list(self._jobs.queue):
            if job is not None:
                job.cancel()
        active = self.active
        if active is not None:
            active.cancel()

    def close(self) -> None:
        """Stop every job and the worker."""
        self.cancel_all()
        self._jobs.put(None)
        self._worker.join(timeout=30)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
            if job.cancelled.is_set():
                _deliver(job, Failed("cancelled before it started"))
                continue
            self.active = job
            try:
                self._generate(job)
            except Exception as e:  # a request must never take the server down
                log.exception("request failed: %s", first_line(e))
                _deliver(job, Failed(first_line(e)))
            finally:
                self.active = None

    def _generate(self, job: Job) -> None:
        ids = job.ids
        cache, rest = self.prompt_cache.fetch_nearest_cache("model", ids)
        if cache is None:
            cache, rest = make_cache(self.model, self.kv_bits), ids
        elif not rest:  # the whole prompt is cached: recompute its last token for the logits
            trim_to(cache, len(ids) - 1)
            rest = ids[-1:]
        cached = len(ids) - len(rest)

        generated: list[int] = []
        finish, start, first = "cancelled", time.perf_counter(), None
        chunks = stream_generate(self.model, self.tokenizer, rest, cache=cache, **job.options)
        try:
            for chunk in chunks:
                first = first or time.perf_counter()
                generated.append(chunk.token)
                if not _deliver(job, chunk):
                    break
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                if job.cancelled.is_set():
                    break
        finally:
            chunks.close()
            known = ids + generated
            keep = trim_to(cache, len(known))
            if keep > 0:
                self.prompt_cache.insert_cache("model", known[:keep], cache)
        end = time.perf_counter()
        first = first or end
        _deliver(job, Done(finish, len(ids), cached, len(generated), first - start, end - first,
                           known))


def _deliver(job: Job, event: Event) -> bool:
    """Hand an event to the job's sink. A sink that raises (its client's
    connection broke in a way nobody foresaw) cancels its job and is logged;
    the worker, and every other request, carries on; later events of the job
    are dropped. False if the sink has failed."""
    if job.sink_failed:
        return False
    try:
        job.sink(event)
        return True
    except Exception:
        log.exception("a request's event sink failed; its generation stops")
        job.sink_failed = True
        job.cancel()
        return False
