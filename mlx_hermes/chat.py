"""Multi-turn ChatML conversations that keep their KV cache between turns.

The session keeps the conversation as the exact tokens the model saw
(`history`), not as re-rendered text: sampled tokens need not be the
canonical tokenization of their text, and re-tokenizing would change the
prefix and force a full re-prefill. Each turn feeds only what the cache does
not already hold: the longest common prefix of the cached tokens and the new
conversation is kept, the rest trimmed. That one rule also covers Ctrl-C in
the middle of a reply, a changed system prompt and dropped turns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from .cache import make_cache, trim_to
from .errors import HermesError, first_line
from .generate import Chunk, stream_generate
from .model import Model
from .tokenizer import Tokenizer

_FORMAT = "mlx-hermes-chat/1"


class ContextFull(HermesError):
    """The next turn does not fit: drop old turns or start over."""


class ChatSession:
    """A conversation with the model. Options are those of `stream_generate`."""

    def __init__(self, model: Model, tokenizer: Tokenizer, system: Optional[str] = None,
                 **options):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.last_stats: Optional[dict] = None
        self.cache = make_cache(model, options.get("kv_bits"))
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.history = self._render(self.messages)  # the conversation's tokens, turns closed

    @property
    def system(self) -> Optional[str]:
        has = self.messages and self.messages[0]["role"] == "system"
        return self.messages[0]["content"] if has else None

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = self.messages[:1] if self.system is not None else []
        self.history = self._render(self.messages)

    def set_system(self, text: Optional[str]) -> None:
        rest = self.messages[1:] if self.system is not None else self.messages
        self.messages = ([{"role": "system", "content": text}] if text else []) + rest
        self.history = self._render(self.messages)

    def drop_oldest_turn(self) -> bool:
        """Drop the oldest user/assistant exchange; False if there is none."""
        start = 1 if self.system is not None else 0
        if len(self.messages) - start < 2:
            return False
        del self.messages[start : start + 2]
        self.history = self._render(self.messages)
        return True

    def prompt_ids(self, text: str) -> list[int]:
        """The whole conversation with `text` as the next user turn."""
        turn = {"role": "user", "content": text}
        before = self._render(self.messages)
        after = self._render(self.messages + [turn], add_generation_prompt=True)
        if after[: len(before)] == before:
            return self.history + after[len(before) :]
        return after  # a template that is not prefix-stable: no reuse

    def send(self, text: str) -> Iterator[Chunk]:
        """Stream the reply to `text`. Stopping early (Ctrl-C, closing the
        iterator) keeps the reply so far and leaves the session consistent."""
        if not text.strip():
            raise HermesError("the message is empty")
        target = self.prompt_ids(text)
        max_tokens = self.options.get("max_tokens", 256)
        limit = self.model.args.max_position_embeddings
        if len(target) + max_tokens > limit:
            raise ContextFull(
                f"the conversation ({len(target)} tokens) plus max_tokens ({max_tokens}) "
                f"exceeds the context of {limit} tokens"
            )

        # Keep the longest cached prefix, but feed at least one token.
        common = 0
        for a, b in zip(self.cached, target[:-1]):
            if a != b:
                break
            common += 1
        common = trim_to(self.cache, common)
        feed = target[common:]

        generated: list[int] = []
        reply: list[str] = []
        stats = None
        try:
            for chunk in stream_generate(self.model, self.tokenizer, feed, cache=self.cache,
                                         **self.options):
                generated.append(chunk.token)
                reply.append(chunk.text)
                stats = chunk.stats or stats
                yield chunk
        finally:
            # Every token fed to the model is in the cache, except after an
            # interrupt, where trim_to keeps only what is known for sure.
            known = target[:common] + feed + generated
            self.cached = known[: trim_to(self.cache, len(known))]
            if generated:
                if stats is not None:  # a reply cut short by Ctrl-C has none
                    self.last_stats = stats
                self.messages += [{"role": "user", "content": text},
                                  {"role": "assistant", "content": "".join(reply)}]
                self.history = self.tokenizer.close_reply(target + generated)

    def save(self, path: Union[str, Path]) -> Path:
        """Messages, tokens and KV cache in one file, written atomically; the
        name gets `.safetensors` if it has no such suffix. Returns the path."""
        path = conversation_file(path)
        tmp = path.with_name(f".{path.name}.tmp.safetensors")
        meta = {
            "format": _FORMAT,
            "model": json.dumps(_signature(self.model)),
            "messages": json.dumps(self.messages),
            "history": json.dumps(self.history),
            "cached": json.dumps(self.cached),
            "kv_bits": json.dumps(self.options.get("kv_bits")),
        }
        try:
            save_prompt_cache(str(tmp), self.cache, meta)
            os.replace(tmp, path)
        except Exception as e:  # OSError, or MLX's RuntimeError for a file it cannot open
            raise HermesError(f"cannot save the conversation to {path}: {first_line(e)}") from None
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # its folder may not exist
                pass
        return path

    @classmethod
    def load(cls, path: Union[str, Path], model: Model, tokenizer: Tokenizer,
             **options) -> "ChatSession":
        """Resume a conversation written by `save` (named as it was given to `save`)."""
        path = Path(path)
        if not path.exists():
            path = conversation_file(path)
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
        except Exception as e:  # mlx raises several types for a bad file
            raise HermesError(f"cannot read the conversation {path}: {first_line(e)}") from None
        if meta.get("format") != _FORMAT:
            raise HermesError(f"{path} is not a conversation saved by mlx-hermes")
        if json.loads(meta["model"]) != _signature(model):
            raise HermesError(f"{path} was saved with a different model")
        options = {**options, "kv_bits": json.loads(meta["kv_bits"])}
        session = cls(model, tokenizer, **options)
        session.messages = json.loads(meta["messages"])
        session.history = json.loads(meta["history"])
        session.cached = json.loads(meta["cached"])
        session.cache = cache if session.cached else session.cache
        return session

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)


def conversation_file(path: Union[str, Path]) -> Path:
    """Conversations are safetensors files: MLX reads a file by its suffix."""
    path = Path(path).expanduser()
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def _signature(model: Model) -> dict:
    a = model.args
    return {"layers": a.num_hidden_layers, "kv_heads": a.num_key_value_heads,
            "head_dim": a.dims_per_head, "vocab": a.vocab_size, "hidden": a.hidden_size}
