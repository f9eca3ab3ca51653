"""The one record every task generator yields and every consumer (tokenizer training, pre-training text, SFT, eval)
reads. A generator never tokenizes: it returns OpenAI-style chat messages; rendering to ids is glm5.chat's job.

`messages` is the whole conversation including the gold assistant turn(s). The eval prompt is everything before the
first assistant turn (`prompt_messages`); the eval then generates, and for tool tasks runs the tool and continues.
Every gold assistant turn carries `reasoning_content` (GLM-5 thinks by default), possibly short.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("arithmetic", "world", "unknown", "retrieval", "tool", "chat")
SPLITS = ("train", "heldout")
ABSTAIN = "I don't know"  # every abstaining answer starts with this phrase; scoring looks for it


@dataclass
class Example:
    family: str  # one of FAMILIES
    messages: list[dict]  # OpenAI chat format, gold assistant turns included
    answer: str  # the gold final answer as text ("6912", "Veloria", ABSTAIN, a code), used by scoring
    tools: list[dict] | None = None  # OpenAI tool schemas offered to the model (tool family), else None
    meta: dict = field(default_factory=dict)  # e.g. {"op": "+", "digits": 4}, {"context_tokens": 2048, "depth": 0.3}

    @property
    def prompt_messages(self) -> list[dict]:
        first = next(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:first]
