"""The serving engine: paged latent KV cache, continuous-batching scheduler, model runner, sampler.
Token ids in, token ids out; layered scheduler <- runner <- engine <- server."""

from .engine import Engine, Generation, RequestError, StepOutput, run_to_completion
from .kv_cache import BlockManager, PagedKVCache
from .sampler import SamplingParams
from .scheduler import Scheduler, Sequence

__all__ = ["Engine", "SamplingParams", "StepOutput", "Generation", "RequestError", "BlockManager", "PagedKVCache",
           "Scheduler", "Sequence", "run_to_completion"]
