"""The weight formats, written once: what MLX can load, and the subsets this
project offers to write and to measure.

The loader accepts everything MLX's affine quantization can hold; the
converter (`convert --bits`) and the profile (`profile --bits`) offer the
widths with a tested recipe (2 and 3 bits need mixed recipes to keep their
quality: not yet).
"""

from __future__ import annotations

from typing import Union

import mlx.core as mx

from .errors import HermesError

QUANT_BITS = (2, 3, 4, 5, 6, 8)  # MLX affine quantization
GROUP_SIZES = (32, 64, 128)
OFFERED_BITS = (4, 5, 6, 8)  # what convert writes and profile builds
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
