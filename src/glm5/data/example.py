"""The one record every task generator yields and every consumer (tokenizer training, pre-training text, SFT, eval)
reads. A generator never tokenizes: it returns OpenAI-style chat messages; rendering to ids is glm5.chat's job.

`messages` is the whole conversation including the gold assistant turn(s). The eval prompt is the conversation up to
and including its last user turn (`prompt_messages`): for a one-question chat everything before the first assistant
turn, for a multi-turn chat the gold earlier turns plus the last question. The eval then generates, and for
calculator tool tasks runs the tool and continues. With thinking on (GLM-5's default) every gold assistant turn
carries `reasoning_content`, possibly short; a thinking-off example (`thinking=False`) carries none, and the eval
renders its prompt with enable_thinking=False.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("arithmetic", "world", "unknown", "retrieval", "tool", "chat")  # the default eval and SFT families
# Families that only the newer generators produce (glm5.data.scope, glm5.data.tool_choice); each has a scoring rule
# in glm5.eval.score. Kept out of FAMILIES, whose members are what `glm5 eval` and the speedrun run by default.
MORE_FAMILIES = ("scope", "tool_choice")
ALL_FAMILIES = FAMILIES + MORE_FAMILIES
SPLITS = ("train", "heldout")
ABSTAIN = "I don't know"  # every abstaining answer starts with this phrase; scoring looks for it


@dataclass
class Example:
    family: str  # one of FAMILIES
    messages: list[dict]  # OpenAI chat format, gold assistant turns included
    answer: str  # the gold final answer as text ("6912", "Veloria", ABSTAIN, a code), used by scoring
    tools: list[dict] | None = None  # OpenAI tool schemas offered to the model (tool family), else None
    meta: dict = field(default_factory=dict)  # e.g. {"op": "+", "digits": 4}, {"context_tokens": 2048, "depth": 0.3}
    thinking: bool = True  # rendered with enable_thinking; False: gold assistant turns carry no reasoning

    @property
    def prompt_messages(self) -> list[dict]:
        last_user = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        first = next(i for i, m in enumerate(self.messages) if m["role"] == "assistant" and i > last_user)
        return self.messages[:first]
