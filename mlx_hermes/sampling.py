"""Sampling options, checked, then handed to mlx-lm's samplers and processors."""

from __future__ import annotations

from typing import Callable, Optional

from mlx_lm.sample_utils import make_logits_processors as _mlx_lm_processors
from mlx_lm.sample_utils import make_sampler as _mlx_lm_sampler

from .errors import HermesError


def make_sampler(
    temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Callable:
    """temp 0 is greedy. top_p 1, top_k 0 and min_p 0 switch those filters off."""
    _check(temp >= 0, f"temp must be >= 0, got {temp}")
    _check(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    _check(top_k >= 0, f"top_k must be >= 0, got {top_k}")
    _check(0 <= min_p < 1, f"min_p must be in [0, 1), got {min_p}")
    return _mlx_lm_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)


def make_logits_processors(
    repetition_penalty: Optional[float] = None, repetition_context_size: int = 20
) -> list[Callable]:
    """Repetition penalty over the last `repetition_context_size` tokens."""
    if repetition_penalty is None:
        return []
    _check(repetition_penalty > 0, f"repetition_penalty must be > 0, got {repetition_penalty}")
    _check(repetition_context_size >= 1,
           f"repetition_context_size must be >= 1, got {repetition_context_size}")
    return _mlx_lm_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise HermesError(message)
