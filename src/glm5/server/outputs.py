"""From engine StepOutputs to client text: one `SampleText` per sample (choice), shared by the HTTP server and the
in-process terminal client (glm5.client.LocalBackend).

- The token that ended a sample (an eos id, or one of the request's stop_token_ids) is generated but not shown:
  it counts in usage, its text and log-prob are dropped, as in vLLM.
- Stop strings: the engine notices them (it holds the tokenizer's `decode`) and reports the string; here the text
  is cut where the string starts, the string itself excluded (OpenAI's behaviour). While a sample runs, the last
  len(longest stop) - 1 characters are held back: they may be the start of a stop string, and text once streamed
  cannot be taken back.
- Text comes out as pieces, `(text, is_special)` (`glm5.chat_parse.PieceDecoder`), so the chat parser sees tags
  only where the model produced their special tokens; holding back for stop strings never splits a special token.
- Log-probs are kept per token with the token's own string (its bytes decoded with replacement: a token holding
  half of a UTF-8 character shows U+FFFD, its `bytes` field has the exact bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..chat_parse import Piece, PieceDecoder
from ..engine import StepOutput
from ..tokenizer import Tokenizer


@dataclass
class TokenInfo:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None


@dataclass
class SampleText:
    tok: Tokenizer
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.decoder = PieceDecoder(self.tok)
        self.text = ""  # decoded so far (final: trimmed at the stop string)
        self.specials: list[tuple[int, int]] = []  # [start, end) of each special token in self.text
        self._next_special = 0  # first entry of self.specials not yet released
        self.sent = 0  # characters of self.text already released
        self.hold = max(map(len, self.stop)) - 1 if self.stop else 0
        self.tokens: list[TokenInfo] = []  # the shown tokens
        self.num_generated = 0  # all generated tokens, the hidden stop token included (usage)
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def push(self, out: StepOutput) -> tuple[list[Piece], list[TokenInfo]]:
        """One step's output → (newly released text as pieces, newly shown tokens)."""
        ids = list(out.new_token_ids)
        self.num_generated += len(ids)
        shown = len(ids)
        if out.finished and out.finish_reason == "stop" and not isinstance(out.stop_reason, str) and ids:
            shown -= 1  # the eos / stop token ended the sample: not part of the text
        tops = out.top_logprobs or [None] * len(ids)
        new_tokens = [TokenInfo(ids[i], out.logprobs[i], tops[i]) for i in range(shown)]
        self.tokens += new_tokens
        self._add(self.decoder.push(ids[:shown]))
        if out.finished:
            self.finished = True
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            self._add(self.decoder.flush())
            if isinstance(out.stop_reason, str):
                cut = self.text.find(out.stop_reason, max(0, self.sent - self.hold))
                if cut >= 0:
                    self.text = self.text[:max(cut, self.sent)]
                    # a special token the cut goes through is no longer one: what is left of it is plain text
                    self.specials = [(a, b) for a, b in self.specials if b <= len(self.text)]
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - self.hold)
            for a, b in reversed(self.specials):  # never release part of a special token
                if b <= end:
                    break
                if a < end:
                    end = max(a, self.sent)
                    break
        pieces = self._release(end)
        return pieces, new_tokens

    def _add(self, pieces: list[Piece]) -> None:
        for text, special in pieces:
            if special:
                self.specials.append((len(self.text), len(self.text) + len(text)))
            self.text += text

    def _release(self, end: int) -> list[Piece]:
        """self.text[self.sent:end] as pieces."""
        out: list[Piece] = []
        pos = self.sent
        while self._next_special < len(self.specials) and self.specials[self._next_special][1] <= end:
            a, b = self.specials[self._next_special]
            if a > pos:
                out.append((self.text[pos:a], False))
            out.append((self.text[a:b], True))
            pos = b
            self._next_special += 1
        if end > pos:
            out.append((self.text[pos:end], False))
        self.sent = end
        return out


def text_of(pieces: list[Piece]) -> str:
    return "".join(t for t, _ in pieces)


def token_text(tok: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's display string and exact bytes."""
    if tok.byte_level:
        b = tok.token_bytes(token_id)
    else:
        b = tok.decode([token_id]).encode("utf-8")
    return b.decode("utf-8", errors="replace"), list(b)
