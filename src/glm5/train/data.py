"""Token-stream datasets and packing into fixed-size training rows.

A *document source* is anything iterable that yields token-id documents: lists of ints, 1-D integer tensors, or
{"ids": [...], "loss": [...]} where `loss[i]` says whether token i is a training target (SFT: assistant tokens only;
absent = every token is).
Other datasets plug in as document sources (the speedrun's mixtures do); two small ones live in this file: `SyntheticDocs` (learnable,
seeded, for tests and smoke runs) and `JsonlDocs` (one JSON list of token ids, or {"ids": [...]}, per line).

`Packer` concatenates documents into rows of T + 1 tokens (T inputs plus one extra so the last input has a label),
splitting a document across rows when it does not fit. Per token it records the document segment (doc_ids: equal
within one row segment, so attention and labels never cross a boundary) and the position within the document
(positions restart at 0 for each document; a continuation in the next row keeps counting, so RoPE sees true
offsets). Its state (epoch, documents consumed, token offset) is three integers: a resumed run continues exactly.

Letters: B rows, T input tokens per row (rows hold T + 1 tokens).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch


@dataclass
class Batch:
    tokens_BT1: torch.Tensor  # [B, T + 1] int64: inputs are [:, :T], labels come from [:, 1:]
    doc_BT1: torch.Tensor  # [B, T + 1] int64 segment id within the row (contiguous, non-decreasing)
    pos_BT1: torch.Tensor  # [B, T + 1] int64 position of the token inside its document
    loss_BT1: torch.Tensor | None = None  # [B, T + 1] bool: the token is a training target (None: all are)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens_BT1[:, :-1]

    @property
    def doc_ids(self) -> torch.Tensor:
        return self.doc_BT1[:, :-1]

    @property
    def positions(self) -> torch.Tensor:
        return self.pos_BT1[:, :-1]

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(*(None if t is None else t[start:stop] for t in self._tensors()))

    def to(self, device) -> "Batch":
        return Batch(*(None if t is None else t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple:
        return self.tokens_BT1, self.doc_BT1, self.pos_BT1, self.loss_BT1


class DataError(ValueError):
    pass


# -- sources --------------------------------------------------------------------------------------------------------
class SyntheticDocs:
    """Seeded, learnable documents: each is an arithmetic progression mod vocab (random start, random step from a
    small set), so after two tokens the rest is predictable, by the next-token head and by every MTP depth.
    Documents are independent of each other: a model that looked across a boundary would gain nothing."""

    def __init__(self, vocab_size: int, n_docs: int = 10_000, min_len: int = 4, max_len: int = 64, seed: int = 0,
                 steps: tuple[int, ...] = (1, 2, 3, 5)):
        if not 2 <= min_len <= max_len:
            raise DataError(f"need 2 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        self.vocab_size, self.n_docs, self.min_len, self.max_len, self.seed, self.steps = \
            vocab_size, n_docs, min_len, max_len, seed, steps

    def doc(self, i: int, epoch: int = 0) -> list[int]:
        r = random.Random(f"{self.seed}:{epoch}:{i}")  # per-document seed: resuming needs no replay
        n = r.randint(self.min_len, self.max_len)
        start, step = r.randrange(self.vocab_size), r.choice(self.steps)
        return [(start + j * step) % self.vocab_size for j in range(n)]

    def iter_from(self, index: int, epoch: int = 0) -> Iterator[list[int]]:
        for i in range(index, self.n_docs):
            yield self.doc(i, epoch)

    def __iter__(self):
        return self.iter_from(0)


class JsonlDocs:
    """One document per line: a JSON list of token ids, or an object with an "ids" list (and optionally a "loss"
    list of booleans, one per id)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such data file")

    def iter_from(self, index: int, epoch: int = 0) -> Iterator[list[int]]:
        with self.path.open() as f:
            for lineno, line in enumerate(f, 1):
                if lineno - 1 < index or not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{self.path}:{lineno}: not valid JSON ({e})") from None
                ids = obj.get("ids") if isinstance(obj, dict) else obj
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise DataError(f"{self.path}:{lineno}: expected a list of token ids or {{\"ids\": [...]}}")
                if isinstance(obj, dict) and "loss" in obj:
                    yield {"ids": ids, "loss": obj["loss"]}
                else:
                    yield ids

    def __iter__(self):
        return self.iter_from(0)


def split_doc(doc, where: str) -> tuple[list[int], list[bool] | None]:
    """A document as (token ids, per-token loss flags or None)."""
    loss = None
    if isinstance(doc, dict):
        doc, loss = doc.get("ids"), doc.get("loss")
        if doc is None:
            raise DataError(f"{where}: a dict document needs an \"ids\" list")
    doc = doc.tolist() if isinstance(doc, torch.Tensor) else list(doc)
    if loss is not None:
        loss = loss.tolist() if isinstance(loss, torch.Tensor) else list(loss)
        if len(loss) != len(doc) or not all(x in (0, 1) and isinstance(x, (bool, int)) for x in loss):
            raise DataError(f"{where}: \"loss\" must hold one boolean per token ({len(doc)}), got {len(loss)} values")
        loss = [bool(x) for x in loss]
    return doc, loss


def _docs_from(source, index: int, epoch: int) -> Iterator:
    """Iterate a source from document `index`: sources with `iter_from` jump there; others are replayed."""
    if hasattr(source, "iter_from"):
        return iter(source.iter_from(index, epoch))
    it = iter(source)
    for _ in range(index):
        next(it, None)
    return it


# -- packing --------------------------------------------------------------------------------------------------------
class Packer:
    """Packs a document stream into batches of `rows` rows of `seq_len` + 1 tokens.

    `repeat`: start the source again (next epoch) when it runs out; otherwise `next_batch` returns None once too few
    tokens remain for a full batch (the partial batch is dropped, never padded).
    `split_docs=False`: a document that fits in a row is never cut: if it does not fit the rest of the current row,
    that rest is padding (`pad_id`, no loss) and the document starts the next row. Longer documents are cut."""

    def __init__(self, source: Iterable, rows: int, seq_len: int, vocab_size: int | None = None, repeat: bool = True,
                 split_docs: bool = True, pad_id: int = 0):
        if rows < 1 or seq_len < 1:
            raise DataError(f"need rows >= 1 and seq_len >= 1, got rows={rows}, seq_len={seq_len}")
        self.source, self.rows, self.seq_len, self.vocab_size, self.repeat = source, rows, seq_len, vocab_size, repeat
        self.split_docs, self.pad_id = split_docs, pad_id
        self.epoch, self.doc_index, self.offset = 0, 0, 0  # the next token to pack: doc `doc_index`, `offset` in it
        self._it: Iterator | None = None
        self._cur: list[int] | None = None
        self._cur_loss: list[bool] | None = None

    # state --------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "doc_index": self.doc_index, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.doc_index, self.offset = int(state["epoch"]), int(state["doc_index"]), int(state["offset"])
        self._it, self._cur = None, None

    # packing ------------------------------------------------------------------------------------------------------
    def _current_doc(self) -> list[int] | None:
        """The document at doc_index (opening the stream there if needed), or None at the end of the data."""
        while self._cur is None:
            if self._it is None:
                self._it = _docs_from(self.source, self.doc_index, self.epoch)
            doc = next(self._it, None)
            if doc is None:
                if not self.repeat or self.doc_index == 0:  # doc_index 0: the source yields nothing at all
                    return None
                self.epoch, self.doc_index, self.offset, self._it = self.epoch + 1, 0, 0, None
                continue
            doc, loss = split_doc(doc, f"document {self.doc_index} (epoch {self.epoch})")
            if not doc:  # empty documents carry no tokens: skip them
                self.doc_index += 1
                continue
            if self.vocab_size is not None and (min(doc) < 0 or max(doc) >= self.vocab_size):
                bad = next(t for t in doc if not 0 <= t < self.vocab_size)
                raise DataError(f"document {self.doc_index} (epoch {self.epoch}) has token id {bad} outside "
                                f"[0, {self.vocab_size})")
            self._cur, self._cur_loss = doc, loss
        return self._cur

    def next_batch(self) -> Batch | None:
        W = self.seq_len + 1
        tok = torch.empty(self.rows, W, dtype=torch.long)
        doc = torch.empty(self.rows, W, dtype=torch.long)
        pos = torch.empty(self.rows, W, dtype=torch.long)
        loss = torch.ones(self.rows, W, dtype=torch.bool)
        saved = (self.epoch, self.doc_index, self.offset)
        for b in range(self.rows):
            filled, seg = 0, 0
            while filled < W:
                d = self._current_doc()
                if d is None:  # out of data: leave the state where this batch started
                    self.load_state_dict(dict(zip(("epoch", "doc_index", "offset"), saved)))
                    return None
                if not self.split_docs and self.offset == 0 and W - filled < len(d) <= W:
                    # Whole documents: one that fits a row but not the rest of this one starts the next row, so
                    # an answer is never trained without its question in view. The rest is padding: its own
                    # segment, never a label.
                    tok[b, filled:] = self.pad_id
                    doc[b, filled:] = seg
                    pos[b, filled:] = torch.arange(W - filled)
                    loss[b, filled:] = False
                    break
                n = min(W - filled, len(d) - self.offset)
                tok[b, filled:filled + n] = torch.tensor(d[self.offset:self.offset + n])
                doc[b, filled:filled + n] = seg
                pos[b, filled:filled + n] = torch.arange(self.offset, self.offset + n)
                if self._cur_loss is not None:
                    loss[b, filled:filled + n] = torch.tensor(self._cur_loss[self.offset:self.offset + n])
                filled, seg, self.offset = filled + n, seg + 1, self.offset + n
                if self.offset == len(d):
                    self.doc_index, self.offset, self._cur = self.doc_index + 1, 0, None
            # A document cut at the row's end continues in the next row, which starts again at this row's extra
            # (T + 1-th) token: every token is an input once. (A row that ends exactly at a document's end needs no
            # overlap: that last token's label would lie in another document and is masked anyway.)
            if self.offset > 0:
                self.offset -= 1
        return Batch(tok, doc, pos, loss)
