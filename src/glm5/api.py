"""`load_model`: a preset, a config.json or a checkpoint directory in, a ready GLM5 out."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import PRESETS, ConfigError, ModelConfig, resolve_config
from .model import GLM5
from .weights import checkpoint_files, has_mtp_weights, load_into

log = logging.getLogger("glm5")


def default_dtype(device: str | torch.device) -> torch.dtype:
    # CPUs without AVX-512 BF16 multiply bf16 ~400x slower than fp32 (DEVELOPERS.md): compute in fp32 there.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_model(cfg: ModelConfig, device="meta", dtype: torch.dtype = torch.float32) -> GLM5:
    with torch.device("meta"):
        model = GLM5(cfg).cast_(dtype)
    if torch.device(device).type != "meta":
        model = model.to_empty(device=device)
    return model


def load_model(path_or_preset: str | Path | ModelConfig, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", seed: int = 0) -> GLM5:
    """A preset name or ModelConfig gives random weights (seeded); a checkpoint directory is streamed in shard by
    shard into a model built on the meta device, so peak memory stays near the model's own size."""
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
    from .quant.load import is_quantized_checkpoint, load_fp8_model

    if is_quantized_checkpoint(p):  # GLM-5-FP8 layout: weights stay FP8 in memory
        return load_fp8_model(p, dtype, device)
    cfg = resolve_config(p)
    shards = checkpoint_files(p)
    if cfg.num_nextn_predict_layers and not has_mtp_weights(shards, cfg):
        # transformers drops the MTP layer when it saves; such a checkpoint loads as a model without one.
        log.warning("%s has no MTP layer weights (model.layers.%d.*): loading without MTP", p, cfg.num_hidden_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = build_model(cfg, device, dtype)
    load_into(model, shards)
    return model.eval()
