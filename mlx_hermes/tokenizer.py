"""Hermes' tokenizer: the checkpoint's SentencePiece model, with ChatML's added tokens.

Why not transformers' AutoTokenizer: the ids it gives for the same files moved
between its releases (5.17 ignored the `legacy` flag, 5.24 honours it, a 4.x
once split `<|im_start|>` into characters), and a prompt's ids decide what
the model answers. Here the ids are a fixed function of the checkpoint's
files, whatever the installed transformers: SentencePiece (a small, stable
library) does the byte-pair encoding, and the rest is written out below.

The files, and which one governs:
- `tokenizer.model` (SentencePiece) when the folder has one, the original
  checkpoint's own file. A `tokenizer.json` beside it (folders converted by
  mlx-lm ship both) is then not read: it is transformers' translation of the
  same model, and what that translation does with the text after an added
  token is what changed between releases.
- Otherwise `tokenizer.json`, run by the `tokenizers` library as the file
  itself specifies (normalizer, pre-tokenizer, added tokens).
- `tokenizer_config.json`: `legacy` (below), the BOS/EOS tokens, the added
  tokens and the chat template (or `chat_template.jinja`); `added_tokens.json`
  and `special_tokens_map.json` as older checkpoints write them.

The `legacy` flag, as transformers' Llama tokenizer defines it: the text is
cut at every added token (`<s>`, `<|im_start|>`, ...) and each piece of text
in between is encoded by SentencePiece on its own. With `legacy: true` (also
when the flag is missing) every piece gets SentencePiece's dummy prefix `▁`,
so `<|im_start|>user\\n` is `32001, 2188 (▁user), 13`; with `legacy: false`
only a piece at the very start of the text does, unless it starts with a
space, so the same is `32001, 1838 (user), 13`.

Decoding is the inverse: the dummy prefix a piece got is not a space in the
text, so decoding a prompt's ids gives back the template's text exactly. The
streaming detokenizer and `decode` are the same code, so streamed text always
equals the decode of the same ids.
"""

from __future__ import annotations

import codecs
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Iterable, Optional, Union

from .errors import HermesError, first_line

# Hermes 2's prompt format; used only when a checkpoint ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Hermes ends a turn with <|im_end|>; the base model's </s> also ends text.
_END_TOKENS = ("<|im_end|>", "</s>")
_SPACE = "\u2581"  # SentencePiece's ▁
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """encode / decode / apply_chat_template for a Hermes (Llama-style) checkpoint."""

    def __init__(self, backend: "_Backend", added: dict[str, int], special: set[int],
                 legacy: bool, bos_token: Optional[str], eos_token_ids: Iterable[int],
                 chat_template: Optional[str]):
        self._backend = backend
        self.legacy = legacy
        self.added_tokens: dict[str, int] = dict(added)  # text -> id, split out before encoding
        self._special = frozenset(special)  # ids that skip_special_tokens drops
        self._template_source = chat_template or CHATML_TEMPLATE
        self.bos_token: Optional[str] = bos_token
        self.bos_token_id: Optional[int] = self.token_id(bos_token) if bos_token else None
        # Every piece's text: a str, or the byte of a byte-fallback piece.
        self._pieces: list[Union[str, int]] = backend.pieces()
        for text, i in self.added_tokens.items():
            while len(self._pieces) <= i:
                self._pieces.append("")
            self._pieces[i] = text
        self._added_ids = frozenset(self.added_tokens.values())
        self.vocab_size: int = len(self._pieces)
        ends = {self.token_id(t) for t in _END_TOKENS}
        self.eos_token_ids: frozenset[int] = frozenset(set(eos_token_ids) | ends) - {None}
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    # ---- loading -------------------------------------------------------------------

    @classmethod
    def from_path(
        cls, path: Path, extra_eos_token_ids: Union[int, Iterable[int], None] = None
    ) -> "Tokenizer":
        """extra_eos_token_ids: e.g. config.json's eos_token_id (an int or a list)."""
        path = Path(path)
        try:
            config = _read_json(path / "tokenizer_config.json")
            special_map = _read_json(path / "special_tokens_map.json")
            if (path / "tokenizer.model").exists():
                backend: _Backend = _SentencePiece(path / "tokenizer.model")
            elif (path / "tokenizer.json").exists():
                backend = _TokenizersJson(path / "tokenizer.json")
            else:
                raise HermesError(f"{path} has no tokenizer (tokenizer.model or tokenizer.json)")
            added = backend.added_tokens()
            added.update(_read_json(path / "added_tokens.json"))
            for i, token in config.get("added_tokens_decoder", {}).items():
                added[token["content"]] = int(i)
            special = {i for t, i in added.items() if backend.is_control(t)}
            special |= {int(i) for i, token in config.get("added_tokens_decoder", {}).items()
                        if token.get("special")}

            def token(name: str) -> Optional[str]:
                value = config.get(name, special_map.get(name))
                return value.get("content") if isinstance(value, dict) else value

            for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
                if token(name) in added:
                    special.add(added[token(name)])
            eos = set(_as_list(extra_eos_token_ids)) | _generation_config_eos(path)
            if token("eos_token") in added:
                eos.add(added[token("eos_token")])
            legacy = config.get("legacy")
            return cls(backend, added, special, legacy is not False, token("bos_token"), eos,
                       _chat_template(path, config))
        except HermesError:
            raise
        except Exception as e:  # sentencepiece, tokenizers and json raise many types
            raise HermesError(f"cannot load the tokenizer in {path}: {first_line(e)}") from e

    # ---- encoding ------------------------------------------------------------------

    def token_id(self, token: str) -> Optional[int]:
        """The id of an added token or a piece, or None."""
        if token in self.added_tokens:
            return self.added_tokens[token]
        return self._backend.piece_id(token)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Text as is (added tokens in it are recognised), after one BOS."""
        ids = [self.bos_token_id] if bos and self.bos_token_id is not None else []
        return ids + self._backend.encode(text, self)

    def encode_exact(self, text: str) -> list[int]:
        """Ids whose bytes (`token_bytes`) spell `text` exactly: no BOS, no
        SentencePiece dummy prefix. What a grammar engine tokenizes with."""
        return self._backend.encode_exact(text, self)

    def _encode_pieces(self, text: str, encode_piece) -> list[int]:
        """Cut at added tokens; encode_piece(piece, dummy_prefix) does the rest."""
        ids: list[int] = []
        for n, part in enumerate(self._splitter.split(text) if self.added_tokens else [text]):
            if n % 2:
                ids.append(self.added_tokens[part])
            elif part:
                first = n == 0
                prefix = True if self.legacy else first and not part.startswith(" ")
                ids += encode_piece(part, prefix)
        return ids

    # ---- decoding ------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        detokenizer = Detokenizer(self, skip_special_tokens)
        for i in ids:
            detokenizer.add_token(i)
        detokenizer.finalize()
        return detokenizer.text

    @property
    def detokenizer(self) -> "Detokenizer":
        """A fresh streaming detokenizer: text in whole characters, equal to `decode`."""
        return Detokenizer(self)

    def token_bytes(self, token: int) -> bytes:
        """What a token adds to the text, as bytes (`▁` is a space; a byte
        token is its byte; an added token is written as itself)."""
        p = self._pieces[token] if token < len(self._pieces) else ""
        return bytes([p]) if isinstance(p, int) else p.replace("\u2581", " ").encode()

    def piece(self, token: int) -> str:
        """A token as the vocabulary writes it (`▁Hello`, `<0x0A>`, `<|im_end|>`)."""
        p = self._pieces[token]
        return p if isinstance(p, str) else f"<0x{p:02X}>"

    # ---- chat ----------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text for `messages` (no BOS: encode adds it)."""
        text = self._template.render(messages=messages,
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token="",
                                     raise_exception=_raise)
        if self.bos_token and text.startswith(self.bos_token):  # some templates render it
            text = text[len(self.bos_token):]
        return text

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a chat: one BOS, then the rendered template.

        The single place where chat prompts are built, so the CLI, the chat
        session and the server all produce the same ids.
        """
        return self.encode(self.render_chat(messages, add_generation_prompt) if messages else "")

    def user_turn(self, text: str, system: Optional[str] = None,
                  after: Optional[list[int]] = None) -> list[int]:
        """The ids of one user turn ready for the reply (with a system prompt
        first, if given): a new conversation, or the continuation of `after`,
        the ids of an earlier one ending in a reply (Ollama's `context`)."""
        messages = [{"role": "system", "content": system}] if system else []
        ids = self.apply_chat_template(messages + [{"role": "user", "content": text}])
        return ids if not after else self.close_reply(after) + ids[1:]

    @cached_property
    def turn_end_ids(self) -> list[int]:
        """What the template puts after an assistant's reply (ChatML: `<|im_end|>\\n`)."""
        user = [{"role": "user", "content": "x"}]
        before = self.apply_chat_template(user, add_generation_prompt=True)
        after = self.apply_chat_template(user + [{"role": "assistant", "content": ""}], False)
        return after[len(before):] if after[: len(before)] == before else []

    def close_reply(self, ids: list[int]) -> list[int]:
        """A conversation's ids that end in a reply (sampled tokens, its end token or not),
        closed as the template closes a turn, so the next turn's ids can follow."""
        end = self.turn_end_ids
        if end and ids[-len(end):] == end:
            return list(ids)
        if ids and ids[-1] in self.eos_token_ids:
            ids = ids[:-1]
        return list(ids) + end

    @cached_property
    def _template(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # transformers' settings for chat templates, and its JSON filter
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
        try:
            return env.from_string(self._template_source)
        except Exception as e:  # jinja2's TemplateSyntaxError and friends
            raise HermesError(f"the chat template does not parse: {first_line(e)}") from None


class Detokenizer:
    """Ids to text, one token at a time, in whole characters (mlx-lm's interface:
    `add_token`, `finalize`, `last_segment`, `text`, `tokens`).

    A byte-fallback token (`<0xE2>`) may be part of a character, so text is
    released only when its UTF-8 is complete; a bad sequence becomes U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._t = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self._text: list[str] = []  # what last_segment has given out
        self._out: list[str] = []  # and what it has not, yet
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._piece_start = True  # the next text may begin with a dummy prefix

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        t = self._t
        if token in t._added_ids:
            self._out.append(self._utf8.decode(b"", final=True))
            if not (self._skip and token in t._special):
                self._out.append(t._pieces[token])
            if token != t.bos_token_id or len(self.tokens) > 1:  # a leading BOS is not text
                self._piece_start = t.legacy
            return
        piece = t._pieces[token] if token < len(t._pieces) else ""  # a padded vocabulary's
        if isinstance(piece, int):
            data = bytes((piece,))
        else:
            text = piece.replace(_SPACE, " ")
            if self._piece_start and text.startswith(" "):
                text = text[1:]
            data = text.encode()
        self._piece_start = False
        self._out.append(self._utf8.decode(data))

    def finalize(self) -> None:
        self._out.append(self._utf8.decode(b"", final=True))

    @property
    def text(self) -> str:
        return "".join(self._text + self._out)

    @property
    def last_segment(self) -> str:
        """The text added since the last call."""
        segment = "".join(self._out)
        self._text.append(segment)
        self._out = []
        return segment


# ---- backends ------------------------------------------------------------------------


class _Backend:
    def pieces(self) -> list[Union[str, int]]: ...
    def piece_id(self, piece: str) -> Optional[int]: ...
    def added_tokens(self) -> dict[str, int]: ...
    def is_control(self, token: str) -> bool: ...
    def encode(self, text: str, tokenizer: Tokenizer) -> list[int]: ...
    def encode_exact(self, text: str, tokenizer: Tokenizer) -> list[int]: ...


class _SentencePiece(_Backend):
    """tokenizer.model, with and without the dummy prefix."""

    def __init__(self, file: Path):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        data = file.read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(data)
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def pieces(self) -> list[Union[str, int]]:
        out: list[Union[str, int]] = []
        for i in range(self.sp.get_piece_size()):
            piece = self.sp.id_to_piece(i)
            byte = _BYTE_PIECE.fullmatch(piece) if self.sp.is_byte(i) else None
            out.append(int(byte.group(1), 16) if byte else piece)
        return out

    def piece_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def added_tokens(self) -> dict[str, int]:
        # <unk>, <s>, </s>: written in text, they are tokens, as transformers splits them
        return {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def is_control(self, token: str) -> bool:
        i = self.sp.piece_to_id(token)
        return self.sp.id_to_piece(i) == token and (self.sp.is_control(i)
                                                     or self.sp.is_unknown(i))

    def encode(self, text: str, tokenizer: Tokenizer) -> list[int]:
        return tokenizer._encode_pieces(
            text, lambda piece, prefix: (self.sp if prefix else self.sp_plain).encode(piece))

    def encode_exact(self, text: str, tokenizer: Tokenizer) -> list[int]:
        return tokenizer._encode_pieces(text, lambda piece, prefix: self.sp_plain.encode(piece))


class _TokenizersJson(_Backend):
    """tokenizer.json through the `tokenizers` library, as the file specifies."""

    def __init__(self, file: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(file))
        self._added = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}
        self._control = {t.content for t in self.tok.get_added_tokens_decoder().values()
                         if t.special}

    def pieces(self) -> list[Union[str, int]]:
        vocab = self.tok.get_vocab(with_added_tokens=False)
        out: list[Union[str, int]] = [""] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            byte = _BYTE_PIECE.fullmatch(piece)
            out[i] = int(byte.group(1), 16) if byte else piece
        return out

    def piece_id(self, piece: str) -> Optional[int]:
        return self.tok.token_to_id(piece)

    def added_tokens(self) -> dict[str, int]:
        return dict(self._added)

    def is_control(self, token: str) -> bool:
        return token in self._control

    def encode(self, text: str, tokenizer: Tokenizer) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_exact(self, text: str, tokenizer: Tokenizer) -> list[int]:
        # a Metaspace pre-tokenizer may prepend its space: drop a first token that is only it
        ids = self.encode(text, tokenizer)
        if ids and not text.startswith(" ") and tokenizer.token_bytes(ids[0]) == b" ":
            ids = ids[1:]
        return ids


# ---- files ---------------------------------------------------------------------------


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text()) if file.exists() else {}


def _chat_template(path: Path, config: dict) -> Optional[str]:
    file = path / "chat_template.jinja"
    if file.exists():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def _raise(message: str):
    raise HermesError(f"the chat template refused the conversation: {message}")


def _generation_config_eos(path: Path) -> set[int]:
    file = path / "generation_config.json"
    if not file.exists():
        return set()
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    return set(_as_list(eos))


def _as_list(value: Union[int, Iterable[int], None]) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
