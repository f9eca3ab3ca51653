"""Every way glm5 gets a model: a preset, a ModelConfig, a config.json or a checkpoint directory (BF16/FP32 or
GLM-5-FP8) in, a ready GLM5 out (`load_model`); and the same with its tokenizer and recommended sampling, for
serving, chatting, evaluating and benchmarking (`load`, whose default is the model shipped in the package).

Checkpoints stream in shard by shard into a model built on the meta device, so peak memory stays near the model's
own size. A GLM-5-FP8 checkpoint keeps its e4m3 matrices e4m3 in memory (glm5.quant.load swaps the modules and
reads the scales).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .config import PRESETS, ConfigError, ModelConfig, read_hf_config, resolve_config
from .model import GLM5
from .tokenizer import Tokenizer
from .weights import checkpoint_files, has_mtp_weights, load_into

log = logging.getLogger("glm5")

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "model"


def default_dtype(device: str | torch.device) -> torch.dtype:
    # CPUs without AVX-512 BF16 or AMX multiply bf16 hundreds of times slower than fp32: compute in fp32 on a CPU.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_model(cfg: ModelConfig, device="meta", dtype: torch.dtype = torch.float32) -> GLM5:
    with torch.device("meta"):
        model = GLM5(cfg).cast_(dtype)
    if torch.device(device).type != "meta":
        model = model.to_empty(device=device)
    return model


def load_model(path_or_preset: str | Path | ModelConfig, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", seed: int = 0) -> GLM5:
    """A preset name, a ModelConfig or a config.json gives random weights (seeded); a checkpoint directory its
    weights (an FP8 one stays FP8). A checkpoint without its MTP layer (transformers drops it when it saves) loads as
    a model without one, with a warning."""
    dtype = dtype or default_dtype(device)
    if isinstance(path_or_preset, ModelConfig) or (isinstance(path_or_preset, str) and path_or_preset in PRESETS):
        cfg = path_or_preset if isinstance(path_or_preset, ModelConfig) else resolve_config(path_or_preset)
        model = build_model(cfg, device, torch.float32)
        model.init_weights(generator=torch.Generator().manual_seed(seed))
        return model.cast_(dtype).eval()
    p = Path(path_or_preset)
    if p.is_file():
        if p.suffix == ".json":
            return load_model(ModelConfig.from_hf(p), dtype, device, seed)
        raise ConfigError(f"{p}: expected a checkpoint directory, a config.json or a preset ({', '.join(PRESETS)})")
    if not p.is_dir():
        raise ConfigError(f"{p}: neither a preset ({', '.join(PRESETS)}) nor an existing path")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{p}: no config.json, so not a checkpoint directory")
    from .quant.format import read_quant_config
    from .quant.load import fill_fp8

    hf, cfg_file = read_hf_config(p)
    fmt = read_quant_config(hf, cfg_file)  # None for a dense checkpoint
    cfg = ModelConfig.from_hf(cfg_file)
    shards = checkpoint_files(p)
    if cfg.num_nextn_predict_layers and not has_mtp_weights(shards, cfg):
        log.warning("%s has no MTP layer weights (model.layers.%d.*): loading without MTP", p, cfg.num_hidden_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if fmt is None:
        model = build_model(cfg, device, dtype)
        load_into(model, shards)
    else:
        model = fill_fp8(build_model(cfg, "meta", dtype), shards, fmt, device, where=str(p))
    return model.eval()


# -- sampling defaults ---------------------------------------------------------------------------------------------
def _openai_sampling() -> dict:
    """What applies where neither a request nor the model says: SamplingParams' own defaults, which are OpenAI's
    (temperature 1, top_p 1, no top-k)."""
    from .engine.sampler import SamplingParams

    return {f.name: f.default for f in fields(SamplingParams) if f.name in SAMPLING_KEYS}


SAMPLING_KEYS = {"temperature": float, "top_p": float, "top_k": int}


def with_openai_defaults(sampling: dict | None) -> dict:
    """A checkpoint's sampling defaults (`sampling_defaults`) completed with OpenAI's for the keys it leaves out."""
    return {**_openai_sampling(), **(sampling or {})}


def sampling_defaults(model_dir: str | Path) -> dict:
    """The sampling a checkpoint recommends, from its generation_config.json (the file transformers and vLLM read):
    temperature / top_p / top_k where given, and `do_sample: false` as greedy (temperature 0). glm5 applies them
    where a request or a flag leaves a value unset, as vLLM does; without the file, OpenAI's defaults. The shipped
    model is evaluated greedily and ships `do_sample: false`."""
    p = Path(model_dir) / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a JSON object, got {type(cfg).__name__}")
    out = {}
    for key, kind in SAMPLING_KEYS.items():
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (kind is int and v != int(v)):
            raise ConfigError(f"{p}: {key} must be a non-negative {kind.__name__}, got {v!r}")
        out[key] = kind(v)
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


# -- a model with its tokenizer ------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: GLM5
    tokenizer: Tokenizer
    name: str
    untrained: bool
    source: str
    # sampling defaults the checkpoint recommends (generation_config.json); requests and flags override them
    sampling: dict = field(default_factory=dict)

    def banner(self) -> str:
        if not self.untrained:
            return f"glm5: {self.name} from {self.source}"
        line = "=" * 78
        return (f"{line}\n  UNTRAINED MODEL: {self.source} with random weights. Its output is noise.\n"
                f"  It exercises the engine, server and chat format end to end; for real answers pass\n"
                f"  --model DIR (a trained checkpoint with tokenizer.json).\n{line}")


def shipped_model_available() -> bool:
    return (SHIPPED_MODEL_DIR / "config.json").is_file()


def load(spec: str | Path | None = None, *, tokenizer_dir: str | Path | None = None, device="cpu", dtype=None,
         seed: int = 0) -> Loaded:
    """spec: None (the model shipped in the package, or the `small` preset where none ships), a preset (tiny, small:
    random weights, vocabulary resized to the tokenizer), or a checkpoint directory (its tokenizer.json, or
    tokenizer_dir; the shipped model uses the shipped tokenizer)."""
    if spec is None:
        spec = SHIPPED_MODEL_DIR if shipped_model_available() else "small"
    if isinstance(spec, str) and spec in PRESETS:
        if spec == "glm5":
            raise ConfigError("preset 'glm5' is the full 744B-parameter model: random weights of that size cannot be "
                              "run here; pass a checkpoint directory (--model DIR) or a small preset (tiny, small)")
        tok = Tokenizer.from_dir(tokenizer_dir) if tokenizer_dir else Tokenizer.default()
        cfg = PRESETS[spec]().replace(vocab_size=tok.vocab_size)
        model = load_model(cfg, dtype=dtype, device=device, seed=seed)
        return Loaded(model, tok, f"glm5-{spec}-untrained", True, f"the '{spec}' preset")
    p = Path(spec)
    if not p.is_dir():
        raise ConfigError(f"{p}: neither a preset ({', '.join(k for k in PRESETS if k != 'glm5')}) nor a checkpoint "
                          "directory")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{p}: no config.json, so not a checkpoint directory")
    shipped = p.resolve() == SHIPPED_MODEL_DIR
    tdir = Path(tokenizer_dir) if tokenizer_dir else p
    if (tdir / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(tdir)
    elif shipped and tokenizer_dir is None:
        tok = Tokenizer.default()
    else:
        raise ConfigError(f"{tdir}: no tokenizer.json; pass --tokenizer DIR")
    model = load_model(p, dtype=dtype, device=device)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tok.source} has {tok.vocab_size} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}: they do not belong together")
    return Loaded(model, tok, "glm5" if shipped else p.resolve().name, False, str(p), sampling_defaults(p))
