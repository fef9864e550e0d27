"""Sampling options, written once: checked here, then run by mlx-lm's filters
and logits processors.

`SamplingParams` is what the CLI, the Python API, ChatSession, the engine and
the server build and pass on. Its one addition to mlx-lm's samplers is a
random key per request: mlx-lm draws from MLX's global generator, so seeding
one request (`mx.random.seed`) would make every later unseeded request repeat
the same draws, and two requests could not be seeded independently.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p
from mlx_lm.sample_utils import make_logits_processors as _mlx_lm_processors

from .errors import HermesError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temp 0 is greedy; top_p 1, top_k 0,
    min_p 0 and no penalties switch those off. `seed` makes the draws
    repeatable, for this request only."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self):
        _check(self.temp >= 0, f"temp must be >= 0, got {self.temp}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        _check(0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}")
        _check(self.repetition_penalty is None or self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(self.repetition_context_size >= 1,
               f"repetition_context_size must be >= 1, got {self.repetition_context_size}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(value is None or -2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def pick(cls, options: dict) -> tuple["SamplingParams", dict]:
        """The sampling options out of `options`, and the rest."""
        names = set(cls.names())
        mine = {k: v for k, v in options.items() if k in names and v is not None}
        return cls(**mine), {k: v for k, v in options.items() if k not in names}

    def sampler(self) -> Callable[[mx.array], mx.array]:
        """logprobs [B, V] -> tokens [B], with this request's own random key."""
        if self.temp == 0:
            return greedy
        filters = []
        if self.top_p < 1:
            filters.append(lambda x: apply_top_p(x, self.top_p))
        if self.min_p > 0:
            filters.append(lambda x: apply_min_p(x, self.min_p))
        if self.top_k > 0:
            filters.append(lambda x: apply_top_k(x, self.top_k))
        key = mx.random.key(self.seed if self.seed is not None else secrets.randbits(63))
        scale = 1.0 / self.temp

        def sample(logprobs: mx.array) -> mx.array:
            nonlocal key
            for f in filters:
                logprobs = f(logprobs)
            key, draw = mx.random.split(key)
            return mx.random.categorical(logprobs * scale, key=draw)

        return sample

    def logits_processors(self) -> list[Callable]:
        """The penalties (repetition, presence, frequency), as mlx-lm applies them."""
        return _mlx_lm_processors(
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty or None,
            frequency_penalty=self.frequency_penalty or None)


def greedy(logprobs: mx.array) -> mx.array:
    """The most likely token of each row. One function shared by every greedy
    request, so a batch of them samples in one call (mlx-lm's BatchGenerator
    batches rows whose sampler is the same object)."""
    return mx.argmax(logprobs, axis=-1)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise HermesError(message)
