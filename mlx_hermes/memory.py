"""Will it fit? Weights plus KV cache against the GPU's working set on a Mac.

Metal lets a process wire at most its `recommendedMaxWorkingSetSize` of GPU
memory (about 2/3 of RAM on 16-32 GB Macs, more on larger ones); past it a
model pages and crawls, or fails. Elsewhere (CPU, CUDA) there is no such
figure and no check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import HermesError
from .loader import read_config, weight_files
from .model import ModelArgs

GB = 1e9


def metal_working_set() -> Optional[int]:
    """Bytes the GPU may use, on Metal; None elsewhere."""
    if not mx.metal.is_available():
        return None
    return mx.device_info().get("max_recommended_working_set_size")


def device_memory() -> int:
    """Bytes this process may compute in: on a Mac the GPU's working set, on
    CUDA the card's memory, on a CPU the machine's RAM."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_budget(reserved: int = 0) -> int:
    """Bytes left for the KV caches of running sequences: 90% of
    `device_memory()` less what MLX holds now (the loaded weights) and
    `reserved` (e.g. the server's prefix cache)."""
    return max(0, int(device_memory() * 0.9) - mx.get_active_memory() - reserved)


def kv_cache_bytes(args: ModelArgs, tokens: int, kv_bits: Optional[int] = None) -> int:
    values = 2 * args.num_hidden_layers * args.num_key_value_heads * args.dims_per_head * tokens
    if kv_bits is None:
        return values * 2  # float16 / bfloat16
    return int(values * (kv_bits / 8 + 2 * 2 / 64))  # packed values + fp16 scale, bias per 64


def fit_problem(weights: int, kv: int, limit: int, tokens: int) -> Optional[str]:
    """What to tell the user when weights + KV cache exceed the working set."""
    if weights + kv <= limit:
        return None
    return (
        f"the model needs {weights / GB:.1f} GB of weights plus {kv / GB:.1f} GB of KV cache for "
        f"{tokens} tokens, but this Mac's GPU may use only {limit / GB:.1f} GB: use a smaller "
        "quantization (e.g. 4-bit), a shorter context (fewer --max-tokens), --kv-bits 4, or "
        f"raise the limit with `sudo sysctl iogpu.wired_limit_mb={_suggested_mb(weights + kv)}`"
    )


def check_fits(path: Path, tokens: int, kv_bits: Optional[int] = None,
               limit: Optional[int] = None) -> None:
    """Raise a HermesError with advice before loading a model that cannot fit.
    limit defaults to this Mac's working set; without one, nothing is checked."""
    limit = limit if limit is not None else metal_working_set()
    if limit is None:
        return
    args = ModelArgs.from_dict(read_config(path))
    weights = sum(f.stat().st_size for f in weight_files(path))
    problem = fit_problem(weights, kv_cache_bytes(args, tokens, kv_bits), limit, tokens)
    if problem:
        raise HermesError(problem)


def _suggested_mb(need: int) -> int:
    # what is needed plus 10% headroom, rounded up to a GB
    return -(-int(need * 1.1) // 2**30) * 1024


# The GPU's default working set of a Mac, GB, by its memory: recorded where we have a
# figure, else macOS's rule (about 2/3 of memory up to 32 GB, 3/4 above).
MAC_WORKING_SET_GB = {16: 10.9, 24: 16.0, 32: 21.8, 48: 36.0, 64: 48.0, 96: 72.0, 128: 115.4,
                      192: 144.0}
RECORDED = {16: "recorded on an M1", 32: "recorded", 128: "recorded on an M5 Max (107.5 GiB)"}
FIT_CONTEXT = 4096  # the context `convert --fit` leaves room for


def mac_working_set(memory_gb: int) -> tuple[float, str]:
    """A Mac's default GPU working set (GB) and where the figure comes from."""
    if memory_gb in MAC_WORKING_SET_GB:
        return MAC_WORKING_SET_GB[memory_gb], RECORDED.get(memory_gb, "macOS's rule")
    share = 2 / 3 if memory_gb <= 32 else 3 / 4
    return memory_gb * share, "macOS's rule"


def recipe_for_mac(memory_gb: int, context: int = FIT_CONTEXT) -> tuple[dict, str]:
    """The largest recipe of the real 8x7B whose weights, `context` tokens of fp16
    KV cache and the margin fit a Mac of `memory_gb`'s default working set: its
    fit-advice row, and why it was picked."""
    from .profile import fit_advice

    working_set, source = mac_working_set(memory_gb)
    advice = fit_advice(int(working_set * GB))
    for row in advice:
        if row["max_context"] >= context:
            return row, (f"a {memory_gb} GB Mac's GPU may use {working_set:.1f} GB ({source}); "
                         f"{row['label']} takes {row['weights_gb']:.1f} GB and leaves room for "
                         f"{row['max_context']} tokens of context")
    smallest = advice[-1]
    raise HermesError(
        f"no recipe fits a {memory_gb} GB Mac: its GPU may use {working_set:.1f} GB ({source}), "
        f"and the smallest, {smallest['label']}, needs {smallest['weights_gb']:.1f} GB of weights "
        f"plus a {context}-token context; split the model over two Macs (mlx.launch: README, "
        "'Several Macs, one model'), or raise the limit with `sudo sysctl iogpu.wired_limit_mb`")
