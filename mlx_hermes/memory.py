"""Will it fit? Weights plus KV cache against the GPU's working set on a Mac.

Metal lets a process wire at most its `recommendedMaxWorkingSetSize` of GPU
memory (about 2/3 of RAM on 16-32 GB Macs, more on larger ones); past it a
model pages and crawls, or fails. Elsewhere (CPU, CUDA) there is no such
figure and no check.
"""

from __future__ import annotations

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
