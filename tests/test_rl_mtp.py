"""RL's optional MTP loss: the MTP layer learns to draft the policy's samples, and nothing else moves because of it."""

import copy

import pytest
import torch
import torch.nn.functional as F

import glm5
from glm5.config import tiny
from glm5.rl.buffer import Group
from glm5.rl.trainer import RLTrainConfig, make_optimizer, mtp_loss_sum, train_step

from .conftest import perturb

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    m = perturb(glm5.load_model(tiny()), seed=4, std=0.05)
    assert len(m.mtp) == 1
    return m


def groups(V: int, seed: int = 0) -> list[Group]:
    """Two groups of three samples: 5 prompt ids, then 4-9 sampled ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for gid in range(2):
        samples = []
        for _ in range(3):
            n = int(torch.randint(4, 10, (1,), generator=g))
            ids = torch.randint(0, V, (5 + n,), generator=g).tolist()
            samples.append({"ids": ids, "mask": [0] * 5 + [1] * n,
                            "logprobs": [0.0] * 5 + (-torch.rand(n, generator=g) * 3).tolist()})
        out.append(Group(gid, [0.0, 1.0, 0.5], [[0]] * 3, {"samples": samples}))
    return out


def step(model, mtp_weight: float, batches: int = 1):
    m = copy.deepcopy(model)
    cfg = RLTrainConfig(lr=1e-3, mtp_weight=mtp_weight)
    opt = make_optimizer(m, cfg)
    stats = [train_step(m, opt, groups(m.config.vocab_size, seed=0), cfg) for _ in range(batches)]
    return m, stats


def test_the_mtp_loss_moves_the_mtp_layer_and_nothing_else(model):
    plain, _ = step(model, 0.0)
    with_mtp, st = step(model, 0.5)
    p0, p1, base = plain.state_dict(), with_mtp.state_dict(), model.state_dict()
    for k in p0:
        if k.startswith("mtp."):
            assert torch.equal(p0[k], base[k]), k  # no policy gradient reaches the MTP layer
        else:
            assert torch.equal(p0[k], p1[k]), k  # the policy's update is the RL loss's alone, bit for bit
    moved = [k for k in p1 if k.startswith("mtp.") and not torch.equal(p1[k], base[k])]
    assert any(".eh_proj." in k for k in moved) and any("shared_head.norm" in k for k in moved)
    assert st[0]["mtp_loss"] > 0


def test_mtp_loss_equals_cross_entropy_of_full_logits(model):
    (grp, _) = groups(model.config.vocab_size, seed=1)
    ids_BT = torch.tensor([grp.data["samples"][0]["ids"]])
    mask = torch.tensor([grp.data["samples"][0]["mask"]], dtype=torch.bool)[:, 1:]
    with torch.no_grad():
        h_BTD = model.hidden(ids_BT)[:, :-1]
        got = mtp_loss_sum(model, h_BTD, ids_BT, mask)
        T = ids_BT.shape[1]
        logits, _ = model.mtp_step(h_BTD[:, :T - 2], ids_BT[:, 1:T - 1], torch.arange(T - 2)[None])
        keep = mask[:, 1:]
        want = F.cross_entropy(logits[keep].float(), ids_BT[:, 2:][keep], reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_the_mtp_layer_learns_to_draft_the_samples(model):
    _, stats = step(model, 1.0, batches=12)  # the same six samples each step: the layer memorises them
    assert stats[-1]["mtp_loss"] < 0.85 * stats[0]["mtp_loss"]  # 6.23 -> 4.99


def test_mtp_weight_without_an_mtp_layer_is_an_error():
    m = glm5.load_model(tiny().replace(num_nextn_predict_layers=0))
    cfg = RLTrainConfig(mtp_weight=0.3)
    with pytest.raises(ValueError, match="no MTP layer"):
        train_step(m, make_optimizer(m, cfg), groups(m.config.vocab_size), cfg)


def test_rl_config_refuses_mtp_weight_without_an_mtp_layer_and_takes_variants(tmp_path):
    from glm5.rl.loop import RLConfig, RLError, check_config
    from glm5.tokenizer import Tokenizer

    tok = Tokenizer.default()
    glm5.save_checkpoint(glm5.load_model(tiny().replace(num_nextn_predict_layers=0, vocab_size=tok.vocab_size)),
                         tmp_path / "m")
    tok.save(tmp_path / "m")

    def cfg(**kw):
        return RLConfig(model=str(tmp_path / "m"), out_dir=str(tmp_path / "out"), **kw)

    with pytest.raises(RLError, match="has no MTP layer"):
        check_config(cfg(train=RLTrainConfig(mtp_weight=0.3)))
    check_config(cfg(families=("arithmetic_long", "world")))  # a data variant is a family here too
    with pytest.raises(RLError, match="unknown 'arith'.*arithmetic_long"):
        check_config(cfg(families=("arith",)))
