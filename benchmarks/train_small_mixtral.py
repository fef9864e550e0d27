"""Train a small Mixtral on real text, so that recipes can be compared on weights
that learned something (random weights make every recipe look alike).

    python benchmarks/train_small_mixtral.py OUT [--seconds 240] [--corpus DIR]

The corpus is Python's own standard library (its .py files: code, docstrings
and comments), found offline on any machine with Python; files whose name
hashes to 0 mod 10 are held out (`--heldout FILE` writes them, for
`mlx-hermes perplexity`; any Python's standard library gives the same held-out
file names). The model (8 experts, top-2, 4 layers, hidden 256,
the real Hermes tokenizer; ~30M parameters) is saved in the original Hugging
Face layout (per-expert w1/w2/w3, bf16, shards under 16 MiB), so the
converter takes it as it takes the real checkpoint. MLX trains on the GPU
machine as on a CPU (slowly there).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_hermes import tiny  # noqa: E402
from mlx_hermes.model import EXPERT_NAMES, Model, ModelArgs  # noqa: E402
from mlx_hermes.tokenizer import Tokenizer  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, num_local_experts=8)


def corpus(folder: Path) -> tuple[list[str], list[str]]:
    train, held = [], []
    for f in sorted(folder.rglob("*.py")):
        if "test" in f.parts or "site-packages" in f.parts:
            continue
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        (held if zlib.crc32(f.name.encode()) % 10 == 0 else train).append(text)
    return train, held


def checkpoint_tensors(model: Model) -> dict[str, mx.array]:
    """The model's parameters under the original checkpoint's names."""
    out = {}
    for name, value in tree_flatten(model.checkpoint_parameters()):
        if ".switch_mlp." in name:
            prefix, rest = name.split(".switch_mlp.")
            proj = rest.split(".")[0]
            w = next(k for k, v in EXPERT_NAMES.items() if v == proj)
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{w}.weight"] = value[e]
        else:
            out[name] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--heldout", type=Path, default=None,
                    help="write the held-out files here and stop (no training)")
    ap.add_argument("--train-text", type=Path, default=None,
                    help="write the training files here and stop (calibration text for GPTQ)")
    a = ap.parse_args()
    mx.random.seed(0)
    config = tiny.tiny_config(**SHAPE, torch_dtype="bfloat16")
    args = ModelArgs.from_dict(config)
    tokenizer = Tokenizer.from_path(tiny.TOKENIZER)
    train, held = corpus(a.corpus)
    if a.heldout or a.train_text:
        for path, texts in ((a.heldout, held), (a.train_text, train)):
            if path:
                path.write_text("\n\n".join(texts))
                print(f"{len(texts)} files written to {path}")
        return
    ids = np.array([i for text in train for i in tokenizer.encode(text)], dtype=np.int32)
    print(f"{len(train)} files, {len(ids)} training tokens; {len(held)} held out", flush=True)

    model = Model(args)
    weights = {k: mx.array(v) for k, v in tiny.tiny_tensors(config, seed=0).items()}
    model.load_weights(list(model.sanitize(weights).items()))
    optimizer = optim.AdamW(learning_rate=optim.cosine_decay(1e-3, 20000, 1e-4),
                            weight_decay=0.01)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    rng = np.random.default_rng(0)
    start, n, tokens = time.perf_counter(), 0, 0
    while time.perf_counter() - start < a.seconds:
        at = rng.integers(0, len(ids) - a.seq - 1, a.batch)
        batch = np.stack([ids[i : i + a.seq + 1] for i in at])
        loss, grads = step(model, mx.array(batch[:, :-1]), mx.array(batch[:, 1:]))
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        n, tokens = n + 1, tokens + a.batch * a.seq
        if n % 50 == 0:
            print(f"step {n}: loss {loss.item():.3f}, {tokens / (time.perf_counter() - start):.0f} "
                  "tok/s", flush=True)
    print(f"trained {n} steps, {tokens} tokens, final loss {loss.item():.3f}", flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    save(checkpoint_tensors(model), a.out)
    (a.out / "config.json").write_text(json.dumps(config, indent=2))
    print(json.dumps({"steps": n, "tokens": tokens, "final_loss": loss.item(),
                      "seconds": a.seconds, **SHAPE}))


def save(tensors: dict[str, mx.array], out: Path, shard_bytes: int = 15 * 2**20) -> None:
    """bf16 safetensors shards of at most `shard_bytes` (what comes back from the GPU
    machine is at most 16 MiB a file), with an index, as transformers writes them.
    The tokenizer is not copied: add it with mlx_hermes.tiny.copy_tokenizer."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        if size + t.size * 2 > shard_bytes and shards[-1]:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += t.size * 2
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / file), {n: tensors[n].astype(mx.bfloat16) for n in names},
                            metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.size * 2 for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


if __name__ == "__main__":
    main()
