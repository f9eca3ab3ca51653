"""Model behaviour with no external reference: cache = full forward, MTP against its formula computed from the
raw tensors, gradients, config, inspect."""

import json
import subprocess
import sys

import pytest
import torch

import glm5
from glm5.config import ModelConfig, glm5 as glm5_preset, tiny
from glm5.inspect import weight_report

from .conftest import perturb


def _model(**kw):
    return perturb(glm5.load_model(tiny().replace(**kw)))


@pytest.mark.parametrize("impl", [glm5.Impl(), glm5.Impl("expanded", "mask", "loop")])
def test_incremental_decoding_with_cache_equals_full_forward(impl):
    """Prefill in two chunks then decode one token at a time, past index_topk; logits equal the full forward."""
    # 4 indexer heads: exact score ties (every head ReLU-clipped to 0) are frequent, so this also checks that the
    # tie-break does not depend on how many queries a step has.
    m = _model(index_topk=6, index_topk_pattern="FSF", num_hidden_layers=3, index_n_heads=4)
    m.impl = impl
    ids = torch.randint(0, m.config.vocab_size, (2, 30))
    with torch.no_grad():
        full = m(ids)
        cache = glm5.DenseCache(m.config, batch=2, max_len=32)
        parts = [m(ids[:, :5], cache=cache), m(ids[:, 5:11], cache=cache)]
        parts += [m(ids[:, t:t + 1], cache=cache) for t in range(11, 30)]
    step = torch.cat(parts, dim=1)
    assert (step - full).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="cache full"):
        m(ids[:, :3], cache=cache)


def test_decode_sized_latent_attention_equals_the_expanded_path():
    """Calls of at most DECODE_T queries attend absorbed through two batched products over the latent
    (MLAttention._attend_latent); the expanded SDPA path is the reference, with and without a top-k mask."""
    from glm5.model.mla import DECODE_T

    m = _model()
    attn, cfg = m.model.layers[0].self_attn, m.config
    B, T, S, K = 2, 3, 40, 6
    assert T <= DECODE_T
    g = torch.Generator().manual_seed(0)
    q_nope = torch.randn(B, T, cfg.num_attention_heads, cfg.qk_nope_head_dim, generator=g)
    q_rope = torch.randn(B, T, cfg.num_attention_heads, cfg.qk_rope_head_dim, generator=g)
    lat = torch.randn(B, S, cfg.kv_lora_rank + cfg.qk_rope_head_dim, generator=g)
    pos = torch.tensor([[S - 3, S - 2, S - 1], [20, 21, 22]])  # the second row sees only its first 23 keys
    visible = torch.arange(S)[None, None, :] <= pos[:, :, None]
    topk = torch.stack([torch.randperm(int(p) + 1, generator=g)[:K] for p in pos.flatten()]).view(B, T, K)
    with torch.no_grad():
        for idx in (None, topk):
            a = attn.attend(q_nope, q_rope, lat, visible, idx, "absorbed", "mask")
            b = attn.attend(q_nope, q_rope, lat, visible, idx, "expanded", "mask")
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_topk_ties_break_by_position():
    from glm5.model.dsa import select_topk

    s = torch.tensor([[[0.0, 2.0, 0.0, 0.0, 1.0, 0.0, float("-inf")]]])
    assert sorted(select_topk(s, 4)[0, 0].tolist()) == [0, 1, 2, 4]
    s = torch.tensor([[[3.0, float("-inf"), float("-inf"), float("-inf")]]])  # fewer visible than k
    assert select_topk(s, 2)[0, 0].tolist()[0] == 0
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 5, 50, generator=g).relu().round(decimals=1)  # many ties
    idx = select_topk(r, 7)
    for b in range(3):
        for t in range(5):
            row, chosen = r[b, t], set(idx[b, t].tolist())
            kth = row.topk(7).values[-1]
            assert len(chosen) == 7 and all(row[i] >= kth for i in chosen)
            ties = [i for i in range(50) if row[i] == kth]
            n_tied = 7 - int((row > kth).sum())
            assert sorted(chosen & set(ties)) == ties[:n_tied]


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mtp_reference(m, ids, embedding_first=True):
    """MTP logits from the raw tensors, the way DeepSeek-V3's and GLM-5's released MTP weights are served (vLLM
    model_executor/models/deepseek_mtp.py; SGLang's deepseek_nextn): eh_proj(cat([enorm(embed(tok[t+1])),
    hnorm(h[t])])) -> the MTP decoder block -> shared_head.norm -> the main lm_head. h is the main model's
    final-normed hidden state. Only the decoder block is the model's own module, called as a black box."""
    layer, eps = m.mtp[0], m.config.rms_norm_eps
    B, T = ids.shape
    h_BTD = m.hidden(ids)[:, :-1]
    e_BTD = m.model.embed_tokens.weight[ids[:, 1:]]
    parts = [_rms(e_BTD, layer.enorm.weight, eps), _rms(h_BTD, layer.hnorm.weight, eps)]
    x_BTD = torch.cat(parts if embedding_first else parts[::-1], -1) @ layer.eh_proj.weight.T
    pos_BT = torch.arange(T - 1).expand(B, T - 1)
    ctx = m._context(pos_BT, None, None, None, T - 1, ids.device)  # RoPE angles and the causal mask, no cache
    x_BTD = layer(x_BTD, ctx, None, m.impl.moe)[0]
    return _rms(x_BTD, layer.shared_head.norm.weight, eps) @ m.lm_head.weight.T, x_BTD, h_BTD, pos_BT


def test_mtp_equals_an_independent_computation():
    m = _model()
    ids = torch.randint(0, m.config.vocab_size, (2, 12))
    with torch.no_grad():
        logits, mtp = m.forward_with_mtp(ids)
        assert logits.shape == (2, 12, m.config.vocab_size) and mtp.shape == (2, 11, m.config.vocab_size)
        # the h MTP reads is the one the LM head reads: after the final norm
        assert torch.allclose(logits, m.hidden(ids) @ m.lm_head.weight.T, atol=1e-5)
        ref, x_ref, h, pos = _mtp_reference(m, ids)
        assert (mtp - ref).abs().max() <= 1e-4 * ref.abs().max()
        step, x = m.mtp_step(h, ids[:, 1:], pos)
        assert (step - ref).abs().max() <= 1e-4 * ref.abs().max() and torch.allclose(x, x_ref, atol=1e-5)
        # the weights make the concat order matter: a swapped order is far from the model's output
        swapped, *_ = _mtp_reference(m, ids, embedding_first=False)
        assert (mtp - swapped).abs().max() > 0.1 * ref.abs().max()


def test_mtp_is_causal():
    m = _model()
    ids = torch.randint(0, m.config.vocab_size, (1, 12))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % m.config.vocab_size
    with torch.no_grad():
        (_, mtp), (_, mtp2) = m.forward_with_mtp(ids), m.forward_with_mtp(ids2)
    # changing the last token changes no earlier MTP position
    assert torch.allclose(mtp2[:, :-1], mtp[:, :-1], atol=1e-5) and not torch.allclose(mtp2[:, -1], mtp[:, -1])


def test_packed_documents_do_not_attend_across_boundaries():
    m = _model(index_topk=4)
    a = torch.randint(0, m.config.vocab_size, (1, 9))
    b = torch.randint(0, m.config.vocab_size, (1, 7))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 9 + [1] * 7])
    pos = torch.cat([torch.arange(9), torch.arange(7)])[None]
    with torch.no_grad():
        out = m(packed, positions_BT=pos, doc_ids_BT=docs)
        assert torch.allclose(out[:, :9], m(a), atol=1e-5)
        assert torch.allclose(out[:, 9:], m(b), atol=1e-5)


def test_differentiable_end_to_end_including_indexer():
    m = _model(index_topk=4).train()
    ids = torch.randint(0, m.config.vocab_size, (2, 10))
    aux = glm5.ForwardAux(want_index_scores=True)
    logits, mtp = m.forward_with_mtp(ids, aux=aux)
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    lm = lm + torch.nn.functional.cross_entropy(mtp[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    lm.backward(retain_graph=True)
    no_grad = [n for n, p in m.named_parameters() if p.grad is None and "indexer" not in n]
    assert not no_grad
    # the top-k choice is discrete: the LM loss reaches the indexer only through... nothing
    assert all(p.grad is None for n, p in m.named_parameters() if "indexer" in n)
    m.zero_grad()
    idx_loss = sum(s.masked_fill(~s.isfinite(), 0).square().mean() for s in aux.index_scores.values())
    idx_loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "indexer" in n)


def test_grouped_moe_equals_loop_in_gradients_too():
    m = _model(n_routed_experts=8, num_experts_per_tok=3)
    ids = torch.randint(0, m.config.vocab_size, (2, 10))
    grads = []
    for impl in ("loop", "grouped"):
        m.zero_grad()
        m.impl = glm5.Impl(moe=impl)
        m(ids).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


def test_config_hf_round_trip_and_presets(tmp_path):
    for cfg in (tiny(), tiny().replace(index_topk_pattern="FSS"), glm5_preset()):
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
        assert ModelConfig.from_hf(tmp_path) == cfg
    c = ModelConfig(num_hidden_layers=6, index_topk_freq=2, index_skip_topk_offset=2)
    assert c.indexer_types == ["full", "full", "shared", "full", "shared", "full"]  # the reference's schedule
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.for_model(model_type="glm_moe_dsa", num_hidden_layers=6, index_topk_freq=2,
                                           index_skip_topk_offset=2)
    assert hf.indexer_types == c.indexer_types


def test_inspect_full_glm5_matches_published_figures():
    rep = weight_report(glm5_preset())
    assert abs(rep["total"] / 744e9 - 1) < 0.01  # 744B total (the MTP layer is counted apart)
    assert abs(rep["active_no_embed"] / 40e9 - 1) < 0.02  # 40B active
    assert abs(rep["bytes_bf16"] / 1.5e12 - 1) < 0.02  # ~1.5 TB in BF16
    assert abs(rep["bytes_fp8"] / rep["bytes_bf16"] - 0.5) < 0.01  # FP8 about half


def test_cli_inspect_runs_fast():
    out = subprocess.run([sys.executable, "-m", "glm5.cli", "inspect", "glm5"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "743.91B" in out and "39.88B" in out and "1.508 TB" in out


def test_model_package_imports_nothing_above_it():
    code = ("import sys, glm5.model, glm5.weights, glm5.config; "
            "bad=[m for m in sys.modules if m.startswith(('glm5.engine','glm5.train','glm5.rl','glm5.server'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_training_hooks_attn_probs_dense_switch_and_detached_indexer():
    m = _model(index_topk=5)
    ids = torch.randint(0, m.config.vocab_size, (2, 14))
    # dsa="off" is dense attention: the same as a model whose index_topk covers the whole sequence
    wide = glm5.load_model(m.config.replace(index_topk=64))
    wide.load_state_dict(m.state_dict())
    m.impl = glm5.Impl(dsa="off")
    aux = glm5.ForwardAux(want_attn_probs=True, want_index_scores=True)
    with torch.no_grad():
        assert torch.allclose(m(ids, aux=aux), wide(ids), atol=1e-5)
    assert all(v is None for v in aux.topk.values())
    p = aux.attn_probs[0]
    assert torch.allclose(p.sum(-1), torch.ones(2, 14)) and (p.triu(1) == 0).all()
    # by hand for layer 0: softmax over visible keys per head, mean over heads
    att = m.model.layers[0].self_attn
    x = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids))
    from glm5.model.layers import apply_rope, rope_angles

    cos, sin = rope_angles(torch.arange(14)[None].expand(2, 14), m.config.qk_rope_head_dim, m.config.rope_theta)
    with torch.no_grad():
        q = att.q_b_proj(att.q_a_layernorm(att.q_a_proj(x))).view(2, 14, 4, -1)
        qn, qr = q.split([16, 8], -1)
        c, kr = att.kv_a_proj_with_mqa(x).split([32, 8], -1)
        k, _ = att._expand(torch.cat([att.kv_a_layernorm(c), apply_rope(kr, cos, sin)], -1))
        s = torch.einsum("bthe,bshe->bhts", torch.cat([qn, apply_rope(qr, cos, sin)], -1), k) * m.config.softmax_scale
        ref = s.masked_fill(~torch.ones(14, 14, dtype=torch.bool).tril(), float("-inf")).softmax(-1).mean(1)
    assert torch.allclose(p, ref, atol=1e-5)

    # sparse stage: detached indexer input -> the indexer loss reaches only indexer parameters
    m.impl = glm5.Impl()
    m.train()
    aux = glm5.ForwardAux(want_index_scores=True, want_attn_probs=True, detach_indexer_input=True)
    m(ids, aux=aux)
    topk, p = aux.topk[0], aux.attn_probs[0]
    assert topk is not None and p.shape == (2, 14, 5)  # sparse stage: the probs of the top-k picks only
    # they are the masked dense computation's probs, read at the picks: zero on the invisible fillers of early rows
    keep = torch.zeros(2, 14, 14, dtype=torch.bool).scatter_(-1, topk, True) & torch.ones(14, 14, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = s.masked_fill(~keep[:, None], float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)
    assert torch.allclose(p, ref.gather(-1, topk), atol=1e-5)
    assert torch.allclose(p.sum(-1), torch.ones(2, 14), atol=1e-5)
    sum(v.masked_fill(~v.isfinite(), 0).square().sum() for v in aux.index_scores.values()).backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(".indexer." in n for n in got)


def test_grouped_moe_small_batches_take_the_per_expert_path_and_agree():
    from glm5.model.moe import MoE

    m = _model(n_routed_experts=8, num_experts_per_tok=2)
    moe = next(mod for mod in m.modules() if isinstance(mod, MoE))
    for n in (1, 3, 6):  # n * k < E: per chosen expert; 6 * 2 >= 8: grouped_mm
        x = torch.randn(n, m.config.hidden_size)
        with torch.no_grad():
            assert torch.allclose(moe(x[None], "grouped"), moe(x[None], "loop"), atol=1e-5)
