"""Find, check and load a Mixtral checkpoint: local folder or Hugging Face repo id.

Three layouts load here: the original Hugging Face checkpoint (per-expert
bf16 tensors), today's mlx-lm layout (stacked `switch_mlp` experts, quantized
per module), and the old mlx-community layout (`weights.NN.safetensors`,
experts quantized one by one). Weights stay lazy until the end, so peak
memory is about the size of the weights, not twice it.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import HermesError, first_line
from .formats import DTYPES, QUANT_BITS, dtype_name, to_dtype
from .model import Model, ModelArgs
from .specialize import FastPaths, specialize
from .tokenizer import Tokenizer

# What a model folder needs: config, weights, tokenizer (never .bin / .pt copies).
HUB_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "weights*.safetensors",
    "tokenizer.model",
    "*.jinja",
]



def load(
    path_or_repo: Union[str, Path],
    dtype: Optional[Union[str, mx.Dtype]] = None,
    lazy: bool = False,
    fast_paths: FastPaths = FastPaths(),
) -> tuple[Model, Tokenizer]:
    """Load a Mixtral checkpoint and its tokenizer.

    dtype: the compute dtype. By default the checkpoint's own on a GPU, and
    float32 on the CPU, where MLX runs bf16/fp16 several times slower.
    lazy: leave weights on disk until first used.
    fast_paths: which of this machine's fast paths to install
    (`FastPaths.none()`: the portable model only, as a Mac runs it).
    """
    path = resolve_model_path(path_or_repo)
    config = read_config(path)
    args = ModelArgs.from_dict(config)
    model = Model(args)
    weights = model.sanitize(read_weights(path))
    quantize_like(model, weights, config)
    check_weights(model, weights)

    compute = to_dtype(dtype) if dtype is not None else default_dtype(args, weights)
    _check_cpu_dtype(compute, weights)
    weights = {
        k: v.astype(compute) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    del weights
    specialize(model, fast_paths)
    if not lazy:
        mx.eval(model.parameters())

    tokenizer = Tokenizer.from_path(path, extra_eos_token_ids=args.eos_token_id)
    return model, tokenizer


def resolve_model_path(path_or_repo: Union[str, Path]) -> Path:
    """A local folder as is; a Hugging Face repo id downloaded (with progress)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HermesError(f"model path {path} is a file; give the model's folder")
        return path
    if not _looks_like_repo_id(str(path_or_repo)):
        raise HermesError(f"model folder {path} does not exist")
    return _download(str(path_or_repo))


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise HermesError(
            f"{repo_id} is gated on Hugging Face: accept its terms and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise HermesError(
            f"{repo_id} is neither a local folder nor a Hugging Face repo that can be reached"
        ) from None
    except LocalEntryNotFoundError:
        raise HermesError(
            f"cannot download {repo_id}: no connection to Hugging Face and no cached copy"
        ) from None
    except OSError as e:  # network errors, disk full
        raise HermesError(f"cannot download {repo_id}: {first_line(e)}") from None


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise HermesError(f"no config.json in {path}: not a model folder")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HermesError(f"cannot read {file}: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise HermesError(f"{file} does not hold a JSON object")
    return config


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HermesError(f"cannot read {index}: {first_line(e)}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise HermesError(f"shard {f.name} named in {index.name} is missing from {path}")
        return files
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("weights*.safetensors"))
    if not files:
        raise HermesError(f"no safetensors weights in {path}")
    return files


def safetensors_header(file: Path) -> dict:
    """The JSON header of a .safetensors file, checked against the file's size,
    so a truncated download is caught before any tensor is read."""
    try:
        with open(file, "rb") as f:
            size = file.stat().st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise HermesError(f"{file.name} is not a valid safetensors file: {first_line(e)}") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise HermesError(
            f"{file.name} is truncated: {size} bytes, its header needs {8 + n + end}"
        )
    return header


def read_weights(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        safetensors_header(file)
        try:
            tensors = mx.load(str(file))
        except (RuntimeError, ValueError) as e:
            raise HermesError(f"cannot read {file.name}: {first_line(e)}") from None
        for name in tensors:
            if name in weights:
                raise HermesError(f"tensor {name} appears in more than one shard")
        weights.update(tensors)
    # Older checkpoints carry RoPE's inverse frequencies as a buffer.
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


def quantize_like(model: Model, weights: dict[str, mx.array], config: dict) -> None:
    """Quantize exactly the modules whose checkpoint has `<path>.scales`.

    The config alone cannot say: mlx-lm silently leaves a layer unquantized
    when its input size is not divisible by the group size, and old folders
    keep the router unquantized under one global setting. Bits and group size
    are read from the tensors' own shapes.
    """
    mode = (config.get("quantization") or {}).get("mode", "affine")
    if mode != "affine":
        raise HermesError(f"quantization mode {mode!r} is not supported (affine only)")

    def predicate(name: str, module: nn.Module):
        if f"{name}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        return {**infer_quantization(name, module, weights), "mode": "affine"}

    nn.quantize(model, class_predicate=predicate)


def infer_quantization(name: str, module: nn.Module, weights: dict[str, mx.array]) -> dict:
    in_dims = module.weight.shape[-1]
    packed = weights.get(f"{name}.weight")
    scales = weights[f"{name}.scales"]
    if packed is None:
        raise HermesError(f"missing tensor {name}.weight")
    if f"{name}.biases" not in weights:
        raise HermesError(f"missing tensor {name}.biases (affine quantization needs it)")
    groups = scales.shape[-1]
    group_size, bits = in_dims // groups, packed.shape[-1] * 32 // in_dims
    if groups * group_size != in_dims or bits not in QUANT_BITS or packed.dtype != mx.uint32:
        raise HermesError(
            f"tensor {name}.weight / .scales have shapes {list(packed.shape)} / "
            f"{list(scales.shape)}, which fit no quantization of input size {in_dims}"
        )
    return {"group_size": group_size, "bits": bits}


def check_weights(model: Model, weights: dict[str, mx.array]) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for name, param in expected.items():
        if name not in weights:
            raise HermesError(f"missing tensor {name}")
        if tuple(weights[name].shape) != tuple(param.shape):
            raise HermesError(
                f"tensor {name} has shape {list(weights[name].shape)}, expected {list(param.shape)}"
            )
    for name in weights:
        if name not in expected:
            raise HermesError(f"unexpected tensor {name}: does config.json match the weights?")


def default_dtype(args: ModelArgs, weights: dict[str, mx.array]) -> mx.Dtype:
    if mx.default_device() == mx.cpu:
        return mx.float32
    if args.torch_dtype in DTYPES:
        return DTYPES[args.torch_dtype]
    norm = weights["model.norm.weight"]
    return norm.dtype if mx.issubdtype(norm.dtype, mx.floating) else mx.float16


def _check_cpu_dtype(compute: mx.Dtype, weights: dict[str, mx.array]) -> None:
    """MLX's CPU backend runs float (unquantized) experts, `gather_mm`, in
    float32 only: refuse other dtypes at load, not at the first long prompt."""
    float_experts = any(k.endswith("switch_mlp.down_proj.weight") and
                        mx.issubdtype(v.dtype, mx.floating) for k, v in weights.items())
    if mx.default_device() == mx.cpu and compute != mx.float32 and float_experts:
        raise HermesError(f"dtype {dtype_name(compute)} does not run on MLX's CPU with unquantized experts "
                          "(its gather_mm is float32 only): use float32, the CPU's default, "
                          "or a quantized model")
