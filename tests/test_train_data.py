"""Packing: document ids, per-document positions, exact resume of the data position; labels and attention never
cross a packed-document boundary (checked through the training loss itself)."""

import pytest
import torch

import glm5
from glm5.train.data import DataError, JsonlDocs, Packer, SyntheticDocs
from glm5.train.losses import IGNORE, ForwardLoss, shifted_labels
from glm5.train.loop import set_stage

from .conftest import perturb


pytestmark = pytest.mark.usefixtures("one_thread")


def _docs(lens, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def test_packer_doc_ids_positions_and_coverage():
    docs = _docs([5, 13, 3, 30, 7, 9, 2, 11])
    b = Packer(docs, rows=3, seq_len=10, repeat=False).next_batch()
    stream = [(i, j, t) for i, d in enumerate(docs) for j, t in enumerate(d)]
    seen = []
    for r in range(3):
        tok, doc, pos = b.tokens_BT1[r].tolist(), b.doc_BT1[r].tolist(), b.pos_BT1[r].tolist()
        assert doc == sorted(doc) and doc[0] == 0 and all(y - x in (0, 1) for x, y in zip(doc, doc[1:]))
        for t in range(11):
            if t and doc[t] == doc[t - 1]:
                assert pos[t] == pos[t - 1] + 1  # inside a document positions count up ...
            elif t:
                assert pos[t] == 0  # ... and restart at a new one
        seen.append(list(zip(pos, tok)))
    # The rows follow the document stream; a document cut at a row's end resumes in the next row at the cut
    # (the row's extra label token is repeated as the next row's first input). Here row 0 ends inside doc 1, so it
    # overlaps row 1; row 1 ends exactly at the end of doc 2 (5 + 13 + 3 = 21 tokens = 10 inputs + 11), so doc 2's
    # last token is only a label (its own label would lie in doc 3 and is masked anyway) and row 2 starts doc 3.
    assert seen[0][-1] == seen[1][0] == (5, docs[1][5])
    assert seen[1][-1] == (2, docs[2][2]) and seen[2][0] == (0, docs[3][0])
    flat = [x for row in seen for x in row[:-1]]
    want = [(j, t) for i, j, t in stream if (i, j) != (2, 2)][:len(flat)]
    assert flat == want

def test_packer_state_resumes_exactly_and_repeats_epochs():
    src = SyntheticDocs(512, n_docs=7, min_len=3, max_len=20, seed=3)
    a = Packer(src, rows=2, seq_len=16)
    batches = [a.next_batch() for _ in range(6)]  # 7 short docs: several epochs
    assert a.epoch >= 1
    b = Packer(src, rows=2, seq_len=16)
    for _ in range(2):
        b.next_batch()
    c = Packer(src, rows=2, seq_len=16)
    c.load_state_dict(b.state_dict())
    for want in batches[2:]:
        got = c.next_batch()
        assert torch.equal(got.tokens_BT1, want.tokens_BT1) and torch.equal(got.doc_BT1, want.doc_BT1)
        assert torch.equal(got.pos_BT1, want.pos_BT1)


def test_packer_errors_and_end_of_data(tmp_path):
    with pytest.raises(DataError, match="token id 600"):
        Packer([[1, 2, 600]], rows=1, seq_len=2, vocab_size=512).next_batch()
    p = Packer([[1, 2, 3]], rows=1, seq_len=8, repeat=False)
    assert p.next_batch() is None and p.state_dict()["doc_index"] == 0  # partial batch dropped, state kept
    f = tmp_path / "d.jsonl"
    f.write_text('[1, 2, 3]\n{"ids": [4, 5]}\n\n[6, "x"]\n')
    it = iter(JsonlDocs(f))
    assert next(it) == [1, 2, 3] and next(it) == [4, 5]
    with pytest.raises(DataError, match=r"d.jsonl:4"):
        next(it)


def test_labels_never_cross_a_document_boundary():
    b = Packer(_docs([4, 9, 2, 6, 12, 5]), rows=2, seq_len=12, repeat=False).next_batch()
    T = 12
    for shift in (1, 2, 3, 4):  # next token and MTP depths 1..3
        n = T + 1 - shift
        lab = shifted_labels(b.tokens_BT1, b.doc_BT1, shift, n)
        for r in range(2):
            for t in range(n):
                same = b.doc_BT1[r, t + shift] == b.doc_BT1[r, t]
                assert lab[r, t] == (b.tokens_BT1[r, t + shift] if same else IGNORE)
        assert (lab == IGNORE).any() and (lab != IGNORE).any()


def _loss_sums(net, b, depth):
    den = {"rows": 1.0, "queries": 1.0, **{f"labels{d}": 1.0 for d in range(depth + 1)},
           **{f"queries{d}": 1.0 for d in range(depth + 1)}}
    with torch.no_grad():
        _, losses, _ = net(b.tokens_BT1, b.doc_BT1, b.pos_BT1, den)
    return losses["lm"], losses["mtp"] * depth  # sums over tokens (mtp: summed over depths)


@pytest.mark.parametrize("stage", ["pretrain", "sparse"])
def test_packed_loss_equals_separate_documents(stage):
    """Two documents packed in one row give exactly the loss sums of the two documents run alone: attention, the
    next-token labels, and the labels and attention of every MTP depth stay inside each document. Without the
    document ids (the negative control) the sums differ, so the check can fail."""
    model = perturb(glm5.load_model("tiny"), seed=2)
    model.train()
    set_stage(model, stage, 2)
    net = ForwardLoss(model, stage, mtp_depth=2)
    a, c = _docs([20, 23], seed=5)
    packed = Packer([a, c], rows=1, seq_len=len(a) + len(c) - 1, repeat=False).next_batch()
    assert packed.doc_BT1[0].tolist() == [0] * 20 + [1] * 23
    lm, mtp = _loss_sums(net, packed, 2)
    alone_a = Packer([a], rows=1, seq_len=len(a) - 1, repeat=False).next_batch()
    alone_c = Packer([c], rows=1, seq_len=len(c) - 1, repeat=False).next_batch()
    lm_a, mtp_a = _loss_sums(net, alone_a, 2)
    lm_c, mtp_c = _loss_sums(net, alone_c, 2)
    torch.testing.assert_close(lm, lm_a + lm_c, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mtp, mtp_a + mtp_c, rtol=1e-5, atol=1e-4)
    # Negative control: one document id for the whole row lets attention and labels cross the boundary.
    packed.doc_BT1.zero_()
    packed.pos_BT1.copy_(torch.arange(packed.pos_BT1.shape[1]))
    lm_x, _ = _loss_sums(net, packed, 2)
    assert (lm_x - (lm_a + lm_c)).abs() > 0.1  # vs a tolerance of ~3e-3 above
