import logging
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def perturb(model, seed=0, std=0.15):
    """Random weights large enough that routing, top-k and norms all matter (the default 0.02 init makes every
    layer near-identity, so a wrong formula can still match to 1e-4)."""
    g = torch.Generator().manual_seed(seed)
    model.init_weights(std=std, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("norm.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for _, b in model.named_buffers():
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


@pytest.fixture(autouse=True)
def _quiet_transformers():
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("glm5").setLevel(logging.ERROR)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny-model steps are
    ~100 small ops and gain nothing from a second thread, CPU runs are bitwise-reproducible, and on a shared 2-core
    machine an oversubscribed OpenMP barrier makes a tiny step ~10x slower (measured: 20 ms vs 220 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def openai_scripted():
    """An OpenAI client on a live server whose engine writes what a test scripts (tests/server_util.ScriptedEngine):
    (client, engine)."""
    import openai

    from .server_util import ScriptedEngine, start

    eng = ScriptedEngine([])
    srv = start(eng)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60), eng
    srv.stop()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
