"""ModelConfig: one flat, typed description of a GLM-5 model.

`from_hf` / `to_hf` are the only places that know Hugging Face field names (config.json of
`model_type: glm_moe_dsa`). Everything else in glm5 reads this dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

HF_MODEL_TYPE = "glm_moe_dsa"


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128  # dense MLP of the first layers
    moe_intermediate_size: int = 32  # one routed (and shared) expert
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 4  # MLA: equal to num_attention_heads; kept for HF round trips
    # MLA
    q_lora_rank: int = 48
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    attention_bias: bool = False
    # DSA lightning indexer
    index_n_heads: int = 16
    index_head_dim: int = 16
    index_topk: int = 16
    indexer_types: list[str] = field(default_factory=list)  # per layer "full" | "shared"; derived if empty
    index_topk_pattern: str | None = None  # "FSSF..." overrides freq/offset when indexer_types is empty
    index_topk_freq: int = 1
    index_skip_topk_offset: int = 2
    # MLP / MoE
    first_k_dense_replace: int = 1
    mlp_layer_types: list[str] = field(default_factory=list)  # per layer "dense" | "sparse"; derived if empty
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    hidden_act: str = "silu"
    # multi-token prediction
    num_nextn_predict_layers: int = 1
    # misc
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    dtype: str = "bfloat16"  # storage dtype of the released weights

    def __post_init__(self):
        _check_types(self)
        n = self.num_hidden_layers
        if not self.indexer_types:
            if self.index_topk_pattern is not None:
                if set(self.index_topk_pattern) - set("FS"):
                    raise ConfigError(f"index_topk_pattern must use only 'F' and 'S', got {self.index_topk_pattern!r}")
                self.indexer_types = [{"F": "full", "S": "shared"}[c] for c in self.index_topk_pattern]
            else:
                # Same schedule as the reference config: layer i is full when max(i - offset + 1, 0) % freq == 0.
                freq, off = max(self.index_topk_freq, 1), self.index_skip_topk_offset
                self.indexer_types = ["full" if max(i - off + 1, 0) % freq == 0 else "shared" for i in range(n)]
        if not self.mlp_layer_types:
            k = min(self.first_k_dense_replace, n)
            self.mlp_layer_types = ["dense"] * k + ["sparse"] * (n - k)
        self.validate()

    def validate(self):
        n = self.num_hidden_layers
        checks = [
            (len(self.indexer_types) == n, f"indexer_types has {len(self.indexer_types)} entries for {n} layers"),
            (set(self.indexer_types) <= {"full", "shared"}, f"indexer_types must be 'full'/'shared': {self.indexer_types}"),
            (not self.indexer_types or self.indexer_types[0] == "full", "layer 0 must have a 'full' indexer (a shared layer reuses the previous full one)"),
            (len(self.mlp_layer_types) == n, f"mlp_layer_types has {len(self.mlp_layer_types)} entries for {n} layers"),
            (set(self.mlp_layer_types) <= {"dense", "sparse"}, f"mlp_layer_types must be 'dense'/'sparse': {self.mlp_layer_types}"),
            (self.num_key_value_heads == self.num_attention_heads, "MLA needs num_key_value_heads == num_attention_heads"),
            (self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even"),
            (self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim must be >= qk_rope_head_dim (RoPE covers its first dims)"),
            (self.n_routed_experts % self.n_group == 0, "n_routed_experts must be divisible by n_group"),
            (self.topk_group <= self.n_group, "topk_group must be <= n_group"),
            (self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok must be <= n_routed_experts"),
            (self.hidden_act == "silu", f"only hidden_act='silu' is supported, got {self.hidden_act!r}"),
            (self.index_topk >= 1, "index_topk must be >= 1"),
        ]
        if self.n_group > 1:
            checks.append((self.n_routed_experts // self.n_group >= 2, "each expert group needs >= 2 experts (group score = top-2 sum)"))
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    # -- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    def replace(self, **kw) -> "ModelConfig":
        """A copy with some fields changed; per-layer lists derived from changed fields are derived again."""
        d = dataclasses.asdict(self)
        if kw.keys() & {"num_hidden_layers", "first_k_dense_replace"} and "mlp_layer_types" not in kw:
            d["mlp_layer_types"] = []
        if kw.keys() & {"num_hidden_layers", "index_topk_pattern", "index_topk_freq", "index_skip_topk_offset"} \
                and "indexer_types" not in kw:
            d["indexer_types"] = []
        d.update(kw)
        return ModelConfig(**d)

    # -- Hugging Face config.json ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, src: str | Path | dict) -> "ModelConfig":
        where = "config"
        if not isinstance(src, dict):
            src, where = read_hf_config(src)
        d = dict(src)
        mt = d.get("model_type")
        if mt != HF_MODEL_TYPE:
            raise ConfigError(f"{where}: model_type is {mt!r}, expected {HF_MODEL_TYPE!r} (GLM-5 / GlmMoeDsaForCausalLM)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (GLM-5 uses plain RoPE)")
        theta = rope.get("rope_theta", d.get("rope_theta", 1e6))
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["rope_theta"] = float(theta) if isinstance(theta, int) else theta
        if "dtype" not in d and "torch_dtype" in d:
            kw["dtype"] = d["torch_dtype"]
        if isinstance(kw.get("eos_token_id"), int):
            kw["eos_token_id"] = [kw["eos_token_id"]]
        for k in ("indexer_types", "mlp_layer_types", "eos_token_id"):
            if kw.get(k) is None:
                kw.pop(k, None)
        if isinstance(kw.get("index_topk_pattern"), list):  # the reference also accepts a list of names
            kw["indexer_types"] = kw.pop("index_topk_pattern")
        for k in ("routed_scaling_factor", "rms_norm_eps", "initializer_range"):
            if isinstance(kw.get(k), int) and not isinstance(kw.get(k), bool):
                kw[k] = float(kw[k])
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        d = {
            "architectures": ["GlmMoeDsaForCausalLM"],
            "model_type": HF_MODEL_TYPE,
        }
        skip = {"rope_theta"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                d[f.name] = getattr(self, f.name)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d["head_dim"] = self.qk_rope_head_dim
        d["qk_head_dim"] = self.qk_head_dim
        d["eos_token_id"] = list(self.eos_token_id) or None
        return d


def read_hf_config(path: str | Path) -> tuple[dict, str]:
    """(the parsed config.json, its path for messages) from a checkpoint directory or a config.json path."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        return json.loads(p.read_text()), str(p)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None


def _check_types(cfg: ModelConfig):
    """Reject a field of the wrong type with a message naming it (a config.json typo should not load)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if not _is_instance(v, hints[f.name]):
            raise ConfigError(f"field {f.name!r} should be {_type_name(hints[f.name])}, got {type(v).__name__} {v!r}")


def _is_instance(v, t) -> bool:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(v, a) for a in typing.get_args(t))
    if t is type(None):
        return v is None
    if origin is list:
        (a,) = typing.get_args(t)
        return isinstance(v, list) and all(_is_instance(x, a) for x in v)
    if t is float:
        return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool))
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, t)


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


# -- presets ---------------------------------------------------------------------------------------------------
def tiny() -> ModelConfig:
    return ModelConfig()


def small() -> ModelConfig:
    """~100M parameters: big enough for honest CPU benchmarks, small enough to train here."""
    return ModelConfig(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        index_n_heads=8, index_head_dim=64, index_topk=512,
        first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1,
        max_position_embeddings=16384, dtype="float32",
    )


def glm5() -> ModelConfig:
    """The released GLM-5 (zai-org/GLM-5 config.json)."""
    return ModelConfig(
        vocab_size=154880, hidden_size=6144, intermediate_size=12288, moe_intermediate_size=2048,
        num_hidden_layers=78, num_attention_heads=64, num_key_value_heads=64,
        q_lora_rank=2048, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
        index_n_heads=32, index_head_dim=128, index_topk=2048,
        first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
        n_group=1, topk_group=1, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        max_position_embeddings=202752, rope_theta=1e6, rms_norm_eps=1e-5,
        eos_token_id=[154820, 154827, 154829], pad_token_id=154820, dtype="bfloat16",
    )


PRESETS = {"tiny": tiny, "small": small, "glm5": glm5}


def resolve_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name, a config.json, or a checkpoint directory."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    p = Path(name_or_path)
    if not p.exists():
        raise ConfigError(f"{name_or_path} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return ModelConfig.from_hf(p)
