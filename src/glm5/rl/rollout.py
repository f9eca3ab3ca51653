"""Rollout: groups of G samples per prompt through the engine, token in, token out.

The trainer sees exactly the ids the engine sampled: nothing is decoded and re-encoded on the way. Text is decoded
only to read what the model did (its tool calls, its final answer). A tool episode goes on by appending ids: the
sampled turn ends on <|observation|> (a stop token), the tool's answer is rendered by the chat format and appended
as ids with loss mask 0, then the engine continues from there. Every sampled token carries the behaviour log-prob
(the raw model's, which at temperature 1 and top_p 1 is the distribution it was drawn from) and the policy version
that sampled it; prompt and tool tokens carry mask 0.

    ro = Rollout(engine, tok, max_tokens=256)
    ro.submit(group_id=0, example=ex, group_size=8, seed=1234)
    while ro.busy:
        for group in ro.step(): ...   # finished groups: list of G Samples, each with reward and outcome
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

from ..chat import render_chat
from ..chat_parse import ParsedOutput, parse_output, token_pieces
from ..data.example import Example
from ..engine import SamplingParams
from ..eval.score import run_tool_call


@dataclass
class Sample:
    """One episode of one prompt: every id fed to or sampled by the model, in order."""

    group: int
    index: int  # 0 .. G-1 within the group
    example: Example
    ids: list[int]  # prompt, then per turn: sampled ids, tool observation ids, ...
    prompt_len: int
    mask: list[int]  # 1 where the policy sampled ids[t] (trained), 0 for prompt and tool ids
    logprobs: list[float]  # behaviour log-prob of ids[t] where mask is 1, else 0.0
    versions: list[int]  # policy version that sampled ids[t] where mask is 1, else -1
    finish_reason: str | None = None  # of the last turn: "stop" | "length" | "abort"
    turns: int = 0
    output: ParsedOutput | None = None  # the last turn, parsed
    first_output: ParsedOutput | None = None  # the first turn, parsed (a tool episode's call)
    tool_results: list[tuple[str, bool]] = field(default_factory=list)  # (tool message, valid call) per call
    reward: float | None = None
    outcome: str | None = None

    @property
    def uid(self) -> str:
        return f"{self.group}-{self.index}"

    @property
    def num_sampled(self) -> int:
        return sum(self.mask)

    @property
    def oldest_version(self) -> int:
        """The policy version of its oldest sampled token (a sample with none is as new as can be)."""
        return min((v for v in self.versions if v >= 0), default=1 << 62)


@dataclass
class _Episode:
    sample: Sample
    conv: list[dict]  # the conversation so far as messages: only to render a tool observation's ids
    thinking: bool
    turn_start: int = 0  # len(sample.ids) when the current turn's request was added


def turn_seed(group_seed: int, index: int, turn: int) -> int:
    """The sampling seed of a later turn of one episode: distinct from every group's and every other turn's."""
    digest = hashlib.blake2b(f"{group_seed}/{index}/{turn}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class Rollout:
    """Drives the engine over groups of episodes; scores each finished group with `score(sample) -> (reward,
    outcome)`. Not thread-safe (it owns the engine while it runs)."""

    def __init__(self, engine, tokenizer, *, max_tokens: int = 256, max_tool_rounds: int = 2, temperature: float = 1.0,
                 calculator: Callable[[str], str] | None = None, score: Callable | None = None):
        self.engine, self.tok = engine, tokenizer
        self.max_tokens, self.max_tool_rounds, self.temperature = max_tokens, max_tool_rounds, temperature
        if calculator is None:
            from ..data import calculator
        self.calculator, self.score = calculator, score
        self._episodes: dict[str, list[_Episode]] = {}  # request id -> the episodes it samples (n of them)
        self._running: dict[str, int] = {}  # request id -> its sequences not finished
        self._groups: dict[int, list[_Episode]] = {}
        self._open: dict[int, int] = {}  # group -> episodes not finished
        self._seeds: dict[int, int] = {}
        self._done: list[list[Sample]] = []  # groups that finished outside an engine step
        self.tokens_sampled = 0

    @property
    def busy(self) -> bool:
        return bool(self._groups) or bool(self._done)

    def submit(self, group_id: int, example: Example, group_size: int, seed: int) -> None:
        """Start G episodes of one prompt. The prompt's ids are rendered once and shared (prefix cache)."""
        if group_id in self._groups:
            raise ValueError(f"group {group_id} is already running")
        r = render_chat(self.tok, example.prompt_messages, example.tools, enable_thinking=example.thinking)
        eps = [_Episode(Sample(group_id, i, example, list(r.ids), len(r.ids), [0] * len(r.ids), [0.0] * len(r.ids),
                               [-1] * len(r.ids)), list(example.prompt_messages), r.thinking, len(r.ids))
               for i in range(group_size)]
        self._groups[group_id], self._open[group_id], self._seeds[group_id] = eps, group_size, seed
        self._add(eps, seed)

    def _add(self, eps: list[_Episode], seed: int) -> None:
        ids = eps[0].sample.ids
        room = self.engine.max_model_len - len(ids)
        if room < 1:  # no room to sample: the episodes end here, and the next step() returns their group
            for ep in eps:
                group = self._finish(ep, "length")
                if group is not None:
                    self._done.append(group)
            return
        params = SamplingParams(n=len(eps), temperature=self.temperature, top_p=1.0,
                                max_tokens=min(self.max_tokens, room), seed=seed)
        rid = self.engine.add_request(ids, params)
        self._episodes[rid], self._running[rid] = eps, len(eps)
        for ep in eps:
            ep.turn_start = len(ep.sample.ids)

    def step(self) -> list[list[Sample]]:
        """One engine step; returns the groups that finished in it (every episode done and scored)."""
        done, self._done = self._done, []
        if not self.engine.has_unfinished():
            return done
        for o in self.engine.step():
            ep = self._episodes[o.request_id][o.index]
            s = ep.sample
            s.ids += o.new_token_ids
            s.mask += [1] * len(o.new_token_ids)
            s.logprobs += o.logprobs
            s.versions += o.policy_versions
            self.tokens_sampled += len(o.new_token_ids)
            if o.finished:
                self._running[o.request_id] -= 1
                if not self._running[o.request_id]:
                    del self._running[o.request_id], self._episodes[o.request_id]
                group = self._turn_done(ep, o.finish_reason)
                if group is not None:
                    done.append(group)
        return done

    def _turn_done(self, ep: _Episode, finish: str) -> list[Sample] | None:
        s = ep.sample
        turn = s.ids[ep.turn_start:]
        s.turns += 1
        eos = set(self.engine.eos_token_ids)
        text_ids = turn[:-1] if finish == "stop" and turn and turn[-1] in eos else turn
        tools = s.example.tools
        parsed = parse_output(token_pieces(self.tok, text_ids), thinking=ep.thinking, tools=tools, parse_tools=bool(tools),
                              make_id=lambda k: f"call_{k}")
        if s.turns == 1:
            s.first_output = parsed
        s.output = parsed
        if tools and parsed.tool_calls and finish == "stop" and s.turns <= self.max_tool_rounds:
            if self._continue_with_tools(ep, parsed):
                return None
        return self._finish(ep, finish)

    def _continue_with_tools(self, ep: _Episode, parsed: ParsedOutput) -> bool:
        """Append the tool results as ids (mask 0) and add the next turn; False if the context has no room."""
        s = ep.sample
        msg = parsed.message()
        msg["content"] = msg["content"] or ""
        results = [run_tool_call(call, s.example.tools, self.calculator) for call in parsed.tool_calls]
        s.tool_results += results
        tool_msgs = [{"role": "tool", "tool_call_id": c["id"], "content": text}
                     for c, (text, _) in zip(parsed.tool_calls, results)]
        # The observation's ids: the rendering of the conversation with the tool answers, past the rendering of the
        # conversation up to the assistant's call. Only this suffix is used; the sampled ids stay as sampled.
        before = render_chat(self.tok, ep.conv + [msg], s.example.tools, add_generation_prompt=False).ids
        after = render_chat(self.tok, ep.conv + [msg] + tool_msgs, s.example.tools,
                            enable_thinking=s.example.thinking)
        if after.ids[: len(before)] != before:
            raise RuntimeError("the chat format renders a tool answer by changing the turns before it; "
                               "token-in-token-out rollout needs an appending format")
        obs = after.ids[len(before):]
        if obs and s.ids and obs[0] == s.ids[-1]:
            obs = obs[1:]  # the turn ended on the sampled <|observation|>; the rendering opens with it too
        ep.conv += [msg] + tool_msgs
        ep.thinking = after.thinking
        s.ids += obs
        s.mask += [0] * len(obs)
        s.logprobs += [0.0] * len(obs)
        s.versions += [-1] * len(obs)
        if len(s.ids) >= self.engine.max_model_len:
            return False
        self._add([ep], seed=turn_seed(self._seeds[s.group], s.index, s.turns))
        return True

    def _finish(self, ep: _Episode, finish: str) -> list[Sample] | None:
        s = ep.sample
        s.finish_reason = finish
        g = s.group
        self._open[g] -= 1
        if self._open[g]:
            return None
        group = [e.sample for e in self._groups.pop(g)]
        del self._open[g], self._seeds[g]
        if self.score is not None:
            for x in group:
                x.reward, x.outcome = self.score(x)
        return group

    def abort_all(self) -> list[int]:
        """Abort every running episode; returns the ids of the groups that were running (to be re-queued)."""
        for rid in list(self._episodes):
            self.engine.abort(rid)
        while self.engine.has_unfinished():
            self.engine.step()
        groups = sorted(self._groups)
        self._episodes.clear()
        self._running.clear()
        self._groups.clear()
        self._open.clear()
        self._seeds.clear()
        self._done.clear()
        return groups
