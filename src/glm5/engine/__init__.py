"""The serving engine: paged latent KV cache, continuous-batching scheduler, model runner, sampler.
Token ids in, token ids out (STYLE.md rule 10: scheduler <- runner <- engine <- server)."""

from .engine import Completion, Engine, RequestError, StepOutput
from .kv_cache import BlockManager, PagedKVCache
from .sampler import SamplingParams
from .scheduler import Scheduler, Sequence

__all__ = ["Engine", "SamplingParams", "StepOutput", "Completion", "RequestError", "BlockManager", "PagedKVCache",
           "Scheduler", "Sequence"]
