"""Tokenizer: HF `tokenizer.json` through the `tokenizers` library, with GLM-5's chat-format tokens kept out of
untrusted text.

The `tokenizers` library matches every added token anywhere in its input, so encoding a user message that spells
`<|assistant|>` would produce the real turn token and let the user forge a turn. Here ordinary text goes through a
second copy of the tokenizer that has the special tokens removed from its added vocabulary: it never produces them
(byte-level pre-tokenization splits `<|assistant|>` into `<|`, `assistant`, `|>`, so no merge can rebuild the
special), and special ids only enter a sequence where the chat renderer inserts them by id. The rejected
alternative, escaping specials in the text before encoding, changes the bytes the model sees.

Streaming decode (`IncrementalDetokenizer`) emits only complete characters: a multi-byte UTF-8 character whose
bytes are split across tokens is held back until its last byte arrives.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer

# GLM-4.5/4.7/5 chat-format tokens (the chat_template.jinja of zai-org/GLM-5; docs/glm5.md). All are atomic
# specials in a GLM tokenizer.
FORMAT_TOKENS = (
    "<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
    "<tool_response>", "</tool_response>",
)
# A turn ends at one of these (GLM-5 has no end-of-turn token); generation_config's eos_token_id lists the same.
TURN_END_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")

DEFAULT_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"


class TokenizerError(ValueError):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet (what the `tokenizers` ByteLevel pre-tokenizer and decoder use): printable bytes map
    # to themselves, the other 68 to code points from 256 up, so every byte has a visible one-character name.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _token_str(tok) -> str | None:
    # tokenizer_config.json writes special tokens either as "<s>" or as {"content": "<s>", ...}.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Tokenizer:
    """A checkpoint's tokenizer.json (+ tokenizer_config.json, + chat_template.jinja). Build with `from_dir` or
    `default()` (the small tokenizer shipped with the package)."""

    def __init__(self, tokenizer_json: str, config: dict | None = None, chat_template: str | list | None = None,
                 generation_eos: Iterable[int] = (), source: str = "<memory>"):
        self.source = source
        self.config = dict(config or {})
        self.json = tokenizer_json  # the tokenizer.json text (saved as is; grammar tokenizers are built from it)
        spec = json.loads(tokenizer_json)
        self._tok = _HFTokenizer.from_str(tokenizer_json)
        added = spec.get("added_tokens") or []
        self._added = {t["id"]: t["content"] for t in added}
        # Specials = the GLM format tokens present in the vocabulary + any added token the file marks special.
        # (Real GLM tokenizers mark some format tokens, e.g. <think>, as non-special; they are specials here all the
        # same: user text must never produce them.)
        self.special_ids: dict[str, int] = {}
        for t in added:
            if t.get("special") or t["content"] in FORMAT_TOKENS:
                self.special_ids[t["content"]] = t["id"]
        for name in FORMAT_TOKENS:
            if name not in self.special_ids and (i := self._tok.token_to_id(name)) is not None:
                self.special_ids[name] = i
        self._skip_ids = {t["id"] for t in added if t.get("special")}  # what decode(skip_special=True) drops
        plain = dict(spec, added_tokens=[t for t in added if t["content"] not in self.special_ids])
        self._plain = _HFTokenizer.from_str(json.dumps(plain))
        self._special_re = (re.compile("|".join(re.escape(s) for s in sorted(self.special_ids, key=len, reverse=True)))
                            if self.special_ids else None)
        self.id_to_special = {i: s for s, i in self.special_ids.items()}
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True),
                              max(self.special_ids.values(), default=-1) + 1)
        if chat_template is None:
            chat_template = self.config.get("chat_template")
        self.chat_template = chat_template
        eos = [self.special_ids[s] for s in TURN_END_TOKENS if s in self.special_ids]
        if (e := _token_str(self.config.get("eos_token"))) is not None and e in self.special_ids:
            eos.append(self.special_ids[e])
        self.eos_ids = sorted(set(eos) | set(generation_eos))
        pad = _token_str(self.config.get("pad_token"))
        self.pad_id = self.special_ids.get(pad, self.eos_ids[0] if self.eos_ids else 0)
        dec = spec.get("decoder") or {}
        self.byte_level = dec.get("type") == "ByteLevel"
        self._byte_table: list[bytes] | None = None

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load like transformers and vLLM do: tokenizer.json, tokenizer_config.json (optional), the chat template
        from chat_template.jinja if present (it wins, as in transformers) else tokenizer_config.json
        `chat_template`, and extra eos ids from generation_config.json."""
        p = Path(path)
        tj = p / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{p}: no tokenizer.json (only the HF fast-tokenizer format is supported; "
                                    f"convert a sentencepiece/tiktoken vocabulary with transformers first)")
        config = {}
        if (cfg_path := p / "tokenizer_config.json").is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from None
        template = None
        if (jinja := p / "chat_template.jinja").is_file():
            template = jinja.read_text(encoding="utf-8")
        gen_eos: list[int] = []
        if (gc := p / "generation_config.json").is_file():
            try:
                e = json.loads(gc.read_text(encoding="utf-8")).get("eos_token_id")
            except json.JSONDecodeError as err:
                raise TokenizerError(f"{gc}: not valid JSON ({err})") from None
            gen_eos = [e] if isinstance(e, int) else [i for i in (e or []) if isinstance(i, int)]
        try:
            text = tj.read_text(encoding="utf-8")
            return cls(text, config, template, gen_eos, source=str(p))
        except Exception as e:  # the Rust side reports parse errors without the file name
            if isinstance(e, TokenizerError):
                raise
            raise TokenizerError(f"{tj}: cannot load ({e})") from e

    @classmethod
    def default(cls) -> "Tokenizer":
        """The small byte-level BPE tokenizer shipped for the untrained default model
        (`glm5.tokenizer_train.build_default_tokenizer` rebuilds it)."""
        return cls.from_dir(DEFAULT_TOKENIZER_DIR)

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (chat template inside), e.g. next to a checkpoint."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(self.json, encoding="utf-8")
        cfg = dict(self.config)
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")

    # ------------------------------------------------------------------------------------------ encode/decode
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. With allow_special=False (user, tool and system text) spelled-out special tokens
        stay ordinary bytes; with True (trusted template text) they become their special ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, name: str) -> int:
        """Id of a special token by name (e.g. "<|assistant|>")."""
        try:
            return self.special_ids[name]
        except KeyError:
            raise TokenizerError(f"{self.source}: no special token {name!r} in the vocabulary "
                                 f"(have: {', '.join(sorted(self.special_ids)) or 'none'})") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self.id_to_special

    def split_specials(self, text: str) -> list[str | int]:
        """Cut trusted rendered text at special-token spellings: special names become their ids, the pieces
        between stay strings (encoded later with specials off)."""
        if self._special_re is None:
            return [text] if text else []
        out: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(self.special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (byte-level tokenizers only)."""
        return self._bytes()[token_id]

    def _bytes(self) -> list[bytes]:
        if not self.byte_level:
            raise TokenizerError(f"{self.source}: token bytes need a ByteLevel decoder")
        if self._byte_table is None:
            table = [b""] * self.vocab_size
            added = {i: s.encode("utf-8") for i, s in self._added.items()}
            for tok_str, i in self._tok.get_vocab(with_added_tokens=False).items():
                if i not in added:
                    # A token string outside the byte alphabet cannot come from byte-level BPE; keep it as UTF-8.
                    table[i] = (bytes(_BYTE_DECODER[c] for c in tok_str) if all(c in _BYTE_DECODER for c in tok_str)
                                else tok_str.encode("utf-8"))
            for i, b in added.items():
                table[i] = b
            self._byte_table = table
        return self._byte_table

    def detokenizer(self, skip_special: bool = False) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special=skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, specials={len(self.special_ids)})"


class IncrementalDetokenizer:
    """Token ids in, text out, one step at a time; only complete characters come out.

    Byte-level tokenizers (GLM's, ours): concatenate each token's bytes into an incremental UTF-8 decoder, O(1) per
    token. Other decoders (the generic path, byte_level=False): the read-offset method of HF TGI / vLLM — decode a
    short window of recent ids and emit the new suffix once it no longer ends in U+FFFD."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, byte_level: bool | None = None):
        self.tok = tokenizer
        self.skip_special = skip_special
        self.byte_level = tokenizer.byte_level if byte_level is None else byte_level
        self.text = ""  # everything emitted so far
        if self.byte_level:
            self._table = tokenizer._bytes()
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._ids: list[int] = []
            self._prefix = 0  # window start: decoding from here gives stable text
            self._read = 0  # ids before this are already emitted

    def push(self, ids: int | Iterable[int]) -> str:
        """Add generated ids; return the newly completed text (possibly "")."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        if self.skip_special:
            ids = [i for i in ids if i not in self.tok._skip_ids]
        if self.byte_level:
            for i in ids:
                if not 0 <= i < len(self._table):
                    raise TokenizerError(f"token id {i} outside the vocabulary (size {len(self._table)})")
            out = self._utf8.decode(b"".join(self._table[i] for i in ids))
        else:
            self._ids.extend(ids)
            prev = self.tok.decode(self._ids[self._prefix:self._read])
            new = self.tok.decode(self._ids[self._prefix:])
            if len(new) > len(prev) and not new.endswith("\ufffd"):
                out = new[len(prev):]
                self._prefix, self._read = self._read, len(self._ids)
            else:
                out = ""
        self.text += out
        return out

    def flush(self) -> str:
        """End of stream: whatever is still held (an incomplete character) comes out as U+FFFD."""
        if self.byte_level:
            out = self._utf8.decode(b"", final=True)
        else:
            prev = self.tok.decode(self._ids[self._prefix:self._read])
            out = self.tok.decode(self._ids[self._prefix:])[len(prev):]
            self._prefix = self._read = len(self._ids)
        self.text += out
        return out
