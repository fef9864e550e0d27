"""One model over several machines: tensor parallelism with `mx.distributed`.

The split is the one MLX's own MoE models use. Attention is split by heads
(q, k, v all-to-sharded; o sharded-to-all), each expert by its intermediate
dimension (gate and up all-to-sharded; down sharded-to-all); the router,
norms, embeddings and LM head are replicated. Each layer then needs two
`all_sum`s: one inside o_proj, one after the MoE block. Every rank computes
the same logits, and the token rank 0 samples is the one every rank uses.

Started under `mlx.launch`, the group comes from `mx.distributed.init()`;
started plainly, the group has one member and nothing here does anything.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import numpy as np
from mlx.nn.layers.distributed import (QuantizedShardedToAllLinear, ShardedToAllLinear,
                                      shard_inplace, shard_linear)

from . import chip
from .errors import HermesError
from .model import Model, ModelArgs
from .moe import SparseMoeBlock
from .specialize import FastPaths, install

log = logging.getLogger(__name__)


def world() -> Optional[mx.distributed.Group]:
    """The group this process was launched in, or None when it runs alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def check_split(args: ModelArgs, n: int, group_sizes: Optional[dict] = None) -> None:
    """Refuse a split that does not divide evenly, before any weight is read.

    group_sizes: quantization group size of o_proj and of the experts' down
    projection, whose inputs are split: each rank's part must hold whole groups.
    """
    group_sizes = group_sizes or {}
    parts = {
        "attention heads (num_attention_heads)": args.num_attention_heads,
        "key/value heads (num_key_value_heads)": args.num_key_value_heads,
        "expert width (intermediate_size)": args.intermediate_size,
    }
    for what, size in parts.items():
        if size % n:
            raise HermesError(f"cannot split the model over {n} ranks: {size} {what} do not "
                              f"divide by {n}")
    inputs = {"o_proj": args.num_attention_heads * args.dims_per_head,
              "down_proj": args.intermediate_size}
    for name, size in inputs.items():
        g = group_sizes.get(name)
        if g and (size // n) % g:
            raise HermesError(
                f"cannot split the model over {n} ranks: each rank's {size // n} inputs of "
                f"{name} are not a whole number of quantization groups of {g}")


def host_all_sum(x: mx.array, group: mx.distributed.Group) -> mx.array:
    """`mx.distributed.all_sum` with its input evaluated before and its result
    evaluated at once: no GPU kernel ever waits for the collective.

    Why: MLX's ring and MPI backends sum on the CPU. Left lazy inside a CUDA
    graph, the GPU waits for that CPU task in a spinning kernel (MLX issue
    2229: one that makes other CUDA calls wait too), and under generation's
    one-step-ahead evaluation both ranks deadlocked: `generate` of the test's
    tiny model under `mlx.launch -n 2` hung in 3 of 3 runs on an H200, and in
    4 of 4 with every all_sum evaluated where it stands it did not
    (benchmarks/RESULTS.md, 2026-11-28). It costs a host round trip a
    collective, so `shard` gives it to CUDA only; Metal and the CPU keep
    MLX's lazy collectives."""
    mx.eval(x)
    total = mx.distributed.all_sum(x, group=group)
    mx.eval(total)
    return total


def shard(model: Model, group: mx.distributed.Group, host_sums: Optional[bool] = None) -> Model:
    """Split `model` (lazily loaded) in place across `group`. host_sums: sum
    over ranks through host_all_sum (default: on CUDA)."""
    if host_sums is None:
        host_sums = chip.on_cuda()
    n = group.size()
    first = model.layers[0]
    check_split(model.args, n, {
        "o_proj": getattr(first.self_attn.o_proj, "group_size", None),
        "down_proj": getattr(first.block_sparse_moe.switch_mlp.down_proj, "group_size", None)})
    for layer in model.layers:
        attn = layer.self_attn
        if "qkv_proj" in attn:
            # [q; k; v] stacked: each rank takes its heads of all three
            q, kv, _ = attn.qkv_sizes()
            attn.qkv_proj = shard_linear(attn.qkv_proj, "all-to-sharded", segments=[q, q + kv],
                                         group=group)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded",
                                                 group=group))
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        if host_sums:
            install(attn.o_proj, HostSummedLinear if isinstance(attn.o_proj, ShardedToAllLinear)
                    else HostSummedQuantizedLinear)
        attn.n_heads //= n
        attn.n_kv_heads //= n

        experts = layer.block_sparse_moe.switch_mlp
        if "gate_up_proj" in experts:
            # [gate; up] stacked: split each half, or one rank gets all of gate
            shard_inplace(experts.gate_up_proj, "all-to-sharded", segments=2, group=group)
        else:
            shard_inplace(experts.gate_proj, "all-to-sharded", group=group)
            shard_inplace(experts.up_proj, "all-to-sharded", group=group)
        shard_inplace(experts.down_proj, "sharded-to-all", group=group)
        install(layer.block_sparse_moe,
                HostSummedMoeBlock if host_sums else ShardedMoeBlock).group = group
    model.group = group
    model.coordination = Coordination(group, host_all_sum if host_sums else all_sum)
    return model


def all_sum(x: mx.array, group: mx.distributed.Group) -> mx.array:
    """MLX's all_sum, lazy (what host_all_sum stands in for on CUDA)."""
    return mx.distributed.all_sum(x, group=group)


class ShardedMoeBlock(SparseMoeBlock):
    """A MoE block holding a slice of every expert: the ranks' partial outputs
    are summed (`group` set when installed)."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.sum_ranks(super().__call__(x))

    def sum_ranks(self, x: mx.array) -> mx.array:
        return all_sum(x, self.group)

    def plus(self, x: mx.array, residual: mx.array) -> mx.array:
        # the ranks' sum first: a kernel's fused add (KernelMoeBlock.plus) would add the
        # residual once a rank
        return SparseMoeBlock.plus(self, x, residual)


class HostSummedMoeBlock(ShardedMoeBlock):
    """ShardedMoeBlock summing through host_all_sum (CUDA)."""

    def sum_ranks(self, x: mx.array) -> mx.array:
        return host_all_sum(x, self.group)


class HostSummedLinear(ShardedToAllLinear):
    """MLX's sharded-to-all linear (its __call__, whose all_sum is not ours to
    pick) summing through host_all_sum (CUDA)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = host_all_sum(x @ self["weight"].T, self.group)
        return y + self["bias"] if "bias" in self else y


class HostSummedQuantizedLinear(QuantizedShardedToAllLinear):
    """The same for MLX's quantized sharded-to-all linear."""

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self["weight"], scales=self["scales"],
                                biases=self.get("biases"), transpose=True,
                                group_size=self.group_size, bits=self.bits, mode=self.mode)
        y = host_all_sum(y, self.group)
        return y + self["bias"] if "bias" in self else y


class Coordination:
    """What generation does differently on a model split over ranks (generate
    asks `model.coordination`, set by `shard`): every rank uses rank 0's
    token, progress keeps the watchdog quiet, and a generation's last step
    finishes before the next collectives start. `ranks_sum`: the model's way of
    summing over ranks (all_sum or host_all_sum)."""

    def __init__(self, group: mx.distributed.Group,
                 ranks_sum: Callable[[mx.array, mx.distributed.Group], mx.array] = all_sum):
        self.group = group
        self.ranks_sum = ranks_sum

    def sampler(self, sampler: Callable) -> Callable:
        return same_token_everywhere(sampler, self.group, self.ranks_sum)

    def progress(self, progress: Optional[Callable[[int, int], None]]) -> Callable:
        def report(done: int, total: int) -> None:
            beat()
            if progress is not None:
                progress(done, total)
        return report

    def finished(self, stream: mx.Stream) -> None:
        # generate_step computes one token ahead on its own stream; that step's
        # collectives must finish before any later ones start, or ranks would
        # pair them differently.
        mx.synchronize(stream)


def load_launched(path: Union[str, Path], fast_paths: FastPaths = FastPaths(),
                  progress: Optional[Callable] = None):
    """Under mlx.launch: this rank's slice of the model, with the watchdog on;
    only rank 0 talks (the others' standard output goes nowhere)."""
    group = world()
    if group is None:  # a launch of one
        from .loader import load

        return load(path, fast_paths=fast_paths)
    start_watchdog(group)
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")
    else:
        print(f"loading {path} across {group.size()} ranks ...", file=sys.stderr)
    return load_sharded(path, group, progress=progress, fast_paths=fast_paths)


def load_sharded(path: Union[str, Path], group: mx.distributed.Group,
                 dtype: Optional[str] = None, progress: Optional[Callable] = None,
                 fast_paths: FastPaths = FastPaths(), host_sums: Optional[bool] = None):
    """Load this rank's part of the model: the weights are opened lazily, split,
    and evaluated one layer at a time, so a rank never holds more than its
    part plus one layer's full tensors. host_sums: as for `shard`."""
    from .loader import load

    model, tokenizer = load(path, dtype=dtype, lazy=True, fast_paths=fast_paths)
    shard(model, group, host_sums)
    mx.eval(model.model.embed_tokens.parameters(), model.model.norm.parameters())
    for i, layer in enumerate(model.layers):
        mx.eval(layer.parameters())
        mx.clear_cache()
        beat()
        if progress:
            progress(i + 1, len(model.layers))
    mx.eval(model.parameters())
    return model, tokenizer


def same_token_everywhere(sampler: Callable, group: mx.distributed.Group,
                          ranks_sum: Callable[[mx.array, mx.distributed.Group], mx.array] = all_sum
                          ) -> Callable:
    """Every rank uses rank 0's token: with unseeded sampling the ranks' random
    states differ, and even seeded ones must never drift apart."""
    def sample(logprobs: mx.array) -> mx.array:
        beat()
        token = sampler(logprobs)
        mine = token if group.rank() == 0 else mx.zeros_like(token)
        return ranks_sum(mine, group)

    return sample


def broadcast_text(text: Optional[str], group: mx.distributed.Group) -> Optional[str]:
    """Rank 0's text (None for end of input) on every rank."""
    # Collectives must run in the same order on every rank: let the
    # generation stream's look-ahead step finish before ours start.
    mx.synchronize()
    mine = group.rank() == 0
    data = text.encode() if mine and text is not None else b""
    sent = (0 if text is None else len(data) + 1) if mine else 0
    size = mx.distributed.all_sum(mx.array([sent]), group=group).item()  # 0: None
    if size <= 1:
        return None if size == 0 else ""
    buf = mx.array(list(data), dtype=mx.uint8) if mine else mx.zeros((size - 1,), mx.uint8)
    return bytes(np.array(mx.distributed.all_sum(buf, group=group))).decode()


class Watchdog:
    """Makes sure no rank waits forever for a rank that is gone.

    A rank that fails exits at once; mlx.launch then stops the others with
    SIGTERM, which we turn into a one-line error and exit code 1, even while
    the main thread is blocked inside a collective (the signal is read by a
    thread of ours from Python's wakeup pipe). A rank that hangs instead is
    caught by a timeout: the main loop calls `beat()` as it makes progress.
    At `--log-level debug` a rank that times out first prints every thread's
    stack, to show where it waited.
    """

    def __init__(self, group: mx.distributed.Group, timeout: float):
        self.prefix = f"rank {group.rank()}/{group.size()}"
        self.timeout = timeout
        self.last = time.monotonic()
        self.paused = False

    def start(self) -> "Watchdog":
        read, write = os.pipe()
        os.set_blocking(write, False)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.fail("stopped by the launcher: another rank "
                                                    "failed (see its output)"))
        signal.set_wakeup_fd(write)
        # A peer that dies can also surface here first, as the backend's own error in
        # the middle of a collective: one line, exit 1, as for the launcher's signal
        previous = sys.excepthook

        def lost_peer(kind, value, tb) -> None:
            text = str(value)
            if issubclass(kind, RuntimeError) and ("peer" in text or "connection" in text):
                self.fail("lost the connection to another rank: it failed or was stopped "
                          "(see its output)")
            previous(kind, value, tb)

        sys.excepthook = lost_peer
        threading.Thread(target=self._signals, args=(read,), daemon=True).start()
        threading.Thread(target=self._clock, daemon=True).start()
        return self

    def beat(self) -> None:
        self.last = time.monotonic()

    def fail(self, why: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"error: {self.prefix}: {why}\n")
        sys.stderr.flush()
        os._exit(1)

    def _signals(self, fd: int) -> None:
        while True:
            data = os.read(fd, 64)
            if {signal.SIGTERM, signal.SIGHUP} & set(data):
                self.fail("stopped by the launcher: another rank failed (see its output)")

    def _clock(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            if not self.paused and time.monotonic() - self.last > self.timeout:
                if log.isEnabledFor(logging.DEBUG):  # where it is stuck, for a bug report
                    faulthandler.dump_traceback(sys.stderr, all_threads=True)
                self.fail(f"no progress for {self.timeout:.0f} s: another rank is gone or "
                          "stuck (MLX_HERMES_RANK_TIMEOUT sets this limit)")


_watchdog: Optional[Watchdog] = None


def start_watchdog(group: mx.distributed.Group) -> Watchdog:
    global _watchdog
    if _watchdog is None:
        timeout = float(os.environ.get("MLX_HERMES_RANK_TIMEOUT", "120"))
        _watchdog = Watchdog(group, timeout).start()
    return _watchdog


def beat() -> None:
    """Progress was made (a token, a prefill chunk, a layer loaded)."""
    if _watchdog is not None:
        _watchdog.beat()


def rank_report(model: Model, group: mx.distributed.Group, decode_tps: float) -> list[dict]:
    """Per rank: weights held, weight bytes read per decoded token, and the
    time per token spent in the two all_sums of each layer. Every rank calls
    this; every rank gets the whole list."""
    from mlx.utils import tree_flatten

    from .profile import bytes_per_token

    held = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    comm = communication_per_token(model, group)
    # float32 holds byte counts to ~7 digits: enough for a report
    mine = mx.array([[held, bytes_per_token(model), comm, decode_tps]], dtype=mx.float32)
    table = np.array(mx.distributed.all_gather(mine, group=group))
    table = table.astype(np.float64)
    return [{"rank": r, "weights_gb": float(row[0]) / 1e9, "bytes_per_token_gb": float(row[1]) / 1e9,
             "comm_ms_per_token": float(row[2]) * 1e3, "decode_tps": float(row[3])}
            for r, row in enumerate(table)]


def communication_per_token(model: Model, group: mx.distributed.Group,
                            repeats: int = 20) -> float:
    """Seconds per decoded token in collectives: the 2 all_sums per layer of a
    [1, 1, D] activation, one after another as in decoding, plus the token's."""
    x = mx.zeros((1, 1, model.args.hidden_size), dtype=model.model.norm.weight.dtype)
    calls = 2 * len(model.layers) + 1

    def chain():
        y = x
        for _ in range(calls):
            y = mx.distributed.all_sum(y, group=group)
        mx.eval(y)

    chain()  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        chain()
    return (time.perf_counter() - start) / repeats
