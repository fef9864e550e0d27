"""Tokens/s and memory bandwidth, against what this machine's memory can do.

A decoded token reads the dense weights, k of E experts in every layer and
the LM head; decode speed is bounded by how fast memory streams those bytes.
`profile` measures prefill and decode, counts the bytes each token reads
from the model's actual tensors, and holds the result against the chip's
peak bandwidth. A synthetic model of the real shapes, built directly in
quantized form, lets a user measure a machine before downloading 26+ GB.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.generate import generate_step
from mlx_lm.models.switch_layers import SwitchLinear

from .cache import make_cache
from .chip import Chip
from .errors import HermesError
from .formats import Recipe, Width, recipe
from .model import Model, ModelArgs
from .specialize import FastPaths, install, specialize

GB = 1e9
HERMES_8X7B = ModelArgs()  # the real checkpoint's shape
TINY = ModelArgs(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2)
SYNTHETIC = {"8x7b": HERMES_8X7B, "tiny": TINY}
OVERHEAD_BYTES = 2**30  # activations, MLX's buffers, the process: a margin


# -- building a model of the real shapes, quantized from the start ----------

def _quantizable(_, module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, SwitchLinear))


def synthetic_model(name: str, layers: Optional[int] = None, bits: int = 4,
                    group_size: int = 64, dtype: mx.Dtype = mx.bfloat16,
                    progress: Optional[Callable[[int, int], None]] = None,
                    fast_paths: Optional[FastPaths] = FastPaths(),
                    stored_as: Optional[Recipe] = None) -> Model:
    """Random weights of the named shape, made directly in quantized form one
    layer at a time, so no full-precision copy ever exists: every weight at
    `bits` in groups of `group_size`, or as the recipe `stored_as` says.
    Random packed weights route tokens about uniformly over the experts.
    Specialized for this machine as a loaded model is (`fast_paths=None`:
    not even fused)."""
    stored_as = stored_as or recipe("uniform", bits, group_size)
    if name not in SYNTHETIC:
        raise HermesError(f"unknown synthetic model {name!r}; use {' or '.join(SYNTHETIC)}")
    args = SYNTHETIC[name]
    if layers is not None:
        # Prefill never evaluates the last layer's experts (only the KV cache is
        # needed), so one layer alone cannot stand for the others.
        if not 2 <= layers <= args.num_hidden_layers:
            raise HermesError(f"--layers must be between 2 and {args.num_hidden_layers}")
        args = replace(args, num_hidden_layers=layers)
    model = Model(args)
    # Only shapes and classes change here; the float initial values are lazy
    # and are replaced before anything is evaluated.
    def width(path: str) -> Width:
        return stored_as.width(path, args.num_hidden_layers)

    nn.quantize(model, class_predicate=lambda path, m: _quantizable(path, m) and asdict(width(path)))
    parts = {"model.embed_tokens": model.model.embed_tokens,
             **{f"model.layers.{i}": layer for i, layer in enumerate(model.layers)},
             "model.norm": model.model.norm, "lm_head": model.lm_head}
    for i, (prefix, part) in enumerate(parts.items()):
        def random(path: str, p: mx.array) -> mx.array:
            module = f"{prefix}.{path}".rsplit(".", 1)[0]
            return _random_like(path, p, width(module) if p.ndim > 1 else None, dtype)

        part.update(tree_map_with_path(random, part.parameters()))
        if fast_paths is not None and hasattr(part, "block_sparse_moe"):
            part.self_attn.fuse()  # now, so that the unfused halves can go
            part.block_sparse_moe.switch_mlp.fuse()
        mx.eval(part.parameters())
        if progress:
            progress(i + 1, len(parts))
    if fast_paths is not None:
        specialize(model, fast_paths)
    return model


def _random_like(path: str, p: mx.array, width: Optional[Width], dtype: mx.Dtype) -> mx.array:
    if p.dtype == mx.uint32:  # packed quantized weights: uniformly random codes
        high, low = (mx.random.randint(0, 2**16, p.shape, dtype=mx.uint32) for _ in range(2))
        return (high << 16) | low
    if p.ndim == 1:  # RMSNorm
        return mx.ones(p.shape, dtype)
    # Codes 0..2^bits-1 map onto about +-2 standard deviations of an
    # N(0, 1/sqrt(in)) weight, centred on zero: w = scale * code + bias.
    levels = 2**width.bits - 1
    inputs = p.shape[-1] * width.group_size
    scale = mx.random.uniform(0.9, 1.1, p.shape) * 4 * inputs ** -0.5 / levels
    return (-scale * levels / 2 if path.endswith("biases") else scale).astype(dtype)


# -- what a token reads ---------------------------------------------------------

def bytes_per_token(model: Model, full_layers: Optional[int] = None,
                    float_bytes: Optional[int] = None) -> int:
    """Weight bytes one decoded token reads: the dense parts, k/E of the
    experts in every layer, the LM head, and one row of the embedding table.
    With `full_layers`, the model's layers stand for that many. With
    `float_bytes`, float tensors (scales, biases, norms) count at that size."""
    args = model.args
    total = _nbytes(model.model.norm, float_bytes)
    total += _nbytes(model.model.embed_tokens, float_bytes) // args.vocab_size
    if not args.tie_word_embeddings:
        total += _nbytes(model.lm_head, float_bytes)
    share = args.num_experts_per_tok / args.num_local_experts
    layers = 0
    for layer in model.layers:
        for name, p in tree_flatten(layer.parameters()):
            n = _size(p, float_bytes)
            layers += n * share if ".switch_mlp." in f".{name}" else n
    return int(total + layers * (full_layers or len(model.layers)) / len(model.layers))


def _size(p: mx.array, float_bytes: Optional[int] = None) -> int:
    if float_bytes and mx.issubdtype(p.dtype, mx.floating):
        return p.size * float_bytes
    return p.nbytes


def _nbytes(module: nn.Module, float_bytes: Optional[int] = None) -> int:
    return sum(_size(p, float_bytes) for _, p in tree_flatten(module.parameters()))


def model_bytes(model: Model) -> int:
    return _nbytes(model)


# -- fit advice -----------------------------------------------------------------

def recipe_size(args: ModelArgs, recipe: Recipe) -> int:
    """Bytes of the model stored as `recipe` (bf16 scales and biases, norms in bf16)."""
    model = Model(args)  # lazy: shapes only
    total = 0
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, SwitchLinear)):
            w = recipe.width(path, args.num_hidden_layers)
            n = int(np.prod(module.weight.shape))
            total += n * w.bits // 8 + 2 * 2 * (n // w.group_size)
        elif isinstance(module, nn.RMSNorm):
            total += module.weight.size * 2
    return total


def quantized_size(args: ModelArgs, bits: int, group_size: int = 64) -> int:
    """Bytes of the model at `bits` everywhere (the uniform recipe)."""
    return recipe_size(args, recipe("uniform", bits, group_size))


def advice_recipes() -> list[Recipe]:
    """What the fit advice and `convert --fit` choose from, largest (best) first."""
    return [recipe("uniform", 8), recipe("uniform", 6), recipe("uniform", 5),
            recipe("mixed", 4), recipe("uniform", 4), recipe("fit-32gb"), recipe("fit-24gb")]


def fit_advice(limit_bytes: int, args: ModelArgs = HERMES_8X7B) -> list[dict]:
    """For each recipe: its size, and the longest context that fits in
    `limit_bytes` next to it (weights + fp16 KV cache + a margin)."""
    from .memory import kv_cache_bytes

    per_token = kv_cache_bytes(args, 1)
    advice = []
    for r in advice_recipes():
        size = recipe_size(args, r)
        room = limit_bytes - size - OVERHEAD_BYTES
        context = min(args.max_position_embeddings, max(0, room // per_token))
        advice.append({"recipe": r.name, "label": r.label, "bits": r.experts.bits,
                       "weights_gb": size / GB, "max_context": int(context),
                       "fits": context >= 512})
    return advice


def format_advice(advice: list[dict], limit_bytes: int, what: str) -> str:
    lines = [f"fit in {limit_bytes / GB:.1f} GB ({what}); each token of context adds "
             f"{kv_per_token_kib()} KiB of fp16 KV cache, plus ~{OVERHEAD_BYTES / 2**30:.0f} GB "
             "margin:"]
    for a in advice:
        verdict = (f"fits with {a['max_context']} tokens of context" if a["fits"]
                   else "does not fit")
        lines.append(f"  {a['label']:<30} {a['weights_gb']:5.1f} GB  {verdict}")
    return "\n".join(lines)


def kv_per_token_kib(args: ModelArgs = HERMES_8X7B) -> int:
    from .memory import kv_cache_bytes

    return kv_cache_bytes(args, 1) // 1024


# -- measuring --------------------------------------------------------------------

class CountingRouter(nn.Module):
    """A router (nn.Linear or QuantizedLinear) that also counts the top k
    experts of each token it routes: the profile's histogram. Installed on
    `block.gate` for a run, it sees every path, the CUDA kernels' included,
    since all of them ask the router for their logits."""

    tally: "_Tally"

    def __call__(self, x: mx.array) -> mx.array:
        logits = super().__call__(x)  # [..., E]
        self.tally.add(logits)
        return logits


class _Tally:
    def __init__(self, experts: int, k: int):
        self.k, self.experts = k, mx.arange(experts)
        self.counts = mx.zeros((experts,), mx.int32)

    def add(self, logits: mx.array) -> None:
        top = mx.argpartition(-logits, kth=self.k - 1, axis=-1)[..., : self.k]  # [..., k]
        hits = (top[..., None] == self.experts).sum(axis=tuple(range(top.ndim)))
        self.counts = self.counts + hits.astype(mx.int32)


class _ExpertCounter:
    """Counts the experts each MoE block routes to, while it is installed."""

    def __init__(self, model: Model):
        self.routers = [layer.block_sparse_moe.gate for layer in model.layers]
        self.k = model.args.num_experts_per_tok

    def __enter__(self):
        self.classes = [type(r) for r in self.routers]
        for router in self.routers:
            install(router, CountingRouter).tally = _Tally(router.weight.shape[0], self.k)
        return self

    def __exit__(self, *exc):
        for router, cls in zip(self.routers, self.classes):
            router.__class__ = cls

    @property
    def counts(self) -> list[mx.array]:
        return [r.tally.counts for r in self.routers]


def time_generation(model: nn.Module, prompt: list[int], gen_tokens: int,
                    cache: list) -> dict:
    """One trial: prefill the prompt, then decode `gen_tokens` greedily,
    ignoring end-of-text tokens (a random model emits them at random)."""
    start = time.perf_counter()
    steps = generate_step(mx.array(prompt), model, max_tokens=gen_tokens, prompt_cache=cache)
    first = None
    n = 0
    for _token, _ in steps:
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": first - start, "prompt_tps": len(prompt) / (first - start),
            "decode_tps": (n - 1) / (end - first) if n > 1 else 0.0}


def time_split(model: Model, context: int = 128, repeats: int = 5) -> dict:
    """Seconds of one decode step spent in attention, the MoE blocks and the
    LM head, each evaluated on its own (so the sum exceeds a fused step)."""
    args = model.args
    cache = make_cache(model)
    model(mx.array([[1] * context]), cache=cache)
    mx.eval([c.state for c in cache])
    x = mx.random.normal((1, 1, args.hidden_size)).astype(_dtype(model))
    mx.eval(x)

    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t)
        return min(times)

    def attention():
        outs = []
        for layer, c in zip(model.layers, cache):
            outs.append(layer.self_attn(layer.input_layernorm(x), None, c))
            c.trim(1)  # leave the cache as it was
        return outs

    moe = best(lambda: [layer.block_sparse_moe(layer.post_attention_layernorm(x))
                        for layer in model.layers])
    head = best(lambda: model.lm_head(model.model.norm(x)) if not args.tie_word_embeddings
                else model.model.embed_tokens.as_linear(x))
    return {"attention_s": best(attention), "moe_s": moe, "lm_head_s": head}


def _dtype(model: Model) -> mx.Dtype:
    return model.model.norm.weight.dtype




def mlx_lm_twin(model: Model, dtype: mx.Dtype) -> nn.Module:
    """mlx-lm's Mixtral holding the same packed weights, with its float
    parameters in `dtype`, as mlx-lm would load them."""
    from mlx_lm.models import mixtral

    from .loader import quantize_like

    twin = mixtral.Model(mixtral.ModelArgs.from_dict({**vars(model.args),
                                                      "model_type": "mixtral"}))
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in tree_flatten(model.checkpoint_parameters())}
    quantize_like(twin, weights, {})
    twin.load_weights(list(weights.items()))
    mx.eval(twin.parameters())
    return twin


class _Progress:
    """Says which phase runs, with an estimate of the time left from the runs so far."""

    def __init__(self, report: Optional[Callable[[str], None]], runs: int):
        self.report, self.runs_left, self.run_s = report, runs, None
        self.start = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.report is None:
            return
        left = ""
        if self.run_s is not None:
            seconds = self.runs_left * self.run_s
            left = f" (about {seconds / 60:.0f} min left)" if seconds >= 90 else (
                f" (about {seconds:.0f} s left)")
        self.report(f"{phase}{left}")

    def ran(self, result: dict, gen_tokens: int) -> None:
        """One more run done: its length, or the warm-up's, estimates the next."""
        self.runs_left -= 1
        self.run_s = result["ttft_s"] + (gen_tokens - 1) / max(result["decode_tps"], 1e-9)


def profile(model: Model, chip: Chip, prompt_tokens: int = 512, gen_tokens: int = 128,
            trials: int = 3, compare_mlx_lm: bool = False, mlx_lm_dtype: Optional[mx.Dtype] = None,
            full_layers: Optional[int] = None, seed: int = 0,
            progress: Optional[Callable[[str], None]] = None) -> dict:
    """Measure `trials` runs (alternating with mlx-lm's Mixtral on the same
    weights if asked) and derive bandwidth figures. With `full_layers`, the
    model holds only some of that many layers and per-token figures are
    extrapolated to the full depth. `progress(text)` hears of each phase."""
    args = model.args
    if prompt_tokens < 1 or gen_tokens < 2 or trials < 1:
        raise HermesError("--prompt-tokens must be >= 1, --gen-tokens >= 2, --trials >= 1")
    if prompt_tokens + gen_tokens > args.max_position_embeddings:
        raise HermesError(f"--prompt-tokens plus --gen-tokens exceeds the context of "
                          f"{args.max_position_embeddings}")
    rng = np.random.default_rng(seed)
    prompt = [1] + rng.integers(3, args.vocab_size, size=prompt_tokens - 1).tolist()
    twin = mlx_lm_twin(model, mlx_lm_dtype or _dtype(model)) if compare_mlx_lm else None

    who = [("mlx-hermes", model)] + ([("mlx-lm", twin)] if twin is not None else [])
    step = _Progress(progress, trials * len(who) + 1)
    # one untimed run each at the measured shapes: kernels compile, caches warm
    for name, m in who:
        step(f"warming up {name} (an untimed run: {prompt_tokens} prompt tokens, 4 more)")
        warm = time_generation(m, prompt, 4, make_cache(model))
        step.run_s = warm["ttft_s"] + (gen_tokens - 1) / max(warm["decode_tps"], 1e-9)

    mx.reset_peak_memory()
    runs: dict[str, list[dict]] = {"mlx-hermes": [], "mlx-lm": []}
    for trial in range(trials):
        for name, m in who:
            step(f"trial {trial + 1}/{trials}: {name}")
            runs[name].append(time_generation(m, prompt, gen_tokens, make_cache(model)))
            step.ran(runs[name][-1], gen_tokens)
    peak_memory = mx.get_peak_memory()
    del twin, who
    # Counting adds work to every step, so the experts are counted in a run of their own.
    step("counting the experts chosen (one more run)")
    with _ExpertCounter(model) as counter:
        time_generation(model, prompt, gen_tokens, make_cache(model))
        mx.eval(counter.counts)
    step.runs_left, step.run_s = 0, None
    step("timing attention, experts and LM head apart")
    split = time_split(model)

    scale = prefill_scale = 1.0
    if full_layers and full_layers != args.num_hidden_layers:
        scale = full_layers / args.num_hidden_layers
        # Prefill computes the last layer's experts for the last token only
        # (the other tokens need just their keys and values), so n layers'
        # prompt time holds n - 1 layers' expert work.
        prefill_scale = (full_layers - 1) / (args.num_hidden_layers - 1)
    per_token = bytes_per_token(model, full_layers)

    result = {"model_layers": args.num_hidden_layers, "full_layers": full_layers or
              args.num_hidden_layers, "extrapolated": scale != 1.0,
              "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "trials": trials}
    for who, trial_runs in runs.items():
        if not trial_runs:
            continue
        stats = _summarise(trial_runs, split, scale, prefill_scale)
        result[who] = stats
    ours = result["mlx-hermes"]
    peak_gbs = chip.peak_gbs
    bandwidth = per_token * ours["decode_tps"] / GB
    result.update({
        "prompt_tps": ours["prompt_tps"], "decode_tps": ours["decode_tps"],
        "ttft_s": ours["ttft_s"], "decode_tps_spread": ours["decode_tps_spread"],
        "peak_memory_gb": peak_memory / GB,
        "bytes_per_token": per_token,
        # what the same weights read with 16-bit scales and norms, as a GPU keeps them
        "bytes_per_token_16bit": bytes_per_token(model, full_layers, float_bytes=2),
        "bandwidth_gbs": bandwidth,
        "peak_bandwidth_gbs": peak_gbs,
        "rated_bandwidth_gbs": chip.rated_gbs,
        "measured_bandwidth_gbs": chip.measured_gbs,
        "roofline_fraction": bandwidth / peak_gbs if peak_gbs else None,
        "roofline_decode_tps": peak_gbs * GB / per_token if peak_gbs else None,
        "time_split": {k: v * (scale if k != "lm_head_s" else 1.0) for k, v in split.items()},
        "expert_counts": [c.tolist() for c in counter.counts],
        "chip": chip.name,
        "device": "cpu" if mx.default_device() == mx.cpu else "gpu",
    })
    if "mlx-lm" in result:
        result["speedup_vs_mlx_lm"] = {
            "decode": ours["decode_tps"] / result["mlx-lm"]["decode_tps"],
            "prefill": ours["prompt_tps"] / result["mlx-lm"]["prompt_tps"],
        }
    return result




def _summarise(runs: list[dict], split: dict, scale: float, prefill_scale: float) -> dict:
    """Mean and spread over trials, scaled to the full depth if needed: time
    in the layers grows with their number, the LM head's does not."""
    out = {}
    head = split["lm_head_s"]
    for key in ("prompt_tps", "decode_tps", "ttft_s"):
        values = [r[key] for r in runs]
        if scale != 1.0:
            if key == "decode_tps":
                values = [1 / ((1 / v - head) * scale + head) for v in values]
            elif key == "ttft_s":
                values = [v * prefill_scale for v in values]
            else:
                values = [v / prefill_scale for v in values]
        out[key] = statistics.fmean(values)
        out[f"{key}_spread"] = (max(values) - min(values)) / 2
        out[f"{key}_trials"] = values
    return out


def format_table(result: dict) -> str:
    """A llama-bench-like table."""
    note = (f" (extrapolated from {result['model_layers']} of {result['full_layers']} layers)"
            if result["extrapolated"] else "")
    rows = [f"chip: {result['chip']}{note}",
            f"{'runtime':<11} {'prompt tok/s':>14} {'ttft s':>8} {'decode tok/s':>16}"]
    for who in ("mlx-hermes", "mlx-lm"):
        if who in result:
            r = result[who]
            rows.append(f"{who:<11} {r['prompt_tps']:9.1f} ±{r['prompt_tps_spread']:<4.1f} "
                        f"{r['ttft_s']:8.3f} {r['decode_tps']:10.2f} ±{r['decode_tps_spread']:.2f}")
    if "speedup_vs_mlx_lm" in result:
        s = result["speedup_vs_mlx_lm"]
        rows.append(f"mlx-hermes / mlx-lm: decode {s['decode']:.2f}x, prefill {s['prefill']:.2f}x")
    rows.append(f"weights read per token: {result['bytes_per_token'] / GB:.3f} GB; "
                f"achieved {result['bandwidth_gbs']:.1f} GB/s")
    if result["bytes_per_token_16bit"] != result["bytes_per_token"]:
        rows.append(f"  (scales and norms in float32, as computed on a CPU; with the 16-bit ones "
                    f"a GPU keeps: {result['bytes_per_token_16bit'] / GB:.3f} GB)")
    if result["peak_bandwidth_gbs"]:
        peak = f"peak {result['peak_bandwidth_gbs']:.0f} GB/s"
        if result["rated_bandwidth_gbs"] and result["measured_bandwidth_gbs"]:
            peak += (f" (measured; rated {result['rated_bandwidth_gbs']:.0f})")
        rows.append(f"{peak}: {100 * result['roofline_fraction']:.1f}% of it; roofline decode "
                    f"{result['roofline_decode_tps']:.1f} tok/s")
    if result["device"] == "cpu":
        rows.append("  (on a CPU, MLX's quantized expert kernels read each chosen expert once per "
                    "token in prefill as in decode: prefill is not much faster per token)")
    t = result["time_split"]
    total = sum(t.values())
    rows.append("one decode step: " + ", ".join(
        f"{k[:-2]} {1000 * v:.2f} ms ({100 * v / total:.0f}%)" for k, v in t.items()))
    rows.append(f"peak memory {result['peak_memory_gb']:.2f} GB")
    rows.append("experts chosen per layer (counts):")
    for i, counts in enumerate(result["expert_counts"]):
        rows.append(f"  layer {i:>2}: " + " ".join(f"{c:>5}" for c in counts))
    return "\n".join(rows)


def format_ranks(ranks: list[dict]) -> str:
    """The per-rank table of a profile run under mlx.launch."""
    lines = ["", "rank  weights held  read per token  communication per token  decode tok/s"]
    for r in ranks:
        share = r["comm_ms_per_token"] / (1e3 / r["decode_tps"]) if r["decode_tps"] else 0.0
        lines.append(f"{r['rank']:>4}  {r['weights_gb']:>9.2f} GB  {r['bytes_per_token_gb']:>11.3f} GB"
                     f"  {r['comm_ms_per_token']:>9.2f} ms ({share:>4.0%} of a token)"
                     f"  {r['decode_tps']:>12.1f}")
    return "\n".join(lines)


# -- the profile command ----------------------------------------------------------


@dataclass
class Machine:
    """The chip, its bandwidth, and the memory a model may use here."""

    chip: Chip
    working_set: Optional[int]  # a Mac's GPU working set, or None elsewhere

    @classmethod
    def here(cls) -> "Machine":
        from .chip import detect, measure_bandwidth
        from .memory import metal_working_set

        chip = detect()
        if not chip.name.startswith("Apple"):
            chip.measured_gbs = measure_bandwidth()
        return cls(chip, metal_working_set())

    @property
    def limit(self) -> int:
        return self.working_set or self.chip.memory_bytes

    @property
    def limit_name(self) -> str:
        return "this Mac's GPU working set" if self.working_set else "this machine's memory"


def compute_dtype() -> mx.Dtype:
    """Synthetic models compute as loaded ones do: float32 on a CPU, else bf16."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def check_synthetic_fits(name: str, stored_as: Recipe, layers: Optional[int],
                         machine: Machine) -> None:
    need = recipe_size(SYNTHETIC[name], stored_as)
    if layers is None and need + OVERHEAD_BYTES > machine.limit:
        raise HermesError(
            f"the full {name} model as {stored_as.label} needs {need / 1e9:.1f} GB but this machine "
            f"allows {machine.limit / 1e9:.1f} GB: measure with --layers N (e.g. 4), whose "
            "figures are extrapolated to the full model")


def run(model: Model, machine: Machine, prompt_tokens: int, gen_tokens: int, trials: int,
        compare_mlx_lm: bool = False, synthetic: Optional[str] = None,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    """`profile` for a loaded or synthetic model, with the fit advice for this
    machine and, on a model split over ranks, the per-rank table."""
    from .formats import to_dtype

    if synthetic:  # mlx-lm's twin gets what a converted checkpoint stores
        full_layers, checkpoint_dtype = SYNTHETIC[synthetic].num_hidden_layers, mx.bfloat16
    else:
        full_layers, checkpoint_dtype = None, to_dtype(model.args.torch_dtype or "bfloat16")
    result = profile(model, machine.chip, prompt_tokens, gen_tokens, trials,
                     compare_mlx_lm=compare_mlx_lm, mlx_lm_dtype=checkpoint_dtype,
                     full_layers=full_layers, progress=progress)
    group = getattr(model, "group", None)
    if group is not None:
        from .distributed import rank_report

        result["ranks"] = rank_report(model, group, result["decode_tps"])
    result["fit"] = fit_advice(machine.limit)
    result["fit_limit_gb"] = machine.limit / GB
    return result


def local_cost(decode_tps: float, watts: float, kwh_price: float,
               cloud_price: Optional[float] = None) -> dict:
    """Electricity per million generated tokens at the measured decode speed and the
    draw the user measured (nothing is assumed about power)."""
    kwh = watts * (1e6 / decode_tps) / 3.6e6
    return {"watts": watts, "kwh_price": kwh_price, "decode_tps": decode_tps,
            "kwh_per_million_tokens": kwh, "cost_per_million_tokens": kwh * kwh_price,
            "cloud_price_per_million_tokens": cloud_price}


def format_cost(cost: dict) -> str:
    line = (f"electricity: {cost['cost_per_million_tokens']:.3f} per million generated tokens "
            f"({cost['kwh_per_million_tokens']:.2f} kWh at {cost['watts']:.0f} W and "
            f"{cost['decode_tps']:.1f} tok/s, {cost['kwh_price']} per kWh)")
    if cost["cloud_price_per_million_tokens"] is not None:
        line += f"; the cloud price given: {cost['cloud_price_per_million_tokens']}"
    return line


def format_report(result: dict, machine: Machine) -> str:
    """The table, then the per-rank table or the fit advice."""
    parts = [format_table(result)]
    if "cost" in result:
        parts.append(format_cost(result["cost"]))
    if "ranks" in result:
        return "\n".join(parts + [format_ranks(result["ranks"])])
    parts.append(format_advice(result["fit"], machine.limit, machine.limit_name))
    if machine.working_set:
        raised = machine.chip.memory_bytes - 4 * 2**30
        parts.append(format_advice(fit_advice(raised), raised, "after `sudo sysctl "
                                   f"iogpu.wired_limit_mb={raised // 2**20}`"))
    return "\n".join(parts)

