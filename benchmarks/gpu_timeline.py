"""Where a batched decode step's time goes on an NVIDIA GPU: every CUDA
kernel the step runs, from the driver's own trace (CUPTI, read through
torch.profiler, which records the kernels of every library in the process,
MLX's included).

    python benchmarks/gpu_timeline.py [--streams 32] [--steps 16] [--layers N]
        [--trace trace.json]

Builds the synthetic 8x7B (random 4-bit g64 weights, this machine's fast
paths), starts `--streams` sequences of a 128-token prompt in the batching
engine, lets them all decode, then traces `--steps` steps. Prints, per step:
the wall time, the GPU's busy time (the union of kernel intervals), the
kernels launched, the kernels by name (total and per-step time), the GPU's
idle gaps between kernels by length (and the longest, with the kernels
around them), the host's phases (the engine's step, the graph built,
MLX's async_eval and eval; timed over as many untraced steps first) and,
for two traced steps, beside the GPU's idle gaps, then JSON. A step's wall
time well above its busy time means the GPU waits on the host; busy time
near wall time means kernel time is what to cut.

CUDA only (needs torch with CUDA beside MLX's CUDA build).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import batch_profile, cuda_grouped, profile as prof  # noqa: E402
from mlx_hermes.batching import Batcher, Request  # noqa: E402
from mlx_hermes.specialize import FastPaths  # noqa: E402
from mlx_hermes.tiny import TOKENIZER  # noqa: E402
from mlx_hermes.tokenizer import Tokenizer  # noqa: E402


def kernels_of(trace: dict) -> list[dict]:
    """The trace's GPU kernel records: name, start and duration in us."""
    return [e for e in trace.get("traceEvents", [])
            if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]


def busy_us(kernels: list[dict]) -> float:
    """The union of the kernels' intervals (overlapping kernels count once)."""
    spans = sorted((k["ts"], k["ts"] + k["dur"]) for k in kernels)
    total, end = 0.0, float("-inf")
    for s, e in spans:
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def gaps_of(kernels: list[dict]) -> list[tuple[float, str, str, float]]:
    """The GPU's idle gaps between one kernel's end and the next start, us,
    with the kernels on either side and the gap's start."""
    spans = sorted(kernels, key=lambda k: k["ts"])
    out, end, last = [], None, ""
    for k in spans:
        if end is not None and k["ts"] > end:
            out.append((k["ts"] - end, last, short(k["name"]), end))
        if end is None or k["ts"] + k["dur"] > end:
            end, last = k["ts"] + k["dur"], short(k["name"])
    return out


GAP_BUCKETS = (2, 5, 10, 50, 1e9)  # us
HOST = {"step": "Batcher.step", "graph": "the model's graph built (Python)",
        "async_eval": "mx.async_eval: the next step encoded and launched",
        "eval": "mx.eval: waiting for this step's tokens"}


@contextlib.contextmanager
def host_phases(model, record):
    """The host's phases of a step (HOST: the batching engine's step, the
    model's graph built, MLX's async_eval and eval), each call run inside
    `record(label)`: a profiler range, or a clock (timed_phases)."""

    def wrapped(fn, label):
        def phase(*args, **kwargs):
            with record(label):
                return fn(*args, **kwargs)
        return phase

    patches = [(Batcher, "step"), (type(model), "__call__"), (mx, "async_eval"), (mx, "eval")]
    saved = [getattr(owner, name) for owner, name in patches]
    for (owner, name), fn, label in zip(patches, saved, HOST):
        setattr(owner, name, wrapped(fn, label))
    try:
        yield
    finally:
        for (owner, name), fn in zip(patches, saved):
            setattr(owner, name, fn)


def timed_phases(totals: dict):
    """A `record` for host_phases that adds each phase's seconds to `totals`."""
    @contextlib.contextmanager
    def record(label):
        t = time.perf_counter()
        try:
            yield
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - t
    return record


def host_timeline(trace: dict, gaps: list, first: int = 3, steps: int = 2) -> list[str]:
    """Lines for `steps` steps from step `first`: the host's phases and the
    GPU's idle gaps of 50 us or more, in ms from the first step's start."""
    ranges = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace["traceEvents"]
                    if e.get("cat") == "user_annotation" and e.get("name") in HOST)
    starts = [r for r in ranges if r[2] == "step"]
    if len(starts) < first + steps:
        return []
    t0, t1 = starts[first][0], starts[first + steps - 1][1]
    rows = [(a, b, f"host {name:10} {HOST[name]}") for a, b, name in ranges if t0 <= a <= t1]
    rows += [(at, at + g, f"GPU idle       after {before[:30]}, before {after[:30]}")
             for g, before, after, at in gaps if g >= 50 and t0 <= at <= t1]
    return [f"  {(a - t0) / 1e3:8.3f} - {(b - t0) / 1e3:8.3f} ms  {what}" for a, b, what in
            sorted(rows)]


def short(name: str) -> str:
    """A kernel's name without its template arguments' noise."""
    name = name.replace("void ", "")
    for cut in ("(", "<"):
        if cut in name and not name.startswith(cut):
            name = name[: name.index(cut)] + ("<...>" if cut == "<" else "")
    return name[:70]


def routing_of(model, batcher: Batcher, steps: int) -> dict:
    """How the step's tokens spread over each layer's experts, over `steps`
    more steps: the busiest expert's tokens, idle experts, and the tiles of 8
    tokens the grouped kernels run (the sum over experts of ceil(n / 8))."""
    k = model.args.num_experts_per_tok
    seen = []

    class Recording(type(model.layers[0].block_sparse_moe.gate)):
        def __call__(self, x):
            logits = super().__call__(x)
            top = mx.argpartition(-logits.astype(mx.float32), kth=k - 1, axis=-1)[..., :k]
            seen.append(top)
            return logits

    gates = [layer.block_sparse_moe.gate for layer in model.layers]
    classes = [type(g) for g in gates]
    for g in gates:
        g.__class__ = Recording
    try:
        for _ in range(steps):
            batcher.step()
    finally:
        for g, c in zip(gates, classes):
            g.__class__ = c
    E = model.args.num_local_experts
    busiest, idle, tiles = [], [], []
    for top in seen:
        counts = [0] * E
        for e in top.flatten().tolist():
            counts[e] += 1
        busiest.append(max(counts))
        idle.append(sum(c == 0 for c in counts))
        tiles.append(sum((c + 7) // 8 for c in counts))
    n = len(seen)
    return {"calls": n, "pairs": seen[0].size if seen else 0, "busiest": sum(busiest) / n,
            "idle": sum(idle) / n, "tiles": sum(tiles) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the model's 32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--portable", action="store_true", help="MLX's ops only")
    ap.add_argument("--trace", type=Path, default=None, help="keep the Chrome trace here")
    ap.add_argument("--warps", type=int, default=None,
                    help="measure with cuda_grouped.WARPS set to this (before any kernel runs)")
    args = ap.parse_args()
    if args.warps is not None:
        cuda_grouped.WARPS = args.warps

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    if not torch.cuda.is_available():
        sys.exit("gpu_timeline.py needs CUDA (torch sees no GPU)")
    paths = FastPaths.none() if args.portable else FastPaths()
    model = prof.synthetic_model("8x7b", layers=args.layers, dtype=prof.compute_dtype(),
                                 fast_paths=paths)
    tokenizer = batch_profile.without_eos(Tokenizer.from_path(TOKENIZER))
    batcher = Batcher(model, tokenizer, max_batch=args.streams)
    ids = batch_profile.prompts(args.streams, args.prompt_tokens, model.args.vocab_size, 7)
    for i, p in enumerate(ids):
        batcher.add(i, Request(p, max_tokens=2 * args.steps + 128))
    # warm up: every prompt prefilled and a few full decode steps
    full = 0
    while full < 8:
        full = full + 1 if len(batcher.step()) == args.streams else 0
    walls = []
    # the same phases untraced first: CUPTI's tracing can change what the host waits on
    untraced = {}
    with host_phases(model, timed_phases(untraced)):
        for _ in range(args.steps):
            assert len(batcher.step()) == args.streams
    with host_phases(model, record_function), profile(activities=[ProfilerActivity.CPU,
                                                                  ProfilerActivity.CUDA]) as p:
        for _ in range(args.steps):
            t = time.perf_counter()
            n = len(batcher.step())
            walls.append((time.perf_counter() - t) * 1e3)
            assert n == args.streams, n
    routing = routing_of(model, batcher, steps=4)
    batcher.close()

    trace_path = args.trace or Path(tempfile.mkstemp(suffix=".json")[1])
    p.export_chrome_trace(str(trace_path))
    trace = json.loads(trace_path.read_text())
    kernels = kernels_of(trace)
    if not kernels:
        sys.exit("the trace holds no GPU kernels (CUPTI saw none of MLX's)")
    span = (max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)) / 1e3
    busy = busy_us(kernels) / 1e3
    launches = defaultdict(float)  # host-side CUDA API time by call
    for e in trace["traceEvents"]:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e:
            launches[e["name"]] += e["dur"] / 1e3
    by_name: dict[str, list[float]] = defaultdict(list)
    for k in kernels:
        by_name[short(k["name"])].append(k["dur"] / 1e3)

    steps = args.steps
    wall = sum(walls)
    print(f"{args.streams} streams, {model.args.num_hidden_layers} layers, "
          f"{'portable' if args.portable else 'fast paths'}, {steps} steps traced")
    print(f"wall per step {wall / steps:.2f} ms (median {sorted(walls)[steps // 2]:.2f}); "
          f"kernels' span {span / steps:.2f} ms, GPU busy {busy / steps:.2f} ms "
          f"({100 * busy / span:.0f}% of the span); {len(kernels) / steps:.0f} kernels a step")
    print(f"{'kernel':72} {'n/step':>7} {'ms/step':>8} {'us each':>8}")
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    for name, durs in rows[:30]:
        print(f"{name:72} {len(durs) / steps:7.1f} {sum(durs) / steps:8.3f} "
              f"{1e3 * sum(durs) / len(durs):8.1f}")
    gaps = gaps_of(kernels)
    buckets = {b: [0, 0.0] for b in GAP_BUCKETS}
    for g, *_ in gaps:
        b = next(b for b in GAP_BUCKETS if g < b)
        buckets[b][0] += 1
        buckets[b][1] += g
    low = 0
    print("GPU idle between kernels, per step (gaps by length):")
    for b, (n, total) in buckets.items():
        label = f">= {low} us" if b == 1e9 else f"{low}-{b} us"
        print(f"  {label:12} {n / steps:7.1f} gaps {total / steps / 1e3:7.3f} ms")
        low = b
    print("longest gaps (us, after -> before):")
    for g, before, after, _ in sorted(gaps, reverse=True)[:6]:
        print(f"  {g:8.1f}  {before[:40]} -> {after[:40]}")
    inner = sum(v for k, v in untraced.items() if k != "step")
    print("host phases untraced, ms per step: " + ", ".join(
        f"{k} {1e3 * v / steps:.2f}" for k, v in untraced.items())
        + f"; the rest of a step (tokens read, bookkeeping) "
        f"{1e3 * (untraced.get('step', 0.0) - inner) / steps:.2f}")
    print("two steps, the host's phases and the GPU's idle gaps:")
    print("\n".join(host_timeline(trace, gaps)))
    print("host CUDA API calls (ms per step):")
    for name, ms in sorted(launches.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {name:50} {ms / steps:8.3f}")
    print(f"routing ({routing['calls']} layer-steps): tokens on the busiest expert "
          f"{routing['busiest']:.1f} of {routing['pairs']:.0f} pairs, idle experts "
          f"{routing['idle']:.2f}, tiles of 8 {routing['tiles']:.2f} (8 if even)")
    print(json.dumps({"routing": routing,
        "streams": args.streams, "layers": model.args.num_hidden_layers,
        "path": "portable" if args.portable else "fast paths", "steps": steps,
        "wall_ms": wall / steps, "span_ms": span / steps, "busy_ms": busy / steps,
        "kernels_per_step": len(kernels) / steps,
        "gaps": {str(b): [n / steps, total / steps / 1e3] for b, (n, total) in buckets.items()},
        "host_untraced_ms": {k: 1e3 * v / steps for k, v in untraced.items()},
        "top": {n: [len(d) / steps, sum(d) / steps] for n, d in rows[:30]},
        "host_api_ms": {n: ms / steps for n, ms in launches.items()},
    }))


if __name__ == "__main__":
    main()
