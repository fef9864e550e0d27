"""`profile --batch`: decode throughput with several streams at once.

For each batch size B, B random prompts run through the batching engine
(batching.Batcher), end-of-text ignored so that every stream runs its full
length. The figure is taken over the steps where all B streams decode (after
the last has joined, before the first has finished): aggregate tok/s, per
stream tok/s, and the weight bytes such a step reads (the dense weights once,
and each layer's distinct experts: E * (1 - (1 - k/E)^B) of them for
uniformly random routing, an estimate). With `mlx_lm`, mlx-lm's own
`BatchGenerator` runs the same prompts on its twin of the model, in
alternating rounds; medians are reported.

`join` measures what a newcomer meets: the time to first token of a request
joining a batch of B running streams, against its time alone, and the
longest gap the running streams see while it prefills.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from .batching import Batcher, Request
from .errors import HermesError
from .model import Model
from .profile import _nbytes, bytes_per_token
from .tokenizer import Tokenizer


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, min(vocab, 32000), size=length - 1).tolist()
            for _ in range(n)]


def without_eos(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with no end-of-text tokens, so that a random model runs
    every stream to max_tokens (as mlx-lm's generator with no stop tokens)."""
    t = copy.copy(tokenizer)
    t.eos_token_ids = frozenset()
    return t


def _window(step: Callable[[], int], size: int) -> tuple[float, int, int]:
    """Step until no stream is left: (seconds, steps) over the steps where
    all `size` streams produced a token, and the steps in all."""
    seconds, full, steps, started = 0.0, 0, 0, False
    while True:
        t = time.perf_counter()
        n = step()
        dt = time.perf_counter() - t
        if n < 0:
            break
        steps += 1
        if n == size:
            if started:  # the first full step also finished the last prefill
                seconds, full = seconds + dt, full + 1
            started = True
        elif started and n < size:
            break  # the first stream finished
    return seconds, full, steps


def ours(model: Model, tokenizer: Tokenizer, batch: list[list[int]], gen_tokens: int) -> dict:
    batcher = Batcher(model, without_eos(tokenizer), max_batch=len(batch))
    for i, ids in enumerate(batch):
        batcher.add(i, Request(ids, max_tokens=gen_tokens))
    mx.reset_peak_memory()

    def step() -> int:
        return len(batcher.step()) if batcher.busy else -1

    try:
        seconds, full, _ = _window(step, len(batch))
    finally:
        batcher.close()
    return _rates(len(batch), seconds, full)


def mlx_lm(twin, batch: list[list[int]], gen_tokens: int) -> dict:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(twin, max_tokens=gen_tokens, completion_batch_size=max(32, len(batch)))
    gen.insert(batch)
    mx.reset_peak_memory()
    left = [len(batch)]

    def step() -> int:
        if not left[0]:
            return -1
        responses = gen.next_generated()
        left[0] -= sum(r.finish_reason is not None for r in responses)
        return len(responses)

    try:
        seconds, full, _ = _window(step, len(batch))
    finally:
        gen.close()
    return _rates(len(batch), seconds, full)


def _rates(size: int, seconds: float, full: int) -> dict:
    if full == 0 or seconds <= 0:
        raise HermesError(f"no step ran all {size} streams: give more --gen-tokens")
    return {"aggregate_tps": size * full / seconds, "per_stream_tps": full / seconds,
            "step_ms": 1e3 * seconds / full, "peak_memory_gb": mx.get_peak_memory() / 1e9}


def bytes_per_step(model: Model, size: int, full_layers: Optional[int] = None) -> float:
    """Weight bytes one decode step of `size` streams reads (uniform routing)."""
    a = model.args
    single = bytes_per_token(model, full_layers)
    experts = sum(_nbytes(layer.block_sparse_moe.switch_mlp) for layer in model.layers)
    experts *= (full_layers or len(model.layers)) / len(model.layers)
    k, e = a.num_experts_per_tok, a.num_local_experts
    dense = single - experts * k / e
    return dense + experts * (1 - (1 - k / e) ** size)


def measure(model: Model, tokenizer: Tokenizer, sizes: Sequence[int], *,
            prompt_tokens: int = 128, gen_tokens: int = 128, rounds: int = 3,
            twin=None, seed: int = 0,
            progress: Optional[Callable[[str], None]] = None) -> dict:
    """Medians over `rounds` of ours (and mlx-lm's on `twin`, alternating) at
    each batch size."""
    if not sizes or min(sizes) < 1:
        raise HermesError("batch sizes must be 1 or more")
    if gen_tokens < 4:
        raise HermesError("--gen-tokens must be at least 4 to time a batch")
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(rounds):
        for size in sizes:
            batch = prompts(size, prompt_tokens, model.args.vocab_size, seed + size)
            mine = ours(model, tokenizer, batch, gen_tokens)
            runs.setdefault(("ours", size), []).append(mine)
            said = f"round {r + 1}/{rounds}, {size} streams: {mine['aggregate_tps']:.1f} tok/s"
            if twin is not None:
                theirs = mlx_lm(twin, batch, gen_tokens)
                runs.setdefault(("mlx_lm", size), []).append(theirs)
                said += f" (mlx-lm {theirs['aggregate_tps']:.1f})"
            if progress:
                progress(said)
    rows = []
    for size in sizes:
        row = {"batch": size, **_median(runs[("ours", size)])}
        row["gbs"] = bytes_per_step(model, size) * row["aggregate_tps"] / size / 1e9
        if twin is not None:
            theirs = _median(runs[("mlx_lm", size)])
            row["mlx_lm"] = theirs
            row["vs_mlx_lm"] = row["aggregate_tps"] / theirs["aggregate_tps"]
        rows.append(row)
    single = next((row for row in rows if row["batch"] == 1), None)
    for row in rows:
        row["vs_one_stream"] = row["aggregate_tps"] / single["aggregate_tps"] if single else None
    return {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "rounds": rounds,
            "rows": rows}


def _median(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def join(model: Model, tokenizer: Tokenizer, running: int, prompt_tokens: int = 128,
         gen_tokens: int = 64, seed: int = 1) -> dict:
    """A request joining `running` decoding streams: its time to first token,
    its time alone, and the longest step the running streams saw meanwhile
    against their median step."""
    tok = without_eos(tokenizer)
    newcomer = prompts(1, prompt_tokens, model.args.vocab_size, seed + 1000)[0]

    alone = Batcher(model, tok, max_batch=1)
    alone.add("new", Request(newcomer, max_tokens=2))
    t = time.perf_counter()
    while not alone.step():
        pass
    solo_ttft = time.perf_counter() - t
    alone.close()

    batcher = Batcher(model, tok, max_batch=running + 1)
    for i, ids in enumerate(prompts(running, prompt_tokens, model.args.vocab_size, seed)):
        batcher.add(i, Request(ids, max_tokens=gen_tokens * 4))
    steps = []
    while len(steps) < 8:  # all running and warm
        t = time.perf_counter()
        if len(batcher.step()) == running:
            steps.append(time.perf_counter() - t)
    batcher.add("new", Request(newcomer, max_tokens=2))
    t0, longest = time.perf_counter(), 0.0
    while True:
        t = time.perf_counter()
        events = batcher.step()
        longest = max(longest, time.perf_counter() - t)
        if any(key == "new" for key, _ in events):
            break
    ttft = time.perf_counter() - t0
    batcher.close()
    return {"running": running, "ttft_s": ttft, "solo_ttft_s": solo_ttft,
            "ttft_vs_solo": ttft / solo_ttft, "median_step_ms": 1e3 * statistics.median(steps),
            "longest_step_ms": 1e3 * longest}


def format_table(result: dict) -> str:
    compare = any("mlx_lm" in row for row in result["rows"])
    head = (f"batched decode, {result['prompt_tokens']}-token prompts, {result['gen_tokens']} "
            f"tokens each, medians of {result['rounds']} rounds")
    cols = "streams  aggregate tok/s  per stream  vs 1 stream   GB/s  peak GB"
    if compare:
        cols += "  mlx-lm tok/s  ours/mlx-lm"
    lines = [head, cols]
    for row in result["rows"]:
        vs = f"{row['vs_one_stream']:.2f}x" if row["vs_one_stream"] else "-"
        line = (f"{row['batch']:>7}  {row['aggregate_tps']:>15.1f}  {row['per_stream_tps']:>10.1f}"
                f"  {vs:>11}  {row['gbs']:>5.0f}  {row['peak_memory_gb']:>7.2f}")
        if compare:
            line += f"  {row['mlx_lm']['aggregate_tps']:>12.1f}  {row['vs_mlx_lm']:>10.2f}x"
        lines.append(line)
    lines.append("GB/s: weight bytes a step reads (dense once, distinct experts for uniform "
                 "routing) x steps/s; an estimate")
    return "\n".join(lines)
