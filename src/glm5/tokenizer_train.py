"""Train a byte-level BPE tokenizer with GLM-5's special tokens, and rebuild the small one shipped with the package.

`train_bpe_tokenizer` writes tokenizer.json + tokenizer_config.json (with the GLM-5 chat template) that both
`glm5.tokenizer.Tokenizer.from_dir` and `transformers.AutoTokenizer.from_pretrained` load. Training with the
`tokenizers` BpeTrainer is deterministic for the same texts (ties between pair counts are broken by the pair itself).

The shipped default (`build_default_tokenizer`) is trained on text every machine has without a download: the
documentation topics that ship with Python (`pydoc_data.topics`), docstrings of a fixed list of stdlib modules (read
with `ast`, never imported), and seeded synthetic chats in the GLM-5 format. The first two come from the running
Python, so a rebuild is byte-identical under the same Python minor version and `tokenizers` version
(glm5/assets/tokenizer/glm5_build.json records both).
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from .tokenizer import DEFAULT_TOKENIZER_DIR, FORMAT_TOKENS

DEFAULT_VOCAB_SIZE = 4096
# GLM-4's split pattern (cl100k-like) with one change: every digit is its own pre-token, so numbers tokenize
# digit by digit — small models learn column arithmetic from aligned digits (the speedrun's arithmetic task); the
# rejected alternative, \p{N}{1,3}, makes "1234" two tokens whose boundary depends on the number's length.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
STDLIB_MODULES = (
    "abc", "argparse", "asyncio/__init__", "base64", "bisect", "calendar", "collections/__init__", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "getopt",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html/__init__", "http/client", "inspect", "ipaddress",
    "json/__init__", "logging/__init__", "mailbox", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re/__init__", "sched", "secrets", "shlex", "shutil", "smtplib", "socket",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "turtle", "typing", "unittest/case", "urllib/parse", "uuid", "warnings", "wave", "weakref", "zipfile",
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, min_frequency: int = 2,
                        chat_template: str | None = None, model_max_length: int = 202752) -> Path:
    """Byte-level BPE over `texts`; all GLM-5 format tokens atomic specials (ids 0..16); written to out_dir as
    tokenizer.json + tokenizer_config.json. Returns out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from .chat import builtin_template

    floor = 256 + len(FORMAT_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab_size {vocab_size} < {floor} (256 byte tokens + {len(FORMAT_TOKENS)} specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(FORMAT_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # The trainer does not cut special spellings out of its input (it would learn merges like "<|" + "assistant"):
    # train on the text between them.
    special = re.compile("|".join(re.escape(t) for t in FORMAT_TOKENS))
    tok.train_from_iterator((piece for text in texts for piece in special.split(text) if piece), trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,  # GLM starts every prompt with [gMASK]<sop> from the template, never a BOS
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "extra_special_tokens": [t for t in FORMAT_TOKENS if t != "<|endoftext|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template if chat_template is not None else builtin_template(),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------ default corpus
def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for k in sorted(topics):
        yield topics[k]


def stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if doc := ast.get_docstring(node):
                    yield doc


_NAMES = ("Alice", "Bob", "Chen", "Dana", "Emeka", "Fatima", "Giulia", "Hiro", "Ingrid", "José", "Kofi", "Léa")
_GREETINGS = ("Hello!", "Hi there.", "Good morning!", "Hey, how are you?", "What can you do?", "Who are you?",
              "Thanks, that helps.", "Can you help me with a question?", "Bonjour !", "Goodbye!")
_REPLIES = ("Hello! How can I help you today?", "I am GLM-5, a small language model. I can answer questions, do "
            "arithmetic and call tools.", "You're welcome!", "Sure, what would you like to know?",
            "I don't know the answer to that.", "I'm not sure; I have no information about that.")
CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression exactly.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def synthetic_chats(n: int, seed: int = 0) -> Iterator[list[dict]]:
    """Seeded chats covering the format: greetings, arithmetic with reasoning, calculator tool calls, abstention."""
    rng = random.Random(seed)
    for _ in range(n):
        kind = rng.randrange(4)
        a, b = rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10 ** rng.randint(1, 4))
        if kind == 0:
            yield [{"role": "user", "content": rng.choice(_GREETINGS)},
                   {"role": "assistant", "content": rng.choice(_REPLIES)}]
        elif kind == 1:
            op, val = rng.choice((("+", a + b), ("-", a - b), ("*", a * b)))
            yield [{"role": "user", "content": f"What is {a} {op} {b}?"},
                   {"role": "assistant", "reasoning_content": f"I need {a} {op} {b}. Working digit by digit gives "
                    f"{val}.", "content": f"{a} {op} {b} = {val}"}]
        elif kind == 2:
            x, y = rng.randrange(10 ** 5, 10 ** 7), rng.randrange(10 ** 4, 10 ** 6)
            yield [{"role": "user", "content": f"Compute {x} * {y}."},
                   {"role": "assistant", "reasoning_content": "This is large; I will use the calculator.",
                    "content": "",
                    "tool_calls": [{"function": {"name": "calculator", "arguments": {"expression": f"{x} * {y}"}}}]},
                   {"role": "tool", "content": json.dumps({"result": x * y})},
                   {"role": "assistant", "content": f"{x} * {y} = {x * y}"}]
        else:
            who = rng.choice(_NAMES)
            yield [{"role": "system", "content": "You are a helpful, honest assistant."},
                   {"role": "user", "content": f"In which year was the city founded by {who} built?"},
                   {"role": "assistant", "content": f"I don't know of any city founded by {who}."}]


def chat_pieces(n: int = 3000, seed: int = 0) -> Iterator[str]:
    """Text between the special tokens of rendered synthetic chats (the specials themselves are not BPE input)."""
    from .chat import Special, render_parts

    for chat in synthetic_chats(n, seed):
        tools = [CALCULATOR_TOOL] if any(m.get("tool_calls") for m in chat) else None
        for p, _ in render_parts(chat, tools, add_generation_prompt=False):
            if not isinstance(p, Special):
                yield p


def default_corpus(seed: int = 0) -> Iterator[str]:
    yield from pydoc_topics()
    yield from stdlib_docstrings()
    yield from chat_pieces(seed=seed)


def build_default_tokenizer(out_dir: str | Path = DEFAULT_TOKENIZER_DIR, vocab_size: int = DEFAULT_VOCAB_SIZE,
                            seed: int = 0) -> Path:
    """Rebuild the shipped tokenizer (deterministic for a given Python minor version and tokenizers version)."""
    import tokenizers

    out = train_bpe_tokenizer(default_corpus(seed), vocab_size, out_dir)
    digest = {f: hashlib.sha256((out / f).read_bytes()).hexdigest()
              for f in ("tokenizer.json", "tokenizer_config.json")}
    build = {"vocab_size": vocab_size, "seed": seed, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
             "tokenizers": tokenizers.__version__, "sha256": digest,
             "rebuild": "python -c 'from glm5.tokenizer_train import build_default_tokenizer as b; b()'"}
    (out / "glm5_build.json").write_text(json.dumps(build, indent=2) + "\n", encoding="utf-8")
    return out
