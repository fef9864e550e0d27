"""What a conversion writes, worked out before any weight is read.

The runtime's own `Model` (built lazily, never evaluated) names every output
tensor and its shape, so the converter writes exactly what the runtime and
mlx-lm load. From the source checkpoint only the safetensors headers are read
here: a missing, mis-shaped or truncated tensor is reported before the heavy
work starts, and every output shape is known up front, so shards can be
streamed to disk with their headers written first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_hermes.errors import HermesError
from mlx_hermes.formats import GROUP_SIZES, SAFETENSORS_DTYPES, Recipe, kind_of
from mlx_hermes.loader import safetensors_header, weight_files
from mlx_hermes.model import Model, ModelArgs, checkpoint_expert_names




@dataclass
class Source:
    """A Hugging Face checkpoint folder, known by its headers."""

    path: Path
    tensors: dict[str, tuple[Path, str, tuple]] = field(default_factory=dict)  # file, dtype, shape

    @classmethod
    def open(cls, path: Path) -> "Source":
        source = cls(path)
        for file in weight_files(path):
            for name, info in safetensors_header(file).items():
                if name == "__metadata__" or name.endswith("rotary_emb.inv_freq"):
                    continue
                if name in source.tensors:
                    raise HermesError(f"tensor {name} appears in more than one shard")
                source.tensors[name] = (file, info["dtype"], tuple(info["shape"]))
        return source

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in {f for f, _, _ in self.tensors.values()})

    def read(self, name: str) -> mx.array:
        """One tensor, read from disk now; nothing else of its file is kept."""
        file = self.tensors[name][0]
        array = mx.load(str(file))[name]
        mx.eval(array)
        return array


@dataclass
class Item:
    """One module's (or one plain tensor's) part of the output."""

    name: str  # runtime path, e.g. model.layers.0.block_sparse_moe.switch_mlp.up_proj
    sources: list[str]  # checkpoint tensors, several experts stacked in order
    shape: tuple  # float shape: [out, in] or [E, out, in]
    bits: Optional[int] = None  # None: kept in float
    group_size: Optional[int] = None

    def outputs(self, dtype: mx.Dtype) -> list[tuple[str, mx.Dtype, tuple]]:
        """(name, dtype, shape) of each tensor written for this item."""
        if self.bits is None:
            return [(self.name, dtype, self.shape)]
        *lead, in_dims = self.shape
        return [
            (f"{self.name}.weight", mx.uint32, (*lead, in_dims * self.bits // 32)),
            (f"{self.name}.scales", dtype, (*lead, in_dims // self.group_size)),
            (f"{self.name}.biases", dtype, (*lead, in_dims // self.group_size)),
        ]

    @property
    def kind(self) -> str:
        return kind_of(self.name)


def make_plan(source: Source, args: ModelArgs, recipe: Recipe) -> list[Item]:
    """Check the source against the model's shapes and list what to write."""
    model = Model(args)  # lazy: only shapes are used
    shapes = dict(tree_flatten(model.parameters()))
    items = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, SwitchLinear)):
            width = recipe.width(path, args.num_hidden_layers)
            item = Item(path, _source_names(path, module, args), shapes[f"{path}.weight"].shape,
                        width.bits, width.group_size)
            group_size = width.group_size
            in_dims = item.shape[-1]
            if in_dims % group_size:
                fits = ", ".join(str(g) for g in GROUP_SIZES if in_dims % g == 0) or "none"
                raise HermesError(
                    f"group size {group_size} does not divide {path}'s input size {in_dims}; "
                    f"group sizes that do: {fits}"
                )
            items.append(item)
        elif isinstance(module, nn.RMSNorm):
            items.append(Item(f"{path}.weight", [f"{path}.weight"], shapes[f"{path}.weight"].shape))
    items.sort(key=lambda item: _order(item.name))
    _check_sources(source, items, args)
    return items


def _source_names(path: str, module: nn.Module, args: ModelArgs) -> list[str]:
    if isinstance(module, SwitchLinear):
        prefix, proj = path.rsplit(".switch_mlp.", 1)
        return checkpoint_expert_names(prefix, proj, args.num_local_experts)
    return [f"{path}.weight"]


def _order(name: str) -> tuple:
    """Checkpoint order: embeddings, layers in order, final norm, LM head."""
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]), name)
    return (0 if "embed_tokens" in name else 2 if name.startswith("model.norm") else 3, 0, name)


def _check_sources(source: Source, items: list[Item], args: ModelArgs) -> None:
    wanted = {}
    for item in items:
        one = item.shape[1:] if len(item.sources) > 1 else item.shape
        wanted.update(dict.fromkeys(item.sources, tuple(one)))
    for name, shape in wanted.items():
        if name not in source.tensors:
            raise HermesError(f"missing tensor {name} in {source.path}")
        _, dtype, got = source.tensors[name]
        if got != shape:
            raise HermesError(f"tensor {name} has shape {list(got)}, expected {list(shape)}")
        if dtype not in SAFETENSORS_DTYPES:
            raise HermesError(f"tensor {name} is {dtype}; the source must be bf16, fp16 or fp32")
    extra = [n for n in source.tensors if n not in wanted]
    if args.tie_word_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]
    if extra:
        raise HermesError(f"unexpected tensor {extra[0]}: does config.json match the weights?")
