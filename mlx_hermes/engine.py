"""One model serving many requests: a bounded queue, one worker thread that
batches, a prefix cache.

The worker drives a `Batcher` (batching.py): up to `max_batch` requests are
decoded together, a new one joins at the next step (its prompt prefilled in
short chunks between decode steps), and a finished or cancelled one leaves at
once. At temperature 0 each request gets what it would get alone (exactly, in
float32 on the CPU). MLX is only ever driven from the worker thread. The queue
is bounded: a request that finds it full is refused at once (`Busy`).

Every finished request leaves its KV cache in mlx-lm's `LRUPromptCache`
under the tokens it holds; a later request that starts with those tokens
(the next turn of a chat) prefills only what is new. The cache has a byte
budget and drops the least recently used entries first: an unbounded one
once ran a Mac out of memory (mlx-lm #883).

With a quantized KV cache (`kv_bits`) requests run one at a time, through
`stream_generate`: mlx-lm's quantized cache cannot be merged into a batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from mlx_lm.models.cache import LRUPromptCache

from .batching import DEFAULT_MAX_BATCH, Batcher, Request
from .cache import check_kv_bits, make_cache, trim_to
from .errors import HermesError, first_line
from .generate import Chunk, check_context, stream_generate
from .memory import kv_budget
from .model import Model
from .sampling import SamplingParams
from .tokenizer import Tokenizer


log = logging.getLogger(__name__)


class Busy(HermesError):
    """The queue is full."""


SHUTTING_DOWN = "the server is shutting down; try again later"


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
    """The job could not run or finish; `message` is one line for the client.
    `retry` (the server is shutting down): the client may try again later,
    elsewhere or after a restart, so it is told so (HTTP 503)."""

    message: str
    retry: bool = False


Event = Union[Chunk, Done, Failed]


@dataclass(eq=False)  # a job is its own key in the batch
class Job:
    ids: list[int]
    options: dict  # max_tokens, sampling, stop: keyword arguments of `stream_generate`
    sink: Callable[[Event], None]  # called on the worker thread, in order
    cancelled: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False  # cancelled because the engine closes: the client gets Failed
    sink_failed: bool = False  # its sink raised: nothing more goes to it
    generated: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        """Stop before the next step (or skip it if queued)."""
        self.cancelled.set()

    def request(self) -> Request:
        o = self.options
        sampling = o.get("sampling") or SamplingParams.pick(o)[0]
        return Request(self.ids, max_tokens=o.get("max_tokens", 256), sampling=sampling,
                       stop=tuple(o.get("stop") or ()), logprobs=o.get("logprobs"),
                       json_schema=o.get("json_schema"), grammar=o.get("grammar"))


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, *,
                 max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = 32,
                 cache_bytes: int = 2 << 30, kv_bits: Optional[int] = None,
                 kv_budget_bytes: Optional[int] = None):
        check_kv_bits(kv_bits)
        if kv_bits is not None and max_batch > 1:
            raise HermesError("--kv-bits runs one request at a time (mlx-lm's quantized KV "
                              "cache cannot join a batch): add --max-batch 1, or drop --kv-bits")
        self.model = model
        self.tokenizer = tokenizer
        self.kv_bits = kv_bits
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prompt_cache = LRUPromptCache(max_size=64, max_bytes=cache_bytes)
        self.kv_budget = kv_budget(cache_bytes) if kv_budget_bytes is None else kv_budget_bytes
        self.batcher = None if kv_bits is not None else self._batcher()
        self._jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet taken by the worker
        self._active: list[Job] = []  # taken by the worker, not finished
        self.finished = threading.Event()  # the worker has stopped working (it stays parked)
        self._closing = False
        self._worker = threading.Thread(target=_work_then_park, args=(weakref.ref(self),),
                                        name="mlx-hermes-engine", daemon=True)
        self._worker.start()

    def _batcher(self) -> Batcher:
        return Batcher(self.model, self.tokenizer, max_batch=self.max_batch,
                       kv_budget_bytes=self.kv_budget, prompt_cache=self.prompt_cache)

    @property
    def running(self) -> int:
        """Requests being prefilled or decoded."""
        if self.batcher is None:
            return len(self._active)
        return self.batcher.running

    @property
    def waiting(self) -> int:
        """Requests waiting for a place in the batch."""
        return self._queued + (self.batcher.waiting if self.batcher is not None else 0)

    def submit(self, ids: list[int], options: dict, sink: Callable[[Event], None]) -> Job:
        """Queue a generation; its events go to `sink`. Raises Busy when the
        queue is full, HermesError when the request can never run here."""
        job = Job(list(ids), options, sink)
        if self.batcher is not None:
            self.batcher.check(job.request())
        else:
            check_context(self.model, len(ids), options.get("max_tokens", 256))
        with self._lock:
            if self.waiting >= self.max_queue:
                raise Busy(f"the server is busy: {self.waiting} requests are waiting")
            self._queued += 1
        self._jobs.put(job)
        return job

    def cancel_all(self) -> None:
        """Shutting down: stop the running jobs before their next step, and
        every waiting one; each ends with Failed(retry=True), never as if
        its reply were complete."""
        for job in list(self._jobs.queue) + list(self._active):
            if job is not None:
                job.shutdown = True
                job.cancel()

    def close(self, timeout: float = 30) -> bool:
        """Stop every job and the worker's work; True once it has finished.

        The worker thread itself is never ended: it parks. A thread that
        ends destroys its thread-local MLX state (compiled functions, mlx-lm's
        samplers) on its way out, and at interpreter shutdown that can call
        into a Python that is already finalizing and abort the process
        (SIGABRT, `terminate called without an active exception`). A parked
        daemon thread is simply not run again."""
        self.cancel_all()
        self._jobs.put(None)
        return self.finished.wait(timeout)

    # ---- the worker ----------------------------------------------------------------------

    def _take(self, block: bool) -> list[Job]:
        """Jobs submitted since the last step (waiting for one if `block`).
        Sets `_closing` when close() was called."""
        jobs = []
        try:
            while True:
                job = self._jobs.get(block=block and not jobs)
                if job is None:
                    self._closing = True
                    return jobs
                with self._lock:
                    self._queued -= 1
                jobs.append(job)
                if self.batcher is None:
                    return jobs  # one at a time
        except queue.Empty:
            return jobs

    def _work(self) -> None:
        try:
            self._run()
        except BaseException:  # never expected: the worker must still finish and park
            log.exception("the engine's worker failed")
        finally:
            self._fail_left()
            self.finished.set()
            log.info("engine stopped")

    def _fail_left(self) -> None:
        """Every job still here ends: the server is going away."""
        left = list(self._active)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                left.append(job)
        for job in left:
            _deliver(job, Failed(SHUTTING_DOWN, retry=True))
        self._active.clear()

    def _run(self) -> None:
        while not self._closing:
            jobs = self._take(block=self.batcher is None or not self.batcher.busy)
            for job in jobs:
                if job.cancelled.is_set():
                    _deliver(job, Failed(SHUTTING_DOWN, retry=True) if job.shutdown
                             else Failed("cancelled before it started"))
                elif self.batcher is None:
                    self._alone(job)
                else:
                    self._join(job)
            if self.batcher is not None and not self._closing:
                self._step()
        if self.batcher is not None:
            self.batcher.close()

    def _join(self, job: Job) -> None:
        try:
            self.batcher.add(job, job.request())
        except Exception as e:
            log.exception("request failed: %s", first_line(e))
            _deliver(job, Failed(first_line(e)))
            return
        self._active.append(job)

    def _step(self) -> None:
        for job in [j for j in self._active if j.cancelled.is_set()]:
            self._finish(job, "cancelled", self.batcher.cancel(job))
        try:
            events = self.batcher.step()
        except Exception as e:  # a request must never take the server down
            log.exception("a batch step failed: %s", first_line(e))
            for job in list(self._active):
                _deliver(job, Failed(first_line(e)))
            self._active.clear()
            try:
                self.batcher.close()
            except Exception:
                log.exception("closing the failed batch")
            self.batcher = self._batcher()
            return
        for job, e in self.batcher.failed():
            log.error("request failed: %s", first_line(e), exc_info=e)
            self._active.remove(job)
            _deliver(job, Failed(first_line(e)))
        for job, chunk in events:
            job.generated.append(chunk.token)
            _deliver(job, chunk)
            if chunk.finish_reason:
                self._finish(job, chunk.finish_reason, chunk.stats)

    def _finish(self, job: Job, reason: str, stats: Optional[dict]) -> None:
        self._active.remove(job)
        if reason == "cancelled" and job.shutdown:
            _deliver(job, Failed(SHUTTING_DOWN, retry=True))
            return
        stats = stats or {}
        _deliver(job, Done(reason, len(job.ids), stats.get("cached_tokens", 0),
                           len(job.generated), stats.get("ttft_s", 0.0),
                           stats.get("decode_s", 0.0), job.ids + job.generated))

    def _alone(self, job: Job) -> None:
        self._active.append(job)
        try:
            self._generate(job)
        except Exception as e:  # a request must never take the server down
            log.exception("request failed: %s", first_line(e))
            _deliver(job, Failed(first_line(e)))
        finally:
            self._active.remove(job)

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
        if finish == "cancelled" and job.shutdown:
            _deliver(job, Failed(SHUTTING_DOWN, retry=True))
            return
        _deliver(job, Done(finish, len(ids), cached, len(generated), first - start, end - first,
                           known))


def _work_then_park(engine_ref: "weakref.ref[Engine]") -> None:
    """The worker thread: the engine's work, then parked until the process
    ends (see Engine.close), holding no reference to the engine, so that a
    closed engine (its model, its caches) can still be freed."""
    engine = engine_ref()
    if engine is not None:
        engine._work()
    del engine
    threading.Event().wait()


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
