"""The training stages on tiny models: overfitting with MTP, aux-loss-free balancing, the DSA warm-up and the sparse
stage's gradient separation; optimizer groups and LR schedules."""

import json
import math

import pytest
import torch

import glm5
from glm5.train import TrainConfig, train
from glm5.train.balance import imbalance, moe_layers, update_bias
from glm5.train.checkpoint import list_checkpoints
from glm5.train.losses import ForwardLoss, loss_denominators, topk_recall
from glm5.train.loop import set_stage
from glm5.train.optim import Muon, build_optimizer, lr_factor, newton_schulz

from .conftest import perturb


pytestmark = pytest.mark.usefixtures("one_thread")


def _docs(n_docs, length, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n_docs)]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "event" not in line]


def _cfg(tmp_path, **kw):
    base = dict(model="tiny", out_dir=str(tmp_path / "run"), progress=False, plots=False, save_every=0,
                warmup_steps=0, schedule="constant")
    return TrainConfig(**{**base, **kw})


def test_overfits_a_fixed_batch_with_mtp(tmp_path):
    """4 random documents of 33 tokens, repeated every step: next-token loss from ~6.2 (ln 512) to < 0.3 in 30
    AdamW steps, and the 2-depth MTP loss (one shared layer) falls as far."""
    docs = _docs(4, 33)  # each fills one row of 32 inputs + 1 label exactly: every batch is the same
    cfg = _cfg(tmp_path, steps=30, seq_len=32, batch_size=4, lr=1e-2, warmup_steps=5, mtp_depth=2)
    train(cfg, source=docs)
    m = _metrics(tmp_path / "run")
    assert m[0]["lm"] > 5.5 and m[0]["mtp"] > 5.5
    assert min(r["lm"] for r in m[-5:]) < 0.3, [r["lm"] for r in m]
    assert min(r["mtp"] for r in m[-5:]) < 0.3, [r["mtp"] for r in m]


def test_mtp_from_leaves_the_mtp_layer_out_until_then(tmp_path):
    """mtp_from=6 of 10 steps: no MTP loss and a bitwise-unchanged MTP layer for 6 steps (saved at step 6), then the
    MTP loss on every step and the layer trains; several processes are refused with a clear error."""
    docs = _docs(8, 33)
    train(_cfg(tmp_path, steps=10, seq_len=32, batch_size=4, lr=1e-2, mtp_depth=1, mtp_from=6, save_every=6,
               keep_last=2), source=docs)
    m = _metrics(tmp_path / "run")
    assert ["mtp" in r for r in m] == [False] * 6 + [True] * 4
    start = glm5.load_model("tiny", seed=0).state_dict()
    at6, at10 = (glm5.load_model(c / "model").state_dict() for c in list_checkpoints(tmp_path / "run" / "checkpoints"))
    mtp = [k for k in start if k.startswith("mtp.") and ".indexer." not in k and "e_score_correction" not in k]
    assert mtp and all(torch.equal(at6[k], start[k]) for k in mtp)
    assert any(not torch.equal(at10[k], at6[k]) for k in mtp)
    assert any(not torch.equal(at6[k], start[k]) for k in start if k.startswith("model.layers."))
    with pytest.raises(ValueError, match="one process"):
        _cfg(tmp_path, steps=10, mtp_from=6).validate(world=2)
    with pytest.raises(ValueError, match="mtp_from must be"):
        _cfg(tmp_path, steps=10, mtp_from=10).validate(world=1)


def test_muon_also_overfits(tmp_path):
    docs = _docs(4, 33)
    train(_cfg(tmp_path, steps=25, seq_len=32, batch_size=4, lr=1e-2, warmup_steps=5, mtp_depth=1,
               optimizer="muon"), source=docs)
    m = _metrics(tmp_path / "run")
    assert min(r["lm"] for r in m[-5:]) < 0.3 and min(r["mtp"] for r in m[-5:]) < 0.5


def _router_inputs(model, ids):
    """{layer: the router's input rows [N, D]} for one forward over ids."""
    seen, hooks = {}, []

    def hook(layer):
        def keep_first(module, args, out):
            seen.setdefault(layer, args[0].detach())  # MTP layer: its first (only) depth
        return keep_first

    for layer, moe in moe_layers(model).items():
        hooks.append(moe.gate.register_forward_hook(hook(layer)))
    with torch.no_grad():
        model.forward_with_mtp(ids)
    for h in hooks:
        h.remove()
    return seen


def _skewed(seed=0):
    """A tiny model whose routers prefer low-numbered experts: along the mean direction of each router's inputs,
    expert e's logit is raised by 0.5 * (E - e) (so ~4 logits between the first and the last expert)."""
    model = perturb(glm5.load_model("tiny"), seed=seed)
    with torch.no_grad():
        for _, b in model.named_buffers():
            b.zero_()
        xs = _router_inputs(model, torch.tensor(_docs(4, 32, seed=9)))
        for layer, moe in moe_layers(model).items():
            m_D = xs[layer].mean(0)
            E = moe.gate.n_experts
            moe.gate.weight.add_(torch.outer(torch.arange(E, 0, -1).float() * 0.5, m_D / m_D.pow(2).sum()))
    return model, xs


def test_bias_update_balances_a_skewed_router():
    """The router itself, fed fixed inputs (128 tokens): sign updates of the selection bias drive max/mean load
    from ~2.7 to ~1.3 (128 tokens x 2 choices over 8 experts cannot balance exactly); the gate weights (the
    gradient path) are untouched."""
    model, xs = _skewed()
    moe = moe_layers(model)[1]
    x_ND = xs[1]
    w0 = moe.gate.weight.clone()

    def load():
        _, idx_Nk, _ = moe.gate(x_ND)
        return torch.bincount(idx_Nk.flatten(), minlength=moe.gate.n_experts).float()

    before = imbalance(load())
    trace = []
    for _ in range(400):
        trace.append(imbalance(load()))
        update_bias(model, {1: load()}, speed=0.003)
    after = sum(trace[-50:]) / 50  # sign updates end in a small oscillation around balance: average it
    assert before > 2.0, before
    assert after < 1.4 and after < before / 1.8, (before, after)
    assert torch.equal(moe.gate.weight, w0)


def test_bias_update_through_the_training_loop(tmp_path):
    """Same through `train` (lr 0, so only the biases move), on the batch the skew was measured on: the logged
    imbalance of every MoE layer (the MTP layer's included) falls from > 2.2 to well below."""
    model, _ = _skewed()
    glm5.save_checkpoint(model, tmp_path / "skewed")
    train(_cfg(tmp_path, model=str(tmp_path / "skewed"), steps=60, seq_len=31, batch_size=4, lr=0.0,
               bias_speed=0.006, mtp_depth=1), source=_docs(4, 32, seed=9))
    m = _metrics(tmp_path / "run")
    assert sorted(m[0]["imbalance"], key=int) == ["1", "2", "3"]
    for layer in m[0]["imbalance"]:
        first = m[0]["imbalance"][layer]
        last = sum(r["imbalance"][layer] for r in m[-10:]) / 10
        assert first > 2.2 and last < first / 1.6, (layer, first, last)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_dsa_warmup_trains_only_the_indexers(tmp_path):
    """Dense warm-up on a perturbed (peaky-attention) model: indexer KL falls, the top-k recall of dense attention
    mass rises toward the oracle (top-k of the attention itself), and every non-indexer tensor, MoE biases
    included, is bitwise unchanged."""
    model = perturb(glm5.load_model("tiny"), seed=1)
    glm5.save_checkpoint(model, tmp_path / "dense")
    docs = _docs(4, 49)
    ids = torch.tensor(docs)[:, :48]
    aux = glm5.ForwardAux(want_index_scores=True, want_attn_probs=True)
    model.impl = glm5.Impl(dsa="off")
    with torch.no_grad():
        model(ids, aux=aux)
    oracle = sum(topk_recall(p, torch.where(p > 0, p, -1.0).masked_fill(~torch.isfinite(aux.index_scores[l]),
                                                                        float("-inf")), 16)[0]
                 for l, p in aux.attn_probs.items() if l in aux.index_scores) / (3 * 128)
    train(_cfg(tmp_path, model=str(tmp_path / "dense"), stage="dsa_warmup", steps=25, seq_len=48, batch_size=4,
               lr=1e-2, mtp_depth=1, save_every=25), source=docs)
    m = _metrics(tmp_path / "run")
    assert m[-1]["indexer_kl"] < 0.25 * m[0]["indexer_kl"], [r["indexer_kl"] for r in m]
    assert m[-1]["recall"] > m[0]["recall"] + 0.1, [r["recall"] for r in m]
    assert m[-1]["recall"] <= oracle + 1e-6
    assert len({round(r["lm"], 6) for r in m}) == 1  # the LM never moves
    after = glm5.load_model(list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "model")
    before = _state(model)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(".indexer." in k for k in changed), changed
    assert any(k.startswith("mtp.") for k in changed)  # the MTP layer's indexer trains too (mtp_depth 1)


def test_sparse_stage_gradients_are_separated():
    """Sparse stage (T=48 > index_topk=16): the LM, MTP and balance losses reach every trainable parameter but no
    indexer parameter; the indexer KL reaches only indexer parameters."""
    model = perturb(glm5.load_model("tiny"), seed=3)
    model.train()
    set_stage(model, "sparse", 1)
    net = ForwardLoss(model, "sparse", mtp_depth=1, balance_weight=1e-2)
    toks = torch.tensor(_docs(2, 49, seed=4))
    doc, pos = torch.zeros_like(toks), torch.arange(49).expand(2, 49)
    _, losses, _ = net(toks, doc, pos, loss_denominators(toks, doc, 1))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    lm_side = losses["lm"] + losses["mtp"] + losses["balance"]
    g_lm = torch.autograd.grad(lm_side, params, retain_graph=True, allow_unused=True)
    g_kl = torch.autograd.grad(losses["indexer_kl"], params, allow_unused=True)
    nz = lambda g: g is not None and bool(g.abs().sum() > 0)  # noqa: E731
    idx = [".indexer." in n for n in names]
    assert all(not nz(g) for g, i in zip(g_lm, idx) if i)
    assert all(not nz(g) for g, i in zip(g_kl, idx) if not i)
    assert all(nz(g) for g, i in zip(g_kl, idx) if i)  # every indexer (3 main layers + MTP) learns from the KL
    assert sum(nz(g) for g, i in zip(g_lm, idx) if not i) >= 0.9 * sum(not i for i in idx)
    # Top-k attention was really on: the dense model gives another LM loss.
    model.impl = glm5.Impl(dsa="off")
    _, dense, _ = net(toks, doc, pos, loss_denominators(toks, doc, 1))
    assert abs(float(dense["lm"].detach() - losses["lm"].detach())) > 1e-3


def test_muon_newton_schulz_in_fp32_is_torchs_update():
    """glm5's Muon is torch.optim.Muon with the Newton-Schulz iterations in a chosen dtype: in bf16 the iteration is
    torch's bit for bit; in fp32 a few steps land where torch's (bf16) land, within bf16's rounding, and the optimizer
    state loads into torch's own Muon."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.Generator().manual_seed(0)
    for shape in ((48, 32), (32, 48)):
        m = torch.randn(shape, generator=g)
        assert torch.equal(newton_schulz(m, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.bfloat16),
                           _zeropower_via_newtonschulz(m, (3.4445, -4.7750, 2.0315), 5, 1e-7))
    w0 = [torch.randn(48, 32, generator=g), torch.randn(16, 64, generator=g)]
    grads = [[torch.randn(w.shape, generator=g) for w in w0] for _ in range(3)]
    runs = {}
    for name, make in (("torch", lambda ps: torch.optim.Muon(ps, **kw)),
                       ("fp32", lambda ps: Muon(ps, ns_dtype=torch.float32, **kw))):
        kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = make(ps)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        runs[name] = (ps, opt)
    for a, b, w in zip(runs["torch"][0], runs["fp32"][0], w0):
        delta_a, delta_b = (a - w).detach(), (b - w).detach()
        assert (delta_a - delta_b).norm() < 0.02 * delta_a.norm()
    torch.optim.Muon([torch.nn.Parameter(w.clone()) for w in w0]).load_state_dict(runs["fp32"][1].state_dict())


@pytest.mark.parametrize("amx, avx512_bf16, fast", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_is_fast_on_cpus_with_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, fast):
    """bf16 is the CPU's fast path where it has AMX or AVX512-BF16 (a 2-core AVX512-BF16 EPYC: ~700 GFLOP/s bf16
    against ~135 fp32); an AVX2-only CPU keeps fp32 (bf16 there is hundreds of times slower)."""
    from glm5.train.optim import bf16_is_fast

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert bf16_is_fast("cpu") is fast

def test_optimizer_groups():
    model = glm5.load_model("tiny")
    model.train()
    set_stage(model, "pretrain", 1)
    opt = build_optimizer(model, "muon", lr=1e-3)
    muon, adamw = opt.opts
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert all(model.get_parameter(n).ndim == 2 for n in in_muon)
    assert "model.embed_tokens.weight" not in in_muon and "lm_head.weight" not in in_muon
    assert "model.layers.0.self_attn.q_a_proj.weight" in in_muon
    assert not any(".indexer." in n for n in in_muon)  # frozen in pretraining
    rest = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert "model.layers.1.mlp.experts.gate_proj" in rest  # 3-D expert stacks: AdamW
    no_decay = [g for g in adamw.param_groups if g["weight_decay"] == 0][0]
    assert all(p.ndim == 1 for p in no_decay["params"])


def test_lr_schedules():
    total, warm = 100, 10
    assert lr_factor(0, total, warm) == pytest.approx(0.1) and lr_factor(9, total, warm) == pytest.approx(1.0)
    assert lr_factor(10, total, warm, "cosine", 0.1) == pytest.approx(1.0)
    mid = warm + (total - warm) / 2
    assert lr_factor(int(mid), total, warm, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-12)
    assert lr_factor(total - 1, total, warm, "cosine", 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (total - 1 - warm) / (total - warm))))
    assert lr_factor(50, total, warm, "wsd", 0.0, 0.2) == 1.0 and lr_factor(79, total, warm, "wsd", 0.0, 0.2) == 1.0
    assert lr_factor(80, total, warm, "wsd", 0.0, 0.2) == pytest.approx(1 - 1 / 20)
    assert lr_factor(99, total, warm, "wsd", 0.0, 0.2) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 0, "linear")


def _one_step_grads(model):
    net = ForwardLoss(model, "pretrain", mtp_depth=2)
    toks = torch.tensor(_docs(2, 25, seed=6))
    doc, pos = torch.zeros_like(toks), torch.arange(25).expand(2, 25)
    total, _, _ = net(toks, doc, pos, loss_denominators(toks, doc, 2))
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lm_and_mtp_losses_match_full_logits():
    """The step applies the vocabulary head only where a label is kept (SFT masks, document boundaries): the same
    loss and gradients as full logits with ignore_index, written out here from the model's own forward."""
    import torch.nn.functional as F

    from glm5.train.losses import IGNORE, shifted_labels

    model = perturb(glm5.load_model("tiny"), seed=8)
    model.train()
    set_stage(model, "pretrain", 1)
    g = torch.Generator().manual_seed(9)
    toks = torch.tensor(_docs(2, 25, seed=10))
    doc = (torch.arange(25) >= 11).long().expand(2, 25)  # two documents per row
    pos = torch.where(doc == 0, torch.arange(25), torch.arange(25) - 11)
    loss = torch.rand(2, 25, generator=g) < 0.4  # an SFT-like mask: most positions carry no loss
    den = loss_denominators(toks, doc, 1, loss)
    total, parts, _ = ForwardLoss(model, "pretrain", mtp_depth=1, balance_weight=0.0)(toks, doc, pos, den, loss)
    total.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    T = 24
    h = model.hidden(toks[:, :-1], pos[:, :-1], None, doc[:, :-1])
    lab0 = shifted_labels(toks, doc, 1, T, loss)
    lm = F.cross_entropy(model.lm_head(h).flatten(0, 1), lab0.flatten(), ignore_index=IGNORE, reduction="sum")
    logits1, _ = model.mtp_step(h[:, :T - 1], toks[:, 1:T], pos[:, :T - 1], 0, None, doc[:, :T - 1])
    lab1 = shifted_labels(toks, doc, 2, T - 1, loss)
    mtp = F.cross_entropy(logits1.flatten(0, 1), lab1.flatten(), ignore_index=IGNORE, reduction="sum")
    assert (lab0 == IGNORE).float().mean() > 0.5
    want = lm / den["labels0"] + 0.3 * mtp / den["labels1"]
    want.backward()
    torch.testing.assert_close(parts["lm"], lm.detach() / den["labels0"])
    torch.testing.assert_close(total.detach(), want.detach())
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None} and len(got) > 50
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6)  # fp32 rounding at gradients ~1


def test_fused_head_cross_entropy_matches_full_logits_over_chunks():
    """head_ce_sum fuses the head, the loss and both gradients chunk by chunk (linear_ce): over several chunks, with
    a norm in front (the MTP head), a frozen head (only h gets a gradient) and without grad, the same value and
    gradients as F.cross_entropy over the full logits with ignore_index."""
    import torch.nn.functional as F

    from glm5.train.losses import HEAD_CHUNK, IGNORE, head_ce_sum

    g = torch.Generator().manual_seed(3)
    B, T, D, V = 3, HEAD_CHUNK, 16, 50  # ~75% of the rows labelled: two full chunks and a ragged third
    head, norm = torch.nn.Linear(D, V, bias=False), torch.nn.RMSNorm(D)
    with torch.no_grad():
        head.weight.normal_(0, 0.5, generator=g)
        norm.weight.uniform_(0.5, 1.5, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g).masked_fill(torch.rand(B, T, generator=g) < 0.25, IGNORE)
    assert (labels != IGNORE).sum() > 2 * HEAD_CHUNK
    for use_norm, train_head in ((False, True), (True, True), (True, False)):
        head.weight.requires_grad_(train_head)
        head.weight.grad = None
        h = torch.randn(B, T, D, generator=g, requires_grad=True)
        got = head_ce_sum(head, h, labels, norm if use_norm else None)
        got.mul(1.7).backward()  # a non-unit upstream gradient reaches both inputs
        got_grads = h.grad.clone(), (head.weight.grad.clone() if train_head else None)
        h.grad, head.weight.grad = None, None
        x = norm(h) if use_norm else h
        want = F.cross_entropy(head(x).flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        want.mul(1.7).backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got_grads[0], h.grad, rtol=1e-4, atol=1e-5)
        if train_head:
            torch.testing.assert_close(got_grads[1], head.weight.grad, rtol=1e-4, atol=1e-4)
        else:
            assert head.weight.grad is None
        with torch.no_grad():
            torch.testing.assert_close(head_ce_sum(head, h, labels, norm if use_norm else None), want.detach(),
                                       rtol=1e-5, atol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    from glm5.train.loop import checkpoint_layers

    grads = []
    for ckpt_on in (False, True):
        model = perturb(glm5.load_model("tiny"), seed=7)
        model.train()
        set_stage(model, "pretrain", 2)
        if ckpt_on:
            checkpoint_layers(model)
        grads.append(_one_step_grads(model))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 50
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_runs(tmp_path):
    """bf16 autocast: finite, and the first loss within 2% of fp32 (the same seed, data and weights)."""
    first = []
    for i, amp in enumerate(("none", "bf16")):
        train(_cfg(tmp_path, out_dir=str(tmp_path / f"r{i}"), steps=2, seq_len=16, batch_size=2, autocast=amp))
        first.append(json.loads((tmp_path / f"r{i}" / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert math.isfinite(first[1]) and first[1] == pytest.approx(first[0], rel=0.02)


def test_cli_subcommand_and_config_files(tmp_path, capsys):
    """`add_parser` plugs `train` into an argparse CLI (as glm5/cli.py does); a JSON config is read, flags win over
    it, and an unknown setting is an error naming it."""
    import argparse

    from glm5.train.cli import add_parser

    p = argparse.ArgumentParser(prog="glm5")
    add_parser(p.add_subparsers(dest="cmd", required=True))
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"steps": 50, "seq_len": 16, "batch_size": 2, "progress": False, "plots": False,
                                "out_dir": str(tmp_path / "run")}))
    args = p.parse_args(["train", "--config", str(conf), "--steps", "2", "--threads", "1"])
    assert args.fn(args) == 0
    assert len(_metrics(tmp_path / "run")) == 2
    assert "step 2 loss" in capsys.readouterr().out
    conf.write_text(json.dumps({"step": 3}))
    args = p.parse_args(["train", "--config", str(conf)])
    assert args.fn(args) == 2
    assert "unknown setting(s) step" in capsys.readouterr().err


def test_sequence_balance_loss_matches_the_formula():
    """DeepSeek-V3 eq. 17-20, written out with loops: per row sum_e f_e P_e, f_e = E/(kT) * count_e,
    P_e = mean_t s_te / sum_e' s_te'. Balanced routing with uniform scores gives exactly 1 per row."""
    from glm5.train.losses import sequence_balance_sum

    g = torch.Generator().manual_seed(0)
    B, T, E, k = 3, 10, 8, 2
    logits = torch.randn(B * T, E, generator=g)
    idx = logits.topk(k, -1).indices
    want = 0.0
    for b in range(B):
        s = logits[b * T:(b + 1) * T].sigmoid()
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.zeros(E)
        for t in range(T):
            for e in idx[b * T + t]:
                f[e] += E / (k * T)
        want += float((f * P).sum())
    assert float(sequence_balance_sum(idx, logits, B)) == pytest.approx(want, rel=1e-6)
    flat = torch.arange(T * k).remainder(E).view(T, k).repeat(B, 1)  # every expert chosen equally often
    assert float(sequence_balance_sum(flat, torch.zeros(B * T, E), B)) == pytest.approx(B, rel=1e-6)
