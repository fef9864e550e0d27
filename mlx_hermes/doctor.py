"""`mlx-hermes doctor`: a self-check a user runs on their own machine.

Nothing in this project is tested on Metal by us: the first Macs it runs on
are our users'. Like llama.cpp's `test-backend-ops`, which checks each
backend's ops against the CPU, this checks our model on this machine: a tiny
random Mixtral of odd shapes, through every path `specialize` installs here
(the portable one and each fast path; prefill and cached decode), against the
same model computed on the CPU in float32. Then the environment, a bandwidth
figure, and whether a model fits. One line per check (ok / warn / FAIL) and a
JSON report to attach to a bug: versions and figures only, no paths.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import __version__
from .cache import make_cache
from .chip import Chip, detect, measure_bandwidth
from .memory import kv_cache_bytes, metal_working_set
from .model import Model, ModelArgs
from .specialize import FastPaths, specialize
from .tiny import tiny_config, tiny_tensors

# Heads not a power of two, GQA (6 over 2), 6 experts of which 2 run, head dim 32.
SHAPE = dict(hidden_size=192, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, num_local_experts=6)
VOCAB = 1024
GROUP_SIZE = 64
PROMPT_TOKENS = 72  # enough token-expert pairs for the sorted (and dense) prefill paths
DECODE_STEPS = 4
# Max |logits - reference| / max |reference| allowed, by compute dtype. Float32 leaves room
# for TF32 matmuls on GPUs that use them (1.2e-3 measured on an H200); bf16 has 8 bits of
# mantissa, and two random layers amplify its rounding (2e-2 float, 4-bit up to ~7e-2 measured
# on a CPU and an H200). A wrong kernel is off by far more.
TOLERANCE = {mx.float32: 5e-3, mx.bfloat16: 1e-1}


@dataclass
class Check:
    group: str
    name: str
    status: str  # "ok", "warn" or "FAIL"
    figure: str
    data: dict = field(default_factory=dict)


def run(model: Optional[str] = None, bandwidth: bool = True,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    """Every check; `model` (a folder or repo id) adds its own."""
    say = progress or (lambda _: None)
    chip = detect()
    working_set = metal_working_set()
    checks = environment(chip, working_set)
    say("numerics: the tiny model through every path here, against the CPU in float32")
    checks += numerics()
    if model is not None:
        say(f"numerics: the first layers of {model}")
        checks += model_numerics(model)
    say("speed")
    checks += speed(chip, bandwidth)
    checks += fit(chip, working_set, model)
    return {"mlx_hermes": __version__, "device": str(mx.default_device()),
            "ok": not any(c.status == "FAIL" for c in checks),
            "checks": [asdict(c) for c in checks]}


# ---- environment --------------------------------------------------------------------


def versions() -> dict:
    out = {"mlx-hermes": __version__, "python": platform.python_version(),
           "platform": f"{platform.system()} {platform.release()} {platform.machine()}"}
    for package in ("mlx", "mlx-lm", "transformers", "sentencepiece", "tokenizers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def wired_limit_mb(run: Callable[[list[str]], str] = None) -> Optional[int]:
    """`sysctl iogpu.wired_limit_mb` on a Mac (0: macOS's default); None elsewhere."""
    if platform.system() != "Darwin" and run is None:
        return None
    try:
        return int((run or _sysctl)(["sysctl", "-n", "iogpu.wired_limit_mb"]).strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def environment(chip: Chip, working_set: Optional[int],
                run: Callable[[list[str]], str] = None) -> list[Check]:
    v = versions()
    checks = [Check("environment", "versions", "ok",
                    ", ".join(f"{k} {val}" for k, val in v.items() if val), v)]
    device = str(mx.default_device())
    checks.append(Check("environment", "device", "ok", f"{device}: {chip.name}, "
                        f"{chip.memory_bytes / 1e9:.0f} GB" +
                        (f", {chip.gpu_cores} GPU cores" if chip.gpu_cores else ""),
                        {"device": device, "chip": chip.name, "memory_gb": chip.memory_bytes / 1e9,
                         "gpu_cores": chip.gpu_cores}))
    if working_set is not None:
        limit = wired_limit_mb(run)
        raised = bool(limit)
        checks.append(Check("environment", "gpu working set", "ok",
                            f"{working_set / 1e9:.1f} GB of {chip.memory_bytes / 1e9:.0f} GB"
                            + (f" (iogpu.wired_limit_mb raised to {limit})" if raised else
                               " (macOS default; `sudo sysctl iogpu.wired_limit_mb=N` raises it)"),
                            {"working_set_gb": working_set / 1e9, "wired_limit_mb": limit}))
    free = _free_disk_gb()
    checks.append(Check("environment", "disk", "ok" if free >= 30 else "warn",
                        f"{free:.0f} GB free where models are cached" +
                        ("" if free >= 30 else " (the 4-bit model needs ~26 GB)"),
                        {"free_gb": free}))
    return checks


def _free_disk_gb() -> float:
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE)
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free / 1e9


def _sysctl(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout


# ---- numerics -----------------------------------------------------------------------


def tiny_weights(seed: int = 0) -> tuple[ModelArgs, dict]:
    config = tiny_config(**SHAPE)
    config["vocab_size"] = VOCAB
    return ModelArgs.from_dict(config), {k: mx.array(v) for k, v in
                                         tiny_tensors(config, seed).items()}


def build(args: ModelArgs, weights: dict, dtype: mx.Dtype, bits: Optional[int],
          paths: FastPaths) -> tuple[Model, list[str]]:
    """The tiny model in `dtype` (4-bit with bf16 or float32 scales if `bits`),
    specialized as `paths` allow; and what was installed."""
    model = Model(args)
    weights = model.sanitize(dict(weights))
    model.load_weights(list(weights.items()))
    if bits:
        nn.quantize(model, group_size=GROUP_SIZE, bits=bits,
                    class_predicate=lambda path, m: hasattr(m, "to_quantized")
                    and not path.endswith("block_sparse_moe.gate"))  # the router stays float
    model.set_dtype(dtype, lambda t: mx.issubdtype(t, mx.floating))
    installed = specialize(model, paths)
    mx.eval(model.parameters())
    return model, installed


def trace(model: Model, tokens: list[int], feed: list[int]) -> np.ndarray:
    """The last position's logits after the prompt, then after each of `feed`
    with the KV cache: [1 + len(feed), V] in float32."""
    cache = make_cache(model)
    out = [model(mx.array([tokens]), cache=cache)[0, -1]]
    for t in feed:
        out.append(model(mx.array([[t]]), cache=cache)[0, -1])
    return np.array(mx.stack(out).astype(mx.float32))


def variants(device: mx.Device) -> list[tuple[str, mx.Dtype, Optional[int]]]:
    out = [("float32", mx.float32, None), ("4-bit", mx.float32, 4)]
    if device != mx.cpu:  # MLX's CPU runs float experts in float32 only
        out += [("bf16", mx.bfloat16, None), ("4-bit bf16", mx.bfloat16, 4)]
    return out


def path_choices(device: mx.Device) -> list[tuple[str, FastPaths]]:
    """The portable path, and each fast path alone."""
    none = FastPaths.none()
    return [("portable", none)] + [(name, replace(none, **{name: True}))
                                   for name in ("cpu_streams", "cuda_kernels", "dense_prefill")]


def numerics(seed: int = 0) -> list[Check]:
    args, weights = tiny_weights(seed)
    rng = np.random.default_rng(seed)
    tokens = [1] + rng.integers(3, VOCAB, size=PROMPT_TOKENS - 1).tolist()
    device = mx.default_device()
    checks = []
    for label, dtype, bits in variants(device):
        with mx.stream(mx.cpu):
            reference_model, _ = build(args, weights, mx.float32, bits, FastPaths.none())
            if bits and dtype != mx.float32:  # the same rounded scales as the model tested
                reference_model = _scales_rounded_like(reference_model, dtype)
            greedy = _greedy(reference_model, tokens)
            reference = trace(reference_model, tokens, greedy)
        seen = set()
        for name, paths in path_choices(device):
            model, installed = build(args, weights, dtype, bits, paths)
            installed = tuple(installed)
            if name != "portable" and (not installed or installed in seen):
                continue  # this fast path does not apply here
            seen.add(installed)
            checks.append(_compare(f"tiny {label}, {name}" +
                                   (f" ({', '.join(installed)})" if installed else ""),
                                   trace(model, tokens, greedy), reference, dtype))
    return checks


def _scales_rounded_like(model: Model, dtype: mx.Dtype) -> Model:
    for _, module in model.named_modules():
        if hasattr(module, "scales"):
            module.scales = module.scales.astype(dtype).astype(mx.float32)
            module.biases = module.biases.astype(dtype).astype(mx.float32)
    return model


def _greedy(model: Model, tokens: list[int]) -> list[int]:
    cache = make_cache(model)
    logits = model(mx.array([tokens]), cache=cache)[0, -1]
    out = []
    for _ in range(DECODE_STEPS):
        out.append(int(mx.argmax(logits).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)[0, -1]
    return out


def _compare(name: str, got: np.ndarray, reference: np.ndarray, dtype: mx.Dtype) -> Check:
    tolerance = TOLERANCE[dtype]
    finite = bool(np.isfinite(got).all())
    rel = float(np.abs(got - reference).max() / np.abs(reference).max()) if finite else float("inf")
    same = bool((got.argmax(-1) == reference.argmax(-1)).all())
    status = "FAIL" if rel > tolerance else ("ok" if same else "warn")
    figure = (f"max rel. logit difference {rel:.1e} (tolerance {tolerance:.0e}), greedy tokens "
              + ("equal" if same else "differ"))
    return Check("numerics", name, status, figure,
                 {"max_rel_diff": rel, "tolerance": tolerance, "greedy_equal": same})


def model_numerics(path_or_repo: str, layers: int = 2) -> list[Check]:
    """The given model's first `layers` layers here (every fast path that
    applies), against the same on the CPU in float32."""
    from .loader import load

    def first_layers(model: Model) -> Model:
        model.model.layers = model.model.layers[:layers]
        mx.eval(model.parameters())
        return model

    model = first_layers(load(path_or_repo, lazy=True)[0])
    with mx.stream(mx.cpu):
        reference_model = first_layers(load(path_or_repo, dtype="float32", lazy=True,
                                            fast_paths=FastPaths.none())[0])
        tokens = [1] + list(range(100, 100 + PROMPT_TOKENS - 1))
        greedy = _greedy(reference_model, tokens)
        reference = trace(reference_model, tokens, greedy)
    dtype = model.model.norm.weight.dtype
    return [_compare(f"--model, first {layers} layers", trace(model, tokens, greedy), reference,
                     dtype if dtype in TOLERANCE else mx.bfloat16)]


# ---- speed and fit ------------------------------------------------------------------


def speed(chip: Chip, bandwidth: bool = True) -> list[Check]:
    checks = []
    if bandwidth:
        measured = measure_bandwidth()
        rated = chip.rated_gbs
        share = measured / rated if rated else None
        status = "warn" if share is not None and share < 0.5 else "ok"
        figure = f"streaming copy {measured:.0f} GB/s" + (
            f", {100 * share:.0f}% of the chip's rated {rated:.0f} GB/s" if rated else "")
        checks.append(Check("speed", "memory bandwidth", status, figure,
                            {"measured_gbs": measured, "rated_gbs": rated}))
    args, weights = tiny_weights()
    model, _ = build(args, weights, mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16,
                     None, FastPaths())
    cache = make_cache(model)
    token = model(mx.array([[1, 2, 3]]), cache=cache)[0, -1].argmax()
    mx.eval(token)
    start, n = time.perf_counter(), 32
    for _ in range(n):
        token = model(token.reshape(1, 1), cache=cache)[0, -1].argmax()
        mx.eval(token)
    tps = n / (time.perf_counter() - start)
    checks.append(Check("speed", "tiny decode", "ok", f"{tps:.0f} tok/s (a tiny model: the "
                        "per-token overhead, not the real model's speed)", {"decode_tps": tps}))
    return checks


def fit(chip: Chip, working_set: Optional[int], model: Optional[str] = None) -> list[Check]:
    """Whether the model (or each quantization of the real one) fits here, with
    how much context, and the fix when it does not."""
    from .profile import GB, OVERHEAD_BYTES, fit_advice

    limit = working_set or chip.memory_bytes
    where = "the GPU working set" if working_set else "memory"
    if model is not None:
        from .loader import read_config, resolve_model_path, weight_files

        path = resolve_model_path(model)
        args = ModelArgs.from_dict(read_config(path))
        weights = sum(f.stat().st_size for f in weight_files(path))
        per_token = kv_cache_bytes(args, 1)
        room = limit - weights - OVERHEAD_BYTES
        context = int(min(args.max_position_embeddings, max(0, room // per_token)))
        rows = [{"label": "--model", "weights_gb": weights / GB, "max_context": context,
                 "fits": context >= 512}]
    else:
        rows = fit_advice(limit)
    checks = []
    for row in rows:
        label = row["label"]
        fits = row["fits"]
        figure = (f"{row['weights_gb']:.1f} GB of weights in {limit / 1e9:.1f} GB of {where}: " +
                  (f"fits with {row['max_context']} tokens of context" if fits else
                   "does not fit: a smaller recipe, --kv-bits 4, or on a Mac "
                   "`sudo sysctl iogpu.wired_limit_mb=N`"))
        checks.append(Check("fit", label, "ok" if fits else "warn", figure, dict(row)))
    return checks


def format_report(report: dict) -> str:
    lines = []
    group = None
    for c in report["checks"]:
        if c["group"] != group:
            group = c["group"]
            lines.append(f"{group}:")
        lines.append(f"  {c['status']:<4} {c['name']}: {c['figure']}")
    lines.append("all checks passed" if report["ok"] else
                 "some checks FAILED: please attach `mlx-hermes doctor --json` to an issue")
    return "\n".join(lines)
