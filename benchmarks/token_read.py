"""Reading a batched step's tokens on CUDA: does it wait behind the next
step's kernels, and which way of reading does not?

    python benchmarks/token_read.py [--streams 32] [--steps 24] [--rounds 3] [--json F]
    python benchmarks/token_read.py --synthetic tiny   # any device: the variants run

Why: at 32 streams on an H200 the batching engine's step is bound by the
host (benchmarks/gpu_timeline.py, 2026-11-28): building the graph 6.2 ms,
`mx.async_eval` 6.9 ms, and ~7.9 ms after `mx.eval` of the step's tokens,
most of it `tolist()`: a 128-byte copy from device memory that the GPU ran
only after ~12 ms of the next step's already-launched kernels. A synthetic
loop (400 small matmuls a step) did not wait so.

mlx-lm's `GenerationBatch._step` (what our batching engine steps with)
launches step n+1 with `mx.async_eval` and then reads step n's tokens. This
runs the engine on the synthetic 8x7B with that method replaced by variants,
alternating, on one running batch of `--streams` streams:

- `mlx-lm`: mlx-lm's own method;
- `same order`: this file's copy of it (checks that the copy is faithful);
- `read first`: step n's tokens read before step n+1 is launched (the GPU
  then idles while the first of step n+1's kernels are encoded);
- `kernel copy`: the sampled tokens copied by a one-line `mx.fast.cuda_kernel`
  (whose output MLX may allocate in managed memory: then no copy at read
  time), read in mlx-lm's order.

`--streams 1` asks the same of one stream: mlx-lm's `generate_step`, which
`generate` and `chat` use, launches and reads in the same order.

Prints, per variant, the median step (ms and tok/s) and the host's phases
(graph built, async_eval, eval, and tolist where this file's copy times it;
ms a step), then JSON. The 8x7B on CUDA only (`--synthetic tiny` runs the
others anywhere); no logits processors (greedy rows, one sampler).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import GenerationBatch as Batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timeline import host_phases, timed_phases  # noqa: E402
from grouped_kernel import _gpu_name  # noqa: E402
from mlx_hermes import batch_profile, profile as prof  # noqa: E402
from mlx_hermes.batching import Batcher, Request  # noqa: E402
from mlx_hermes.tiny import TOKENIZER  # noqa: E402
from mlx_hermes.tokenizer import Tokenizer  # noqa: E402

ORIGINAL = Batch._step


def copy_kernel():
    kernel = mx.fast.cuda_kernel(
        name="token_read_copy", input_names=["a"], output_names=["b"],
        source="const int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < N) b[i] = a[i];")

    def copy(tokens: mx.array) -> mx.array:
        return kernel(inputs=[tokens], template=[("N", tokens.size)],
                      grid=(tokens.size, 1, 1), threadgroup=(min(tokens.size, 256), 1, 1),
                      output_shapes=[tokens.shape], output_dtypes=[tokens.dtype])[0]
    return copy


def variant(read_first: bool, copy, times: dict):
    """mlx-lm 0.32.2's GenerationBatch._step for rows without logits
    processors that share one sampler, reading step n's tokens before or
    after step n+1 is launched, its sampled tokens passed through `copy`."""

    def _step(self):
        if any(self.logits_processors):
            raise SystemExit("token_read.py: rows with logits processors are not covered")
        self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        inputs = self._current_tokens
        logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        samplers = [self.fallback_sampler if s is None else s
                    for s in (self.samplers or [None] * len(self.uids))]
        if any(s is not samplers[0] for s in samplers):
            raise SystemExit("token_read.py: rows with different samplers are not covered")
        sampled = (samplers[0] if samplers else self.fallback_sampler)(logprobs)
        self._next_tokens = sampled if copy is None else copy(sampled)
        self._next_logprobs = list(logprobs)

        def read():
            mx.eval(inputs, self._current_logprobs)
            t = time.perf_counter()
            ids = inputs.tolist()
            times["tolist"] = times.get("tolist", 0.0) + time.perf_counter() - t
            return ids

        if read_first:
            ids = read()
            mx.async_eval(self._next_tokens, self._next_logprobs)
        else:
            mx.async_eval(self._next_tokens, self._next_logprobs)
            ids = read()
        for tokens, t in zip(self.tokens, ids):
            tokens.append(t)
        return ids, self._current_logprobs

    return _step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--synthetic", choices=["8x7b", "tiny"], default="8x7b")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    cuda = mx.cuda.is_available()
    if a.synthetic == "8x7b" and not cuda:
        sys.exit("error: the 8x7B needs CUDA here (--synthetic tiny runs anywhere)")
    model = prof.synthetic_model(a.synthetic, dtype=mx.bfloat16)
    tokenizer = batch_profile.without_eos(Tokenizer.from_path(TOKENIZER))
    batcher = Batcher(model, tokenizer, max_batch=a.streams)
    # the timed steps, plus room for the tokens a stream makes while later prompts prefill
    # (without it the first streams ended in the last round on an H200)
    total = 8 + a.rounds * 4 * (a.steps + 2) + 16 + 512
    for i, ids in enumerate(batch_profile.prompts(a.streams, 128, model.args.vocab_size, 7)):
        batcher.add(i, Request(ids, max_tokens=total))
    full = 0
    while full < 8:  # every prompt prefilled, a few full steps
        full = full + 1 if len(batcher.step()) == a.streams else 0

    copy = copy_kernel() if cuda else None
    names = ["mlx-lm", "same order", "read first"] + ["kernel copy"] * cuda
    runs = {n: {"step_ms": [], "phases": []} for n in names}
    try:
        for _ in range(a.rounds):
            for name in names:
                phases: dict = {}
                Batch._step = ORIGINAL if name == "mlx-lm" else variant(
                    name == "read first", copy if name == "kernel copy" else None, phases)
                for _ in range(2):  # the switch's own step
                    batcher.step()
                walls = []
                with host_phases(model, timed_phases(phases)):
                    for _ in range(a.steps):
                        t = time.perf_counter()
                        n = len(batcher.step())
                        walls.append(1e3 * (time.perf_counter() - t))
                        if n != a.streams:
                            sys.exit(f"a step gave {n} tokens, not {a.streams}")
                runs[name]["step_ms"].append(statistics.median(walls))
                runs[name]["phases"].append({k: 1e3 * v / a.steps for k, v in phases.items()})
                print(f"{name:12} step {statistics.median(walls):6.2f} ms", flush=True)
    finally:
        Batch._step = ORIGINAL
        batcher.close()

    rows = []
    print(f"{a.streams} streams, medians of {a.rounds} rounds of {a.steps} steps "
          f"({_gpu_name() or mx.default_device()}, MLX {mx.__version__})")
    print(f"{'variant':12} {'step ms':>8} {'tok/s':>8} {'graph':>7} {'async':>7} {'eval':>7} "
          f"{'tolist':>7}")
    for name in names:
        ms = statistics.median(runs[name]["step_ms"])
        ph = {k: statistics.median(p.get(k, 0.0) for p in runs[name]["phases"])
              for k in ("graph", "async_eval", "eval", "tolist")}
        rows.append({"variant": name, "step_ms": ms, "tok_s": a.streams * 1e3 / ms, **ph})
        print(f"{name:12} {ms:8.2f} {a.streams * 1e3 / ms:8.1f} {ph['graph']:7.2f} "
              f"{ph['async_eval']:7.2f} {ph['eval']:7.2f} {ph['tolist']:7.2f}")
    out = {"benchmark": "token_read", "model": a.synthetic, "streams": a.streams,
           "card": _gpu_name(),
           "mlx": mx.__version__, "date": datetime.date.today().isoformat(), "rows": rows}
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
