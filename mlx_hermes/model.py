"""Mixtral, as Nous Hermes 2 Mixtral 8x7B uses it, in MLX.

Module names follow the mlx-lm layout (`block_sparse_moe.switch_mlp.*`), so
quantization settings and converted weights mean the same thing in both.
Shapes in comments: B batch, L new tokens, S cached + new tokens, D hidden,
H query heads, K kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from . import fusion
from .errors import HermesError
from .moe import SparseMoeBlock


# The one map between the original checkpoint's per-expert names and this
# model's stacked experts: `...block_sparse_moe.experts.E.w1` is row E of
# `...block_sparse_moe.switch_mlp.gate_proj` (sanitize, the converter, tests).
EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def checkpoint_expert_names(moe_prefix: str, projection: str, num_experts: int,
                            part: str = "weight") -> list[str]:
    """The checkpoint's tensors that make `moe_prefix.switch_mlp.projection.part`."""
    w = next(k for k, v in EXPERT_NAMES.items() if v == projection)
    return [f"{moe_prefix}.experts.{e}.{w}.{part}" for e in range(num_experts)]


@dataclass
class ModelArgs:
    """Every field of the checkpoint's config.json (MixtralForCausalLM)."""

    model_type: str = "mixtral"
    vocab_size: int = 32002
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False
    torch_dtype: Optional[str] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    architectures: list = field(default_factory=lambda: ["MixtralForCausalLM"])
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.02
    router_jitter_noise: float = 0.0
    use_cache: bool = True
    quantization: Optional[dict] = None

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """Reads both the original config.json and what transformers 5 writes
        (`rope_parameters`, `dtype`, `head_dim: null`)."""
        model_type = config.get("model_type")
        if model_type != "mixtral":
            raise HermesError(
                f"config.json has model_type {model_type!r}; mlx-hermes runs Mixtral "
                "checkpoints (model_type 'mixtral') only"
            )
        config = dict(config)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            raise HermesError(f"unsupported rope_type {rope['rope_type']!r} in config.json")
        if config.get("torch_dtype") is None and config.get("dtype") is not None:
            config["torch_dtype"] = config["dtype"]
        known = inspect.signature(cls).parameters
        args = cls(**{k: v for k, v in config.items() if k in known})
        args.validate()
        return args

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_act != "silu":
            raise HermesError(f"unsupported hidden_act {self.hidden_act!r} (Mixtral uses silu)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise HermesError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise HermesError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            # Mixtral 8x7B has none; a window would need a rotating cache and mask.
            raise HermesError(
                f"sliding_window {self.sliding_window} is not supported (Hermes 2 Mixtral has none)"
            )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = head_dim = args.dims_per_head
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, args.hidden_size, bias=False)
        self.rope = nn.RoPE(head_dim, traditional=False, base=args.rope_theta)

    def qkv_sizes(self) -> list[int]:
        return [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2

    def fuse(self) -> None:
        """q, k and v stacked into one qkv_proj [(H + 2K) * Dh, D]: a decoded
        token then launches one matmul for them, not three. Kept apart when
        stored differently (mixed conversions give v_proj more bits)."""
        if "qkv_proj" not in self:
            joined = fusion.join([self.q_proj, self.k_proj, self.v_proj])
            if joined is not None:
                self.qkv_proj = joined
                del self.q_proj, self.k_proj, self.v_proj

    def unfused_parameters(self) -> dict:
        """Parameters in the checkpoint's layout (q_proj, k_proj, v_proj, o_proj)."""
        params = dict(self.parameters())
        if "qkv_proj" in params:
            parts = fusion.split(params.pop("qkv_proj"), self.qkv_sizes())
            params.update(zip(("q_proj", "k_proj", "v_proj"), parts))
        return params

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        if "qkv_proj" in self:
            nq, nkv, _ = self.qkv_sizes()
            q, k, v = mx.split(self.qkv_proj(x), [nq, nq + nkv], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.heads(q, self.n_heads)  # [B, H, L, Dh]
        k = self.heads(k, self.n_kv_heads)  # [B, K, L, Dh]
        v = self.heads(v, self.n_kv_heads)  # [B, K, L, Dh]

        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, K, S, Dh]

        out = self.attend(q, k, v, mask, cache)  # [B, H, L, Dh]
        if L > 1:
            out = out.transpose(0, 2, 1, 3)  # [B, L, H, Dh]
        return self.o_proj(out.reshape(B, L, -1))  # [B, L, D]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, cache: Any) -> mx.array:
        """softmax(q k^T * scale + mask) v: [B, H, L, Dh]. mlx-lm's wrapper:
        mx.fast SDPA, or its quantized path when the cache is quantized."""
        return scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)

    @staticmethod
    def heads(x: mx.array, n: int) -> mx.array:
        """[B, L, n * Dh] -> [B, n, L, Dh]. A decoded token (L = 1) needs no
        transpose, as the memory order is the same: an op a tensor less for
        the host to dispatch every token (host work bounds GPU decoding)."""
        B, L, _ = x.shape
        if L == 1:
            return x.reshape(B, n, 1, -1)
        return x.reshape(B, L, n, -1).transpose(0, 2, 1, 3)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.block_sparse_moe = SparseMoeBlock(
            args.hidden_size,
            args.intermediate_size,
            args.num_local_experts,
            args.num_experts_per_tok,
        )
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


def attention_mask(h: mx.array, cache: Any) -> Any:
    """mlx-lm's mask for `h` [B, L, D] over the cache, but none for one token
    of one sequence: it sees every cached token. mlx-lm's batch cache always
    makes an array mask, even for a lone sequence (which never has padding:
    the cache drops the padding its rows share), and attention with an
    array mask is slower than without."""
    if h.shape[0] == 1 and h.shape[1] == 1:
        return None
    return create_attention_mask(h, cache)


class MixtralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        h = self.embed_tokens(tokens)  # [B, L, D]
        if cache is None:
            cache = [None] * len(self.layers)
        mask = attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = MixtralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        h = self.model(tokens, cache)  # [B, L, D]
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)  # [B, L, V]

    @property
    def layers(self) -> list:
        return self.model.layers

    def fuse(self) -> None:
        """q/k/v and gate/up as one matrix each (Attention.fuse, Experts.fuse):
        a load step (specialize), after the checkpoint's weights are in."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.block_sparse_moe.switch_mlp.fuse()

    def checkpoint_parameters(self) -> dict:
        """Parameters named as in the checkpoint (mlx-lm's layout), fused or not."""
        params = self.parameters()
        for i, layer in enumerate(self.layers):
            params["model"]["layers"][i]["self_attn"] = layer.self_attn.unfused_parameters()
            moe = params["model"]["layers"][i]["block_sparse_moe"]
            moe["switch_mlp"] = layer.block_sparse_moe.switch_mlp.unfused_parameters()
        return params

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The one place where checkpoint names meet module names.

        Original checkpoints (and the old mlx-community layout, quantized per
        expert) keep each expert as `experts.E.w{1,2,3}`; they are stacked
        here into `switch_mlp.{gate,down,up}_proj` of shape [E, out, in].
        """
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        for layer in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{layer}.block_sparse_moe"
            for new in EXPERT_NAMES.values():
                for part in ("weight", "scales", "biases"):
                    names = checkpoint_expert_names(prefix, new, self.args.num_local_experts,
                                                    part)
                    present = [n for n in names if n in weights]
                    if not present:
                        continue
                    if len(present) < len(names):
                        missing = next(n for n in names if n not in weights)
                        raise HermesError(f"missing tensor {missing}")
                    tensors = [weights.pop(n) for n in names]
                    for n, t in zip(names, tensors):
                        if t.shape != tensors[0].shape:
                            raise HermesError(
                                f"tensor {n} has shape {list(t.shape)}, but "
                                f"{names[0]} has {list(tensors[0].shape)}"
                            )
                    weights[f"{prefix}.switch_mlp.{new}.{part}"] = mx.stack(tensors)
        return weights
