"""Supervised fine-tuning data: chats rendered with GLM-5's template into token documents whose loss mask covers
exactly what the assistant writes. The training loop is the pre-training one (`train(cfg, source=ChatDocs(...))`):
only the labels differ, through the per-token `loss` flags of each document (see data.py).

What the assistant writes, per assistant turn: its reasoning block, its content and its tool calls (the tokens the
renderer marks as inside the turn), plus the one token that ends the turn (the next turn's `<|user|>` or
`<|observation|>`, or `<|endoftext|>` appended after the last turn): the model must learn to stop. The system
prompt, the user turns, the tool results and the `<|assistant|>` tag itself are context, never targets.
Multi-turn chats render as the template does: the reasoning of turns before the last user message is dropped. A turn
that had reasoning is then context, not a target: its rendering (`</think>` and the answer) starts where the model,
with thinking on, writes `<think>`, so training it would teach the model to skip thinking after a first question.
Every turn can still be a target: in a chat that ends on it. Earlier turns without reasoning (thinking off) render
as written and stay targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..chat import normalize_messages, render_chat
from ..tokenizer import Tokenizer
from .data import DataError

END_OF_TEXT = "<|endoftext|>"


def chat_doc(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None) -> dict:
    """{"ids": [...], "loss": [...]} for one conversation (see the module docstring for what is a target)."""
    r = render_chat(tok, messages, tools, add_generation_prompt=False, template="builtin")
    ids, gen = list(r.ids), list(r.assistant_mask)
    for start, end in _turns_with_dropped_reasoning(normalize_messages(messages), gen):
        gen[start:end] = [False] * (end - start)
    if messages and messages[-1].get("role") == "assistant":
        ids.append(tok.token_id(END_OF_TEXT))
        gen.append(False)
    stops = set(tok.eos_ids)
    # The turn's text, and the token that ends it when that is a stop token (<|user|>, <|observation|>,
    # <|endoftext|>): the model learns to stop there. Another tag after an assistant turn is context.
    loss = [g or (i > 0 and gen[i - 1] and ids[i] in stops) for i, g in enumerate(gen)]
    return {"ids": ids, "loss": loss}


def _turns_with_dropped_reasoning(msgs: list[dict], gen: list[bool]) -> list[tuple[int, int]]:
    """Token spans [start, end) of the assistant turns before the last user message that carry reasoning. The
    renderer marks each assistant turn as one run of assistant-mask tokens (`</think>` at least; the `<|assistant|>`
    tag between turns is not in the mask), so the i-th run is the i-th assistant message."""
    runs, start = [], None
    for i, g in enumerate(gen + [False]):
        if g and start is None:
            start = i
        elif not g and start is not None:
            runs.append((start, i))
            start = None
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    assert len(runs) == len(turns), "one run of assistant tokens per assistant message"
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    return [span for span, i in zip(runs, turns) if i < last_user and msgs[i].get("reasoning_content")]


class ChatDocs:
    """A document source of rendered chats: from a list of (messages, tools) pairs or Examples (anything with
    `.messages` and `.tools`), or a JSONL file with one {"messages": [...], "tools": [...]} object per line."""

    def __init__(self, chats, tok: Tokenizer):
        self.tok = tok
        self.path = None
        if isinstance(chats, (str, Path)):
            self.path = Path(chats)
            if not self.path.is_file():
                raise DataError(f"{self.path}: no such chat file")
            self.chats = None
        else:
            self.chats = [(c.messages, c.tools) if hasattr(c, "messages") else
                          (c["messages"], c.get("tools")) if isinstance(c, dict) else tuple(c) for c in chats]

    def _chats(self) -> Iterator[tuple[str, list, list | None]]:
        if self.chats is not None:
            for i, (m, t) in enumerate(self.chats):
                yield f"chat {i}", m, t
            return
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{self.path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                    raise DataError(f"{self.path}:{lineno}: expected {{\"messages\": [...], \"tools\": [...]}}")
                yield f"{self.path}:{lineno}", obj["messages"], obj.get("tools")

    def iter_from(self, index: int, epoch: int = 0) -> Iterator[dict]:
        from ..chat import ChatFormatError

        for i, (where, messages, tools) in enumerate(self._chats()):
            if i < index:
                continue
            try:
                doc = chat_doc(self.tok, messages, tools)
            except ChatFormatError as e:
                raise DataError(f"{where}: {e}") from None
            if not any(doc["loss"]):
                raise DataError(f"{where}: no assistant turn, so nothing to learn")
            yield doc

    def __iter__(self):
        return self.iter_from(0)
