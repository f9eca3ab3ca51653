"""The speedrun's recipes: model size, data mixture and the steps of each stage, for the full run (the shipped model,
<= 30 minutes on 2 CPU cores) and the CI-sized one (a few minutes, run by the test suite).

A recipe is data, not code: pipeline.py runs any of them the same way. Token mixtures are fractions of each training
stage's tokens; `sft` counts are numbers of conversations per family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..data.example import FAMILIES


# The training stages in the order they run, each a Stage of the Recipe, and the loss each trains with (glm5.train's
# stages): dsa_align is the warm-up's indexer-only KL again, after the SFT, so that the indexers pick the keys the
# SFT'd model attends to. The SFT trains with dense attention (GLM-5's trains sparse): a dense step at 1152 tokens
# costs half a sparse one and the short chats lose nothing, their keys all fit top-k (dev/LOG.md).
TRAIN_STAGES = ("pretrain", "dsa_warmup", "sparse", "sft", "dsa_align")
TRAIN_AS = {"pretrain": "pretrain", "dsa_warmup": "dsa_warmup", "sparse": "sparse", "sft": "pretrain",
            "dsa_align": "dsa_warmup"}


def indexer_only(stage: str) -> bool:
    """Does this stage train the indexers alone (the warm-up's loss: cheaper steps, an indexer-KL curve)?"""
    return TRAIN_AS[stage] == "dsa_warmup"


@dataclass
class Stage:
    steps: int
    seq_len: int
    batch_size: int
    lr: float
    warmup_steps: int = 10
    schedule: str = "cosine"
    # glm5.train.optim's "adamw" or "muon". FULL pre-trains with Muon: 2 of 2 Muon pre-trainings learned to copy from
    # the context by step 675 (in fp32 and in bf16 autocast), 0 of 5 AdamW ones did (dev/LOG.md). The later stages
    # fine-tune with AdamW.
    optimizer: str = "adamw"


@dataclass
class RLStage:
    """`glm5 rl` after dsa_align (its RLConfig fields): GRPO with the honesty reward on the training families."""
    steps: int
    groups_per_step: int = 8
    group_size: int = 8
    lr: float = 2e-5
    max_tokens: int = 256
    mode: str = "async"
    max_staleness: int = 2


@dataclass
class Recipe:
    name: str
    model: dict  # ModelConfig fields (vocab_size comes from the tokenizer)
    vocab_size: int
    pretrain: Stage
    dsa_warmup: Stage
    sparse: Stage
    sft: Stage
    # After the SFT, the indexers alone learn the SFT'd model's attention again (the warm-up's loss): the SFT trains
    # with dense attention and moves it. Without this, two Muon runs retrieved at 1K tokens with sparse attention
    # 59% / 82% against dense 89% / 95%; after 40 steps (~1 minute) 95% / 90% (dev/LOG.md).
    dsa_align: Stage
    # pre-training / sparse-stage token mixture (fractions); rendered chats are trained on every token there
    mixture: dict = field(default_factory=lambda: {
        "natural": 0.10, "encyclopedia": 0.22, "arithmetic": 0.25, "world": 0.13, "unknown": 0.07, "tool": 0.10,
        "chat": 0.03, "retrieval": 0.10})
    pretrain_retrieval_tokens: tuple[int, int] = (200, 450)  # short contexts while rows are short
    long_retrieval_tokens: tuple[int, int] = (512, 4096)  # the sparse stage and SFT (capped by their rows)
    # SFT conversations per family (~1.04M tokens: ~2.3 epochs at FULL's SFT stage). Distinct problems beat repeats:
    # 6000 arithmetic chats instead of 2400 at equal steps took arithmetic from 62% to 82%, 9000 did no better; 480
    # retrieval chats instead of 240 took retrieval at 1K from 71 / 60% to 93 / 92% (sparse / dense; dev/LOG.md).
    sft_chats: dict = field(default_factory=lambda: {
        "arithmetic": 6000, "world": 1600, "unknown": 800, "tool": 600, "chat": 150, "retrieval": 480})
    eval_n: int = 100  # held-out examples per family but retrieval
    # held-out suites of the eval stage: glm5.data families, generators or variants (see glm5.data.VARIANTS)
    eval_suites: tuple = FAMILIES
    # Retrieval examples per context length (split over depths 0.1 / 0.5 / 0.9). At the longest trained length
    # (1024) the eval compares sparse with dense, and "within 5 points" needs a few hundred: the paired 95% interval
    # of the difference is about +-5 points at 300 (+-16 at 33). Past it, a look at extrapolation: 5 per depth (11
    # per depth cost ~100 s more of the eval, mostly prefill at 4K, for cells near 0%).
    eval_retrieval: dict = field(default_factory=lambda: {1024: 300, 2048: 15, 4096: 15})
    eval_max_tokens: int = 256
    index_topk: int = 128  # <= 1/8 of every evaluated retrieval context
    seed: int = 0
    # RL after dsa_align; None: the stage is skipped and the export is dsa_align's model. FULL has none yet: no RL
    # setting has met the RL targets (hallucination rate <= 44% of the SFT model's at <= 2 points of world accuracy;
    # dev/LOG.md).
    rl: RLStage | None = None


FULL = Recipe(
    name="full",
    model=dict(hidden_size=256, intermediate_size=1024, moe_intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
               qk_rope_head_dim=16, v_head_dim=32, index_n_heads=4, index_head_dim=32, first_k_dense_replace=1,
               n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, num_nextn_predict_layers=1,
               max_position_embeddings=8192, rope_theta=10_000.0, dtype="bfloat16"),
    vocab_size=4096,
    pretrain=Stage(steps=900, seq_len=512, batch_size=8, lr=3e-3, warmup_steps=30, optimizer="muon"),
    dsa_warmup=Stage(steps=40, seq_len=1152, batch_size=4, lr=3e-3, warmup_steps=3, schedule="constant"),
    sparse=Stage(steps=50, seq_len=1152, batch_size=8, lr=1e-3, warmup_steps=5),
    sft=Stage(steps=260, seq_len=1152, batch_size=8, lr=1e-3, warmup_steps=10),
    dsa_align=Stage(steps=40, seq_len=1152, batch_size=4, lr=3e-3, warmup_steps=3, schedule="constant"),
)

CI = replace(
    FULL, name="ci",
    model=dict(FULL.model, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
               q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               index_head_dim=16, max_position_embeddings=2048),
    vocab_size=600,
    pretrain=Stage(steps=8, seq_len=128, batch_size=4, lr=3e-3, warmup_steps=2, optimizer="muon"),  # as FULL
    dsa_warmup=Stage(steps=3, seq_len=256, batch_size=2, lr=3e-3, warmup_steps=1, schedule="constant"),
    sparse=Stage(steps=3, seq_len=256, batch_size=2, lr=1e-3, warmup_steps=1),
    sft=Stage(steps=4, seq_len=256, batch_size=2, lr=1e-3, warmup_steps=1),
    dsa_align=Stage(steps=2, seq_len=256, batch_size=2, lr=3e-3, warmup_steps=1, schedule="constant"),
    mixture=dict(FULL.mixture), pretrain_retrieval_tokens=(64, 100), long_retrieval_tokens=(100, 150),
    sft_chats={"arithmetic": 12, "world": 8, "unknown": 4, "tool": 4, "chat": 4, "retrieval": 2},
    eval_n=3, eval_retrieval={128: 3}, eval_max_tokens=24, index_topk=16,
    eval_suites=FULL.eval_suites + ("scope",),  # a suite beyond the default ones, as full_reliable adds
    rl=RLStage(steps=2, groups_per_step=2, group_size=4, lr=1e-4, max_tokens=24),
)

# SFT conversations of the generators that meet users where they are (glm5.data: arithmetic_typed, multiturn,
# nothink, scope, tool_choice), and four times FULL's small talk (its 150 chats were outnumbered by ~1,200 refusals,
# and held-out small talk came back as refusals); ~1.2M tokens at the shipped tokenizer, next to the ~1.2M of FULL's
# SFT chats. FULL does not train on them yet: the `full_reliable` recipe is FULL with them added to its SFT and twice
# the SFT steps, so that each chat is seen about twice as in FULL (at FULL's 260 steps about once: the base suites
# fell; dev/LOG.md).
RELIABLE_SFT_CHATS = {"arithmetic_typed": 2000, "multiturn": 1200, "nothink": 1500, "scope": 1000, "tool_choice": 2000,
                      "chat": 600}
# Its eval adds the held-out suites those chats are for, at 200 examples a suite (each target is judged at n >= 200):
# 3-4-digit operands, unseen wordings, thinking off (the same questions as the thinking-on suites), later turns,
# out-of-scope requests and user-declared tools.
RELIABLE_EVAL_SUITES = ("arithmetic_long", "arithmetic_typed", "arithmetic_nothink", "world_nothink", "chat_nothink",
                        "multiturn", "scope", "tool_choice")
FULL_RELIABLE = replace(FULL, name="full_reliable", sft_chats={**FULL.sft_chats, **RELIABLE_SFT_CHATS},
                        sft=replace(FULL.sft, steps=2 * FULL.sft.steps),
                        eval_n=200, eval_suites=FULL.eval_suites + RELIABLE_EVAL_SUITES)

RECIPES = {"full": FULL, "ci": CI, "full_reliable": FULL_RELIABLE}
