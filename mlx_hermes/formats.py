"""The weight formats, written once: what MLX can load, and the subsets this
project offers to write and to measure.

The loader accepts everything MLX's affine quantization can hold. The
converter writes recipes: `uniform` and `mixed` at OFFERED_BITS, and the
fit-* recipes for smaller Macs, whose experts go to 3 or 2 bits while the
parts that cost little space keep more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx

from .errors import HermesError

QUANT_BITS = (2, 3, 4, 5, 6, 8)  # MLX affine quantization
GROUP_SIZES = (32, 64, 128)
OFFERED_BITS = QUANT_BITS  # uniform and mixed: what convert writes and profile builds
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# safetensors' names for the float dtypes, and their sizes
SAFETENSORS_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}


def to_dtype(dtype: Union[str, mx.Dtype]) -> mx.Dtype:
    """A dtype from its name ("bfloat16", ...), checked."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise HermesError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: mx.Dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


# ---- recipes: how wide each kind of weight is stored ------------------------------------


@dataclass(frozen=True)
class Width:
    bits: int
    group_size: int

    def __str__(self) -> str:
        return f"{self.bits}-bit g{self.group_size}"


@dataclass(frozen=True)
class Recipe:
    """Bits and group size for each kind of weight. `down_more` widens the
    experts' down projection in the first and last `ends` layers (mlx-lm's
    mixed recipes widen down_proj at the ends of the stack too)."""

    name: str
    experts: Width
    attention: Width
    v_proj: Width
    router: Width
    embeddings: Width
    lm_head: Width
    down_more: Optional[Width] = None
    ends: int = 0

    @property
    def label(self) -> str:
        if self.name in FIXED_RECIPES:
            return f"{self.name} (experts {self.experts})"
        return f"{self.name} {self.experts}"

    def width(self, path: str, layers: int) -> Width:
        """The width of the module at `path` (runtime names) in a model of `layers` layers."""
        kind = kind_of(path)
        if kind == "experts":
            layer = int(path.split(".")[2])
            at_ends = layer < self.ends or layer >= layers - self.ends
            if self.down_more and path.endswith("down_proj") and at_ends:
                return self.down_more
            return self.experts
        if kind == "attention":
            return self.v_proj if path.endswith("v_proj") else self.attention
        return getattr(self, kind)


def kind_of(path: str) -> str:
    """experts, router, attention, embeddings, lm_head or norms."""
    if ".switch_mlp." in path:
        return "experts"
    if path.endswith("block_sparse_moe.gate"):
        return "router"
    if ".self_attn." in path:
        return "attention"
    if "embed_tokens" in path:
        return "embeddings"
    if path.startswith("lm_head"):
        return "lm_head"
    return "norms"


# Recipes for smaller Macs, sized for the real 8x7B (sizes: profile.recipe_size): experts at
# 3 or 2 bits in groups of 128 (96% of the weights), the router at 8 bits, attention at 4,
# v_proj, the embeddings and the LM head higher, within the bound.
FIXED_RECIPES = {
    # <= 19.5 GB: a 32 GB Mac's default working set (21.8 GB) with an 8k context
    "fit-32gb": dict(experts=Width(3, 128), attention=Width(4, 64), v_proj=Width(6, 64),
                     router=Width(8, 64), embeddings=Width(6, 64), lm_head=Width(6, 64)),
    # <= 14 GB: a 24 GB Mac's (~16 GB) with a 4k context; down_proj 3-bit in 2 layers at each end
    "fit-24gb": dict(experts=Width(2, 128), attention=Width(4, 64), v_proj=Width(6, 64),
                     router=Width(8, 64), embeddings=Width(4, 64), lm_head=Width(6, 64),
                     down_more=Width(3, 128), ends=2),
}
RECIPES = ("uniform", "mixed", *FIXED_RECIPES)


def recipe(name: str, bits: Optional[int] = None, group_size: Optional[int] = None) -> Recipe:
    """A recipe by name. `uniform` and `mixed` take `bits` (default 4) and
    `group_size` (default 64); the fit-* recipes set their own."""
    if name in FIXED_RECIPES:
        if bits is not None or group_size is not None:
            raise HermesError(f"the {name} recipe sets its own bits and group sizes: "
                              "leave out --bits and --group-size")
        return Recipe(name, **FIXED_RECIPES[name])
    if name not in RECIPES:
        raise HermesError(f"--recipe must be one of {', '.join(RECIPES)}, got {name}")
    bits, group_size = bits or 4, group_size or 64
    if bits not in OFFERED_BITS:
        raise HermesError(f"--bits must be one of {', '.join(map(str, OFFERED_BITS))}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise HermesError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                          f"got {group_size}")
    w = Width(bits, group_size)
    if name == "uniform":
        return Recipe(name, w, w, w, w, w, w)
    # mixed: bits where quantization error costs the most and space the least
    high = Width(max(bits, 6), group_size)
    return Recipe(name, experts=w, attention=w, v_proj=high, router=Width(8, group_size),
                  embeddings=high, lm_head=high)
