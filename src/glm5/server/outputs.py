"""From engine StepOutputs to client text: one `SampleText` per sample (choice), shared by the HTTP server and the
in-process terminal client (glm5.client.LocalBackend).

- The token that ended a sample (an eos id, or one of the request's stop_token_ids) is generated but not shown:
  it counts in usage, its text and log-prob are dropped, as in vLLM.
- Stop strings: the engine notices them (it holds the tokenizer's `decode`) and reports the string; here the text
  is cut where the string starts, the string itself excluded (OpenAI's behaviour). While a sample runs, the last
  len(longest stop) - 1 characters are held back: they may be the start of a stop string, and text once streamed
  cannot be taken back.
- Log-probs are kept per token with the token's own string (its bytes decoded with replacement: a token holding
  half of a UTF-8 character shows U+FFFD, its `bytes` field has the exact bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        self.detok = self.tok.detokenizer()
        self.text = ""  # decoded so far (final: trimmed at the stop string)
        self.sent = 0  # characters of self.text already released
        self.hold = max(map(len, self.stop)) - 1 if self.stop else 0
        self.tokens: list[TokenInfo] = []  # the shown tokens
        self.num_generated = 0  # all generated tokens, the hidden stop token included (usage)
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def push(self, out: StepOutput) -> tuple[str, list[TokenInfo]]:
        """One step's output → (newly released text, newly shown tokens)."""
        ids = list(out.new_token_ids)
        self.num_generated += len(ids)
        shown = len(ids)
        if out.finished and out.finish_reason == "stop" and not isinstance(out.stop_reason, str) and ids:
            shown -= 1  # the eos / stop token ended the sample: not part of the text
        tops = out.top_logprobs or [None] * len(ids)
        new_tokens = [TokenInfo(ids[i], out.logprobs[i], tops[i]) for i in range(shown)]
        self.tokens += new_tokens
        self.text += self.detok.push(ids[:shown])
        if out.finished:
            self.finished = True
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            self.text += self.detok.flush()
            if isinstance(out.stop_reason, str):
                cut = self.text.find(out.stop_reason, max(0, self.sent - self.hold))
                if cut >= 0:
                    self.text = self.text[:max(cut, self.sent)]
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta, new_tokens


def token_text(tok: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's display string and exact bytes."""
    if tok.byte_level:
        b = tok.token_bytes(token_id)
    else:
        b = tok.decode([token_id]).encode("utf-8")
    return b.decode("utf-8", errors="replace"), list(b)
