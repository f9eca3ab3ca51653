"""Long context on a tiny scale: contexts many times index_topk, with every block size shrunk so that the bounded
paths (query blocks, key chunks of the indexer scan, top-k over candidates, rows gathered per query block) run many
times. The engine (chunked prefill + decode) against full-forward greedy decoding on the reference path; the fast
indexer selection against the reference score map; the slot-position visibility against the bool mask; and no
tensor of a prefill chunk's attention that grows with T x S."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import glm5
from glm5.config import tiny
from glm5.engine import Engine, SamplingParams
from glm5.model import dsa, mla
from glm5.model.cache import DenseCache
from glm5.model.layers import rope_angles
from glm5.model.mla import AttnContext, MLAttention

from .conftest import perturb

pytestmark = pytest.mark.usefixtures("one_thread")
K = 4  # index_topk: contexts of ~100-200 tokens are 25-50 K


@pytest.fixture
def small_blocks(monkeypatch):
    """Block sizes small enough that a ~200-token context spans several of each."""
    monkeypatch.setattr(dsa, "SELECT_BLOCK_ELEMS", 256)
    monkeypatch.setattr(dsa, "SCAN_CHUNK_ELEMS", 64)
    monkeypatch.setattr(dsa, "SCAN_CHUNK_MIN", 16)
    monkeypatch.setattr(dsa, "TOPK_PREFILTER", 8)
    monkeypatch.setattr(mla, "BLOCK_ELEMS", 2048)


def test_engine_long_context_equals_full_forward(small_blocks):
    model = perturb(glm5.load_model(tiny().replace(index_topk=K)), seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (150, 97)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = []
    with torch.no_grad():
        model.impl = glm5.Impl("expanded", "mask", "loop")  # the reference paths, one full forward per token
        for p in prompts:
            ids = list(p)
            for _ in range(params.max_tokens):
                top2 = model(torch.tensor([ids]))[0, -1].topk(2)
                assert top2.values[0] - top2.values[1] > 1e-4  # no near-tie: an exact comparison is fair
                ids.append(int(top2.indices[0]))
            want.append(ids[len(p):])
        model.impl = glm5.Impl()
    # one request alone (its blocks are one run: the cache hands out views) and two together (rows gathered)
    for batch in ([prompts[0]], prompts):
        eng = Engine(model, num_blocks=128, block_size=4, max_num_batched_tokens=40)
        got = [r[0].token_ids for r in eng.generate(batch, params)]
        assert got == want[:len(batch)]


def _indexer_inputs(cfg, B, T, S, seed):
    g = torch.Generator().manual_seed(seed)
    idx = dsa.Indexer(cfg)
    for p in idx.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    x = torch.randn(B, T, cfg.hidden_size, generator=g)
    q_resid = torch.randn(B, T, cfg.q_lora_rank, generator=g)
    k = torch.randn(B, S, cfg.index_head_dim, generator=g)
    k[:, ::7] = 0.0  # keys that score exactly 0: ties at the cut, broken by position
    return idx, x, q_resid, k


@pytest.mark.parametrize("lens", [(300, 300), (300, 170)])
def test_select_equals_reference_scores(small_blocks, lens):
    """Chunked prefill of the last T tokens of each row (rows of different lengths: padded key slots)."""
    cfg = tiny()
    B, T, S = len(lens), 40, max(lens)
    idx, x, q_resid, k = _indexer_inputs(cfg, B, T, S, seed=1)
    ends = torch.tensor(lens)[:, None]
    qpos_BT = ends - T + torch.arange(T)
    kpos_BS = torch.where(torch.arange(S) < ends, torch.arange(S), -1)
    mask_BTS = (kpos_BS[:, None] >= 0) & (kpos_BS[:, None] <= qpos_BT[:, :, None])
    lazy = dsa.SlotVisibility(kpos_BS, qpos_BT)
    assert dsa.key_ends(lazy) == dsa.key_ends(mask_BTS) == dsa.key_ends(mask_BTS, rows=7)
    cos, sin = rope_angles(qpos_BT, cfg.qk_rope_head_dim, cfg.rope_theta)
    with torch.no_grad():
        ref = dsa._topk_plain(idx.scores(x, q_resid, cos, sin, k, mask_BTS), K)
        for vis in (mask_BTS, lazy):
            got = idx.select(x, q_resid, cos, sin, k, vis, dsa.key_ends(vis), K)
            assert torch.equal(got.sort(-1).values, ref.sort(-1).values)


def test_topk_candidates_equal_plain():
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        S, k = int(torch.randint(600, 3000, (1,), generator=g)), int(torch.randint(3, 20, (1,), generator=g))
        x = torch.randn(2, 3, S, generator=g).relu()  # half the scores exactly 0
        if trial % 3 == 0:
            x = x.round()  # ties everywhere
        x[0, 0, S // 3:] = float("-inf")  # a row that sees a third of the keys
        x[1, 1, :] = 0.0
        want = dsa._topk_plain(x, k)
        got = dsa._topk_candidates(x, k)
        finite = x.isfinite()
        for b in range(2):
            for t in range(3):
                keep = lambda idx: {i for i in idx[b, t].tolist() if finite[b, t, i]}  # noqa: E731
                assert keep(got) == keep(want), (trial, b, t)


class LargestTensor(TorchDispatchMode):
    """The most bytes any one op wrote into a fresh tensor (views of their inputs not counted)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        seen = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen and t.nbytes > self.nbytes:
                self.nbytes, self.op = t.nbytes, str(func)
        return out


def test_prefill_chunk_buffers_do_not_grow_with_chunk_times_context(monkeypatch):
    """A T-query chunk against S cached keys (S = 64 T): no tensor the attention layer makes comes near a [T, S]
    bool mask: query blocks, key chunks and gathered rows are bounded by the block sizes (set small here), the rest
    is O(T) or O(S)."""
    monkeypatch.setattr(dsa, "SELECT_BLOCK_ELEMS", 16 * 1024)
    monkeypatch.setattr(dsa, "SCAN_CHUNK_ELEMS", 64 * 1024)
    monkeypatch.setattr(mla, "BLOCK_ELEMS", 32 * 1024)
    cfg = tiny().replace(index_topk=16)
    T, S0 = 256, 16384 - 256
    S = S0 + T
    attn = MLAttention(cfg, 0, has_indexer=True).eval()
    g = torch.Generator().manual_seed(0)
    for p in attn.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    cache = DenseCache(cfg, 1, S)
    cache.lat.normal_(generator=g)
    cache.ikey.normal_(generator=g)
    qpos_BT = torch.arange(S0, S)[None]
    cos, sin = rope_angles(qpos_BT, cfg.qk_rope_head_dim, cfg.rope_theta)
    x = torch.randn(1, T, cfg.hidden_size, generator=g)

    def run(visible, impls=()):
        cache.len = S0
        kpos_BS = cache.key_positions(qpos_BT)
        vis = visible(kpos_BS)
        with torch.inference_mode():
            return attn(x, AttnContext(cos, sin, vis, dsa.key_ends(vis), cache, *impls), None)

    lazy = lambda kpos_BS: dsa.SlotVisibility(kpos_BS, qpos_BT)  # noqa: E731
    assert mla.resolve_dsa("auto", T, (S0 + S) / 2, cfg.index_topk) == "gather"
    with LargestTensor() as seen:
        out, topk = run(lazy)
    assert topk.shape == (1, T, cfg.index_topk)
    assert seen.nbytes < T * S / 4, (seen.nbytes, seen.op)

    # the bool mask and the reference paths: the same choice and output
    mask = lambda kpos_BS: dsa.visible_block(lazy(kpos_BS), 0, T, S)  # noqa: E731
    ref, ref_topk = run(mask, ("expanded", "mask"))
    assert torch.equal(topk.sort(-1).values, ref_topk.sort(-1).values)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
