"""The rollout renders each prompt as its example asks (thinking on or off)."""

import pytest

import glm5
from glm5.chat import render_chat
from glm5.config import tiny
from glm5.data import examples
from glm5.engine import Engine
from glm5.rl.rollout import Rollout
from glm5.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["world", "world_nothink"])
def test_the_prompt_is_rendered_with_the_examples_thinking_setting(family):
    tok = Tokenizer.default()
    model = glm5.load_model(tiny().replace(vocab_size=tok.vocab_size))
    (ex,) = examples(family, "train", 1)
    ro = Rollout(Engine(model, eos_token_ids=tok.eos_ids), tok, max_tokens=3)
    ro.submit(0, ex, 2, seed=1)
    groups = []
    while ro.busy:
        groups += ro.step()
    (group,) = groups
    want = render_chat(tok, ex.prompt_messages, ex.tools, enable_thinking=ex.thinking).ids
    assert ex.thinking == (family == "world")
    assert all(s.ids[: s.prompt_len] == want for s in group)
