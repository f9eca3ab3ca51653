"""SFT: the loss mask covers exactly what the assistant writes (and the token ending each of its turns); the
packed labels follow it; `glm5 sft` runs on a JSONL of chats."""

import json

import pytest
import torch

from glm5.tokenizer import Tokenizer
from glm5.train.data import DataError, Packer
from glm5.train.losses import IGNORE, shifted_labels
from glm5.train.sft import ChatDocs, chat_doc

CALC = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 123 * 456?"},
    {"role": "assistant", "reasoning_content": "Large: use the tool.", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "123 * 456"}}}]},
    {"role": "tool", "content": "56088"},
    {"role": "assistant", "reasoning_content": "The tool says 56088.", "content": "123 * 456 = 56088."},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def runs(ids, loss, tok):
    """The decoded maximal runs of target tokens and of context tokens, in order."""
    out, cur, flag = [], [], None
    for i, l in zip(ids, loss):
        if flag is not None and l != flag:
            out.append((flag, tok.decode(cur)))
            cur = []
        cur.append(i)
        flag = l
    out.append((flag, tok.decode(cur)))
    return out


def test_mask_covers_exactly_the_assistant_tokens(tok):
    d = chat_doc(tok, CHAT, [CALC])
    assert len(d["ids"]) == len(d["loss"])
    targets = [text for flag, text in runs(d["ids"], d["loss"], tok) if flag]
    assert targets == [
        "<think>Large: use the tool.</think><tool_call>calculator<arg_key>expression</arg_key><arg_value>123 * 456"
        "</arg_value></tool_call><|observation|>",
        "<think>The tool says 56088.</think>123 * 456 = 56088.<|endoftext|>",
    ]
    context = "".join(text for flag, text in runs(d["ids"], d["loss"], tok) if not flag)
    assert "<tool_response>56088</tool_response>" in context  # the tool result is context, never a target
    assert context.endswith("<|assistant|>") and "Be brief." in context and "What is 123 * 456?" in context


def test_earlier_turns_whose_reasoning_is_dropped_are_context(tok):
    """Before the last user message the template drops a turn's reasoning: that turn then reads `</think>answer`
    where the model, thinking, writes `<think>`, so it is context. A turn without reasoning (thinking off) renders
    as written and stays a target; everything after the last user message is a target, tool turns included."""
    chat = [{"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "reasoning_content": "2 + 3 = 5.", "content": "5."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            *CHAT[1:]]
    d = chat_doc(tok, chat, [CALC])
    targets = [text for flag, text in runs(d["ids"], d["loss"], tok) if flag]
    assert targets == ["</think>Hello.<|user|>",
                       "<think>Large: use the tool.</think><tool_call>calculator<arg_key>expression</arg_key>"
                       "<arg_value>123 * 456</arg_value></tool_call><|observation|>",
                       "<think>The tool says 56088.</think>123 * 456 = 56088.<|endoftext|>"]
    context = "".join(text for flag, text in runs(d["ids"], d["loss"], tok) if not flag)
    assert "</think>5.<|user|>" in context  # the first answer, its reasoning dropped, is still in the prompt
    # the same first turn ending the chat keeps its reasoning and is a target
    alone = chat_doc(tok, chat[:2])
    assert [text for flag, text in runs(alone["ids"], alone["loss"], tok) if flag] == [
        "<think>2 + 3 = 5.</think>5.<|endoftext|>"]


def test_packed_labels_follow_the_mask(tok):
    docs = ChatDocs([(CHAT, [CALC]), ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
                                      None)], tok)
    want = [chat_doc(tok, m, t) for m, t in docs.chats]
    T = len(want[0]["ids"]) + 5  # rows hold a whole chat, the next one, and wrap around
    b = Packer(docs, rows=2, seq_len=T, repeat=True).next_batch()
    lab = shifted_labels(b.tokens_BT1, b.doc_BT1, 1, T, b.loss_BT1)
    # Stream the docs as the packer does and check every label against the doc's own flags.
    flat_ids = [i for d in want for i in d["ids"]] * 3
    flat_loss = [l for d in want for l in d["loss"]] * 3
    n_checked = 0
    for r in range(2):
        for t in range(T):
            tok_next = int(b.tokens_BT1[r, t + 1])
            if b.doc_BT1[r, t + 1] != b.doc_BT1[r, t]:
                assert lab[r, t] == IGNORE
                continue
            assert (lab[r, t] != IGNORE) == bool(b.loss_BT1[r, t + 1])
            if lab[r, t] != IGNORE:
                assert lab[r, t] == tok_next
                n_checked += 1
    assert n_checked > 10
    total = sum(len(d["ids"]) for d in want)
    # Row 1 continues the stream where row 0 ended (one token of overlap): ids and flags match the source there too.
    for r in range(2):
        assert b.loss_BT1[r].tolist() == [bool(x) for x in flat_loss[r * T:(r + 1) * T + 1]]
        assert b.tokens_BT1[r].tolist() == flat_ids[r * T:(r + 1) * T + 1] and total > 0


def test_bad_chats_are_refused(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant turn"):
        next(iter(ChatDocs(p, tok)))
    p.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        next(iter(ChatDocs(p, tok)))
    with pytest.raises(DataError, match="loss"):
        Packer([{"ids": [1, 2, 3], "loss": [True]}], rows=1, seq_len=2).next_batch()
    with pytest.raises(DataError, match="loss"):
        Packer([{"ids": [1, 2, 3], "loss": [1, 2, 0]}], rows=1, seq_len=2).next_batch()
    assert ChatDocs([{"messages": CHAT}], tok).chats[0] == (CHAT, None)  # the JSONL shape, in memory


def test_whole_documents_start_a_new_row_instead_of_being_cut():
    docs = [[1] * 3, [2] * 5, [3] * 4, [4] * 9, [5] * 2]
    b = Packer(docs, rows=4, seq_len=5, split_docs=False, pad_id=0).next_batch()
    assert b.tokens_BT1.tolist() == [[1, 1, 1, 0, 0, 0], [2, 2, 2, 2, 2, 0], [3, 3, 3, 3, 4, 4], [4] * 6]
    assert b.loss_BT1.tolist()[:2] == [[True] * 3 + [False] * 3, [True] * 5 + [False]]
    lab = shifted_labels(b.tokens_BT1, b.doc_BT1, 1, 5, b.loss_BT1)
    assert lab[0].tolist() == [1, 1, IGNORE, IGNORE, IGNORE]  # no label on, or across into, the padding
    cut = Packer(docs, rows=2, seq_len=5).next_batch()  # the default packs tightly and cuts
    assert cut.tokens_BT1[0].tolist() == [1, 1, 1, 2, 2, 2]


def test_glm5_sft_cli_runs(tok, tmp_path):
    from glm5.cli import main

    data = tmp_path / "chats.jsonl"
    with data.open("w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                             {"role": "assistant", "content": f"{i} + 1 = {i + 1}."}]}) + "\n")
    cfg = tmp_path / "model.json"
    from glm5.config import tiny
    cfg.write_text(json.dumps(tiny().replace(vocab_size=len(tok)).to_hf()))
    rc = main(["sft", "--model", str(cfg), "--data", str(data), "--out-dir", str(tmp_path / "run"), "--steps", "3",
               "--seq-len", "32", "--batch-size", "2", "--no-progress", "--no-plots", "--threads", "1"])
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert (tmp_path / "run" / "checkpoints").is_dir()
