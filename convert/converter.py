"""Hugging Face Hermes 2 Mixtral -> MLX quantized folder, streaming and atomic.

One module at a time: read its tensors (for experts, that layer's E experts
of one projection), quantize, write, forget. The output folder is built
beside OUT under a temporary name and renamed at the end, so a failure or
Ctrl-C leaves neither a partial OUT nor the temporary folder.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx

from mlx_hermes.errors import HermesError, first_line
from mlx_hermes import formats
from mlx_hermes.formats import SAFETENSORS_DTYPES, to_dtype
from mlx_hermes.loader import read_config, resolve_model_path
from mlx_hermes.model import ModelArgs

from . import gptq
from .plan import Item, Source, make_plan
from .writer import ShardWriter, nbytes, split_into_shards

# Copied beside the weights when the source has them.
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "generation_config.json",
              "chat_template.jinja", "LICENSE", "LICENSE.tokenizer")


def convert(
    hf_path: str,
    mlx_path: str,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    recipe: Union[str, formats.Recipe] = "uniform",
    dtype: str = "bfloat16",
    force: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    calibration: Union[str, Path, None] = None,
    calibration_tokens: int = gptq.CALIBRATION_TOKENS,
) -> dict:
    """Convert and return a summary: bits per weight, sizes, files.

    recipe: formats.RECIPES; `uniform` and `mixed` take bits (4) and
    group_size (64), the fit-* recipes set their own; or a formats.Recipe. progress(done, total)
    is called as source bytes are consumed. calibration: a text file (or JSONL with a `text`
    field); its first `calibration_tokens` tokens calibrate GPTQ (gptq.py) for every quantized
    module but the embeddings, instead of rounding to nearest.
    """
    plan_recipe = (recipe if isinstance(recipe, formats.Recipe)  # the Python API's own mixes
                   else formats.recipe(recipe, bits, group_size))
    out = Path(mlx_path).expanduser()
    local = Path(hf_path).expanduser()
    if local.exists():  # before anything is read (or, for a repo id, downloaded)
        _check_apart(local, out)
    if out.exists() and not force:
        raise HermesError(f"{out} already exists; pass --force to replace it")
    texts = gptq.calibration_texts(calibration) if calibration is not None else None
    if calibration_tokens < 2:
        raise HermesError(f"--calibration-tokens must be at least 2, got {calibration_tokens}")
    out_dtype = to_dtype(dtype)
    _make_parent(out)
    src = resolve_model_path(hf_path)
    _check_apart(src, out)
    config = read_config(src)
    if "quantization" in config:
        raise HermesError(f"{src} is already quantized; convert from the original checkpoint")
    args = ModelArgs.from_dict(config)
    source = Source.open(src)
    items = make_plan(source, args, plan_recipe)
    specs = [spec for item in items for spec in item.outputs(out_dtype)]
    rounding = None
    if texts is not None:
        rounding = gptq.LayerwiseGPTQ(src, texts, items, out_dtype, calibration_tokens)

    _remove_leftovers(out)
    tmp = out.with_name(f".{out.name}.converting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise HermesError(f"cannot write beside {out}: {e.strerror or first_line(e)}") from None
    try:
        writer = ShardWriter(tmp, split_into_shards(specs))
        sizes = [sum(_source_bytes(source, s) for s in item.sources) for item in items]
        done = 0
        report = _monotonic(progress, sum(sizes))
        layer_bytes: dict[str, int] = {}
        for item, size in zip(items, sizes):
            layer_bytes[_layer_of(item)] = layer_bytes.get(_layer_of(item), 0) + size
        try:
            for item, size in zip(items, sizes):
                if rounding is not None:  # a layer's GPTQ runs at its first item: minutes
                    rounding.progress = (lambda part, start=done, whole=layer_bytes[_layer_of(item)]:
                                         report(start + int(part * whole)))
                for name, array in convert_item(source, item, out_dtype, rounding):
                    writer.write(name, array)
                done += size
                report(done)
        finally:
            writer.close()
        (tmp / "model.safetensors.index.json").write_text(json.dumps(writer.index(), indent=2))
        summary = _summary(items, writer, plan_recipe, dtype, str(hf_path))
        if rounding is not None:
            summary["rounding"] = f"GPTQ, calibrated on {rounding.tokens} tokens of {calibration}"
        _write_config(tmp / "config.json", config, items, plan_recipe.experts, dtype)
        for name in SIDE_FILES:
            if (src / name).exists():
                shutil.copy(src / name, tmp / name)
        (tmp / "README.md").write_text(_model_card(summary))
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _layer_of(item: Item) -> str:
    """`model.layers.N` for a layer's items, else the item's own name."""
    return ".".join(item.name.split(".")[:3]) if item.name.startswith("model.layers.") \
        else item.name


def _monotonic(progress: Optional[Callable[[int, int], None]],
               total: int) -> Callable[[int], None]:
    """progress(done, total), never moving back (GPTQ reports within a layer ahead of
    the items written)."""
    shown = [0]

    def report(done: int) -> None:
        if progress and done > shown[0]:
            shown[0] = done
            progress(done, total)
    return report


def _check_apart(src: Path, out: Path) -> None:
    """The output may not be, hold or sit inside the source: --force would
    otherwise replace the checkpoint being read (93 GB of download)."""
    a, b = src.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise HermesError(f"the output {out} and the source {src} overlap; write the "
                          "conversion to a folder outside the source")


def _make_parent(out: Path) -> None:
    for folder in out.parents:
        if folder.exists() and not folder.is_dir():
            raise HermesError(f"cannot create {out}: {folder} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a file where a folder should be, or no permission
        raise HermesError(f"cannot create {out}: {e.strerror or first_line(e)} "
                          f"({e.filename or out.parent})") from None


def _remove_leftovers(out: Path) -> None:
    """Temporary folders of conversions to `out` whose process is gone (killed
    with SIGKILL, or the machine went down)."""
    for old in out.parent.glob(f".{out.name}.converting-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def convert_item(source: Source, item: Item, dtype: mx.Dtype,
                 rounding: Optional[gptq.LayerwiseGPTQ] = None):
    """Yield (name, array) for one planned item, in the planned order: rounded to
    nearest, or by `rounding` where it covers the item."""
    if rounding is not None and rounding.covers(item):
        q, scales, biases = rounding.quantized(item)
    else:
        if len(item.sources) > 1:  # experts: stack one projection of every expert
            w = mx.stack([source.read(n).astype(dtype) for n in item.sources])
        else:
            w = source.read(item.sources[0]).astype(dtype)
        if item.bits is None:
            mx.eval(w)
            yield item.name, w
            return
        q, scales, biases = mx.quantize(w, group_size=item.group_size, bits=item.bits)
        del w
        mx.eval(q, scales, biases)
    yield f"{item.name}.weight", q
    yield f"{item.name}.scales", scales
    yield f"{item.name}.biases", biases


def _source_bytes(source: Source, name: str) -> int:
    _, dtype, shape = source.tensors[name]
    return _count(shape) * SAFETENSORS_DTYPES[dtype].size


def _summary(items: list[Item], writer: ShardWriter, recipe: formats.Recipe, dtype: str,
             source: str) -> dict:
    out_dtype = to_dtype(dtype)
    quantized = [item for item in items if item.bits is not None]
    params = sum(_count(item.shape) for item in quantized)
    stored = sum(nbytes(spec) for item in quantized for spec in item.outputs(out_dtype))
    return {
        "source": source,
        "recipe": recipe.name,
        "rounding": "to nearest",
        "label": recipe.label,
        "bits": recipe.experts.bits,
        "group_size": recipe.experts.group_size,
        "dtype": dtype,
        "bits_per_weight": 8 * stored / params,  # packed weights, scales and biases
        "size_bytes": writer.index()["metadata"]["total_size"],
        "files": writer.names,
        "date": datetime.date.today().isoformat(),
    }


def _count(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_config(path: Path, config: dict, items: list[Item], default: formats.Width,
                  dtype: str) -> None:
    # mlx-lm's layout: a default width, and each quantized module's own
    quantization = {"group_size": default.group_size, "bits": default.bits, "mode": "affine"}
    for item in items:
        if item.bits is not None:
            quantization[item.name] = {"group_size": item.group_size, "bits": item.bits}
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "dtype")}
    config.update(quantization=quantization, quantization_config=quantization, torch_dtype=dtype)
    path.write_text(json.dumps(dict(sorted(config.items())), indent=2))


def _model_card(s: dict) -> str:
    return f"""# Nous Hermes 2 Mixtral 8x7B DPO, MLX {s['label']}

Converted by mlx-hermes on {s['date']} from `{s['source']}`.

| | |
| --- | --- |
| recipe | {s['label']} (scales in {s['dtype']}; each module's width in config.json) |
| experts | {s['bits']}-bit, group size {s['group_size']} |
| rounding | {s['rounding']} |
| bits per weight | {s['bits_per_weight']:.3f} |
| size | {format_size(s['size_bytes'])} |

Loads with `mlx_hermes.load` and with `mlx_lm.load`. Run it with
`mlx-hermes chat --model <this folder>`.
"""


def format_size(n: int) -> str:
    """26.31 GB, or 5.7 MB for a small model (never "0.00 GB")."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _replace(tmp: Path, out: Path) -> None:
    """Put tmp in out's place; an existing out (with --force) goes only once
    the new one is complete."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
