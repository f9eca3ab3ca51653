"""The model shipped inside the package (glm5/assets/model/, produced by `glm5 speedrun`): the default of every
serving command, small enough to ship, and it answers the README's question through `glm5 chat`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from glm5.loader import SHIPPED_MODEL_DIR, load

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_model_is_the_default_and_small():
    files = {p.name: p.stat().st_size for p in SHIPPED_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= 25 * 2**20
    loaded = load(None)
    assert not loaded.untrained and Path(loaded.source).resolve() == SHIPPED_MODEL_DIR.resolve()
    assert loaded.model.config.vocab_size == len(loaded.tokenizer)
    report = json.loads((SHIPPED_MODEL_DIR / "eval.json").read_text())  # the eval table the README quotes
    assert report["suites"]["arithmetic"]["n"] > 0


def test_glm5_chat_answers_the_readme_question():
    """As a user runs it, no sampling flags: the shipped generation_config.json makes it greedy, so the answer is the
    model's, not a lucky sample's (at temperature 1 it slips a carry: 6902)."""
    from glm5.loader import sampling_defaults

    assert sampling_defaults(SHIPPED_MODEL_DIR) == {"temperature": 0.0}
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-m", "glm5.cli", "chat", "--threads", "1"],
                       input="What is 1234 + 5678?\n", capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "> " in r.stdout, (r.stdout, r.stderr)
    answer = r.stdout.split("> ", 1)[1]
    assert "1234 + 5678 = 6912." in answer, r.stdout


def test_answers_in_the_trained_format():
    """Reasoning with column steps closes, then one equation sentence, then the turn ends: the format is learned
    (whether the sum is right is test_glm5_chat_answers_the_readme_question and the eval's arithmetic score)."""
    import re

    from glm5.chat import render_chat
    from glm5.engine import Engine, SamplingParams

    torch.set_num_threads(1)
    loaded = load(None)
    tok = loaded.tokenizer
    qs = ["What is 1234 + 5678?", "What is 905 - 1337?", "What is 4321 * 7?"]
    eng = Engine(loaded.model, eos_token_ids=tok.eos_ids)
    outs = eng.generate([render_chat(tok, [{"role": "user", "content": q}]).ids for q in qs],
                        SamplingParams(temperature=0.0, max_tokens=200))
    for q, out in zip(qs, outs):
        text = tok.decode(out[0].token_ids)
        reasoning, _, content = text.partition("</think>")
        assert out[0].finish_reason == "stop" and "write" in reasoning and "Answer:" in reasoning, (q, text)
        assert re.fullmatch(r"-?\d+ [-+*] \d+ = -?\d+\.<\|(endoftext|user)\|>", content.strip()), (q, text)
