"""Per-step intra-op threads (engine/threads.py) and the runner's LM head for few-row calls (engine/runner.Head)."""

import pytest
import torch

import glm5
from glm5.config import tiny
from glm5.engine import Engine, SamplingParams
from glm5.engine import threads as threads_mod
from glm5.engine.runner import Head
from glm5.engine.threads import StepThreads, macs_per_token

from .conftest import perturb


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _model():
    return perturb(glm5.load_model(tiny().replace(index_topk=8)), seed=3)


def test_macs_per_token_counts_the_chosen_experts_and_the_head_not_the_embedding():
    m = _model()
    cfg = m.config
    expert = sum(p[0].numel() for p in m.model.layers[cfg.num_hidden_layers - 1].mlp.experts.parameters())
    all_params = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("mtp."))
    moe_layers = sum(t == "sparse" for t in cfg.mlp_layer_types)
    unused = moe_layers * expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    assert macs_per_token(m) == all_params - unused - m.model.embed_tokens.weight.numel()


def test_small_steps_run_on_one_thread_and_the_callers_count_comes_back(two_threads, monkeypatch):
    m = _model()
    per_token = macs_per_token(m)
    monkeypatch.setattr(threads_mod, "SERIAL_MACS", 20 * per_token)  # steps under 20 tokens are "small"
    st = StepThreads(m)
    assert st.threads == 2 and st.for_tokens(1) == 1 and st.for_tokens(19) == 1 and st.for_tokens(20) == 2
    assert StepThreads(m, small=2).for_tokens(1) == 2
    assert StepThreads(m, threads=1, small=2).for_tokens(1) == 1  # never more than the engine's count
    with pytest.raises(ValueError, match="integer >= 1"):
        StepThreads(m, small=0)

    seen = []
    hook = m.model.layers[0].register_forward_pre_hook(lambda mod, a: seen.append((a[0].shape[1],
                                                                                   torch.get_num_threads())))
    try:
        eng = Engine(m, num_blocks=64, block_size=4, max_num_batched_tokens=64)
        eng.generate([list(range(1, 41))], SamplingParams(temperature=0, max_tokens=4))
    finally:
        hook.remove()
    assert seen[0] == (40, 2)  # the 40-token prefill: both threads
    assert seen[1:] and all(s == (1, 1) for s in seen[1:])  # the decode steps: one
    assert torch.get_num_threads() == 2  # restored after every step


def test_step_threads_do_not_change_greedy_tokens(two_threads):
    m = _model()
    prompts = [list(range(3, 30)), list(range(50, 61))]
    p = SamplingParams(temperature=0, max_tokens=12)
    one = Engine(m, num_blocks=64, block_size=4).generate(prompts, p)
    both = Engine(m, num_blocks=64, block_size=4, small_step_threads=2).generate(prompts, p)
    for a, b in zip(one, both):
        assert a[0].token_ids == b[0].token_ids
        assert max(abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs)) < 1e-5


def test_head_uses_its_few_row_layouts_and_remakes_them_after_a_write():
    m = _model()
    head = Head(m.lm_head)
    assert head.enabled
    for rows in (1, 2, 3, 4, 17):
        h = torch.randn(rows, m.config.hidden_size)
        torch.testing.assert_close(head(h), m.lm_head(h), rtol=1e-5, atol=1e-5)
    first, packed = head._wt, head._packed
    assert first is not None and first.shape == m.lm_head.weight.shape[::-1]
    assert packed is not None or not head.packable
    head(torch.randn(1, m.config.hidden_size))
    head(torch.randn(Head.GEMV_ROWS + 1, m.config.hidden_size))
    assert head._wt is first and head._packed is packed  # unchanged weight: the copies are kept
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)  # an in-place write, as update_weights makes
    for rows in (1, Head.GEMV_ROWS + 1):
        h = torch.randn(rows, m.config.hidden_size)
        torch.testing.assert_close(head(h), m.lm_head(h), rtol=1e-5, atol=1e-5)
    assert head._wt is not first and (head._packed is not packed or packed is None)
    h = torch.randn(2, 3, m.config.hidden_size)  # not [rows, D]: nn.Linear's own path
    torch.testing.assert_close(head(h), m.lm_head(h))
    assert not Head(torch.nn.Linear(8, 16, bias=True)).enabled  # a biased head keeps nn.Linear
    assert not Head(torch.nn.Linear(8, 16, bias=False).to(torch.bfloat16)).enabled


def test_serve_engine_takes_small_step_threads():
    """`glm5 serve --small-step-threads N` reaches the engine through build_engine; a count below 1 is refused there
    (serve prints the error and exits 2)."""
    from glm5.server.launch import build_engine

    from .server_util import TOK

    m = glm5.load_model(tiny().replace(vocab_size=TOK.vocab_size))
    eng = build_engine(m, TOK, cache_bytes=4 << 20, small_step_threads=2)
    assert eng.threads.small == min(2, eng.threads.threads)
    with pytest.raises(ValueError, match="integer >= 1"):
        build_engine(m, TOK, cache_bytes=4 << 20, small_step_threads=0)


def test_a_model_loaded_under_inference_mode_decodes_with_the_head_copy():
    """Inference tensors have no version counter: the head's copy is keyed without it, and update_weights drops it."""
    with torch.inference_mode():
        m = _model()
    assert m.lm_head.weight.is_inference()
    eng = Engine(m, num_blocks=64, block_size=4)
    prompt = list(range(5, 25))
    (a,), = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=6))
    ref = Engine(_model(), num_blocks=64, block_size=4)
    (b,), = ref.generate([prompt], SamplingParams(temperature=0, max_tokens=6))
    assert a.token_ids == b.token_ids
    assert eng.runner.head._wt is not None
    with torch.inference_mode():
        eng.update_weights({"lm_head.weight": -m.lm_head.weight})
    assert eng.runner.head._wt is None and eng.runner.head._packed is None
