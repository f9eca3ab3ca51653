"""`quantize`: a checkpoint directory in, its GLM-5-FP8 (or BF16) form out, one shard at a time.

Streaming: each input shard is read tensor by tensor and written as one output shard of the same name, so the
peak is one output shard plus one tensor (and its fp32 working copy), never the model twice. A weight whose
scale sits in another shard fetches just that scale. Files are written under temporary names and renamed;
config.json is written last, so an interrupted run leaves a directory no loader takes for a model.

--to fp8:  every matrix GLM-5-FP8 quantizes (format.quantized_by_release) -> e4m3 + float32 weight_scale_inv per
           128x128 block; the router weight and bias and the indexer's weights_proj keep their dtype (fp32, as
           released); every other tensor becomes BF16, as in the release. config.json gets quantization_config.
--to bf16: e4m3 weights are dequantized (w * scale_inv per block, in fp32, then rounded to BF16); other tensors
           become BF16 except the fp32-kept ones; quantization_config is removed. Works on any checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig, read_hf_config
from ..model.model import FP32_PARAM_SUFFIXES
from ..weights import INDEX_FILE, PICKLE_SUFFIXES, CheckpointError, atomic_write, checkpoint_files, to_hf_names
from .fp8 import BLOCK, FP8, FP8Experts, FP8Linear, dequantize, quantize
from .format import quantization_config, quantized_by_release, read_quant_config

log = logging.getLogger("glm5.quant")

TARGETS = ("fp8", "bf16")
SCALE = "_scale_inv"


def quantize_checkpoint(in_dir: str | Path, out_dir: str | Path, to: str = "fp8", block=BLOCK) -> Path:
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
    src, out = Path(in_dir), Path(out_dir)
    hf, cfg_file = read_hf_config(src)
    cfg = ModelConfig.from_hf(hf)  # checks it is a GLM-5 config before any work
    in_fmt = read_quant_config(hf, cfg_file)
    if to == "fp8" and in_fmt is not None:
        raise CheckpointError(f"{src}: already FP8 (config.json has quantization_config); nothing to do")
    in_block = in_fmt.block if in_fmt is not None else block
    shards = checkpoint_files(src)
    if out.exists() and (out.resolve() == src.resolve() or any(out.iterdir())):
        raise CheckpointError(f"{out}: output directory must be new or empty (and not the input)")
    out.mkdir(parents=True, exist_ok=True)
    where = {k: shard for shard, keys in shards.items() for k in keys}

    weight_map, total = {}, 0
    for shard, keys in shards.items():
        name = Path(shard).name
        tensors = {}
        with safe_open(shard, framework="pt", device="cpu") as f:
            for key in keys:
                if key.endswith(SCALE):
                    if key[: -len(SCALE)] not in where:
                        raise CheckpointError(f"{shard}: {key} scales no tensor")
                    continue  # written (or consumed) with its weight
                t = f.get_tensor(key)
                for k, v in _convert(key, t, to, block, in_block, lambda k: _tensor(f, shard, where, k)).items():
                    tensors[k] = v
                    weight_map[k] = name
                    total += v.numel() * v.element_size()
        atomic_write(out / name, lambda p, d=tensors: save_file(d, str(p), metadata={"format": "pt"}))
        del tensors
    if len(shards) > 1 or (src / INDEX_FILE).exists():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write(out / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2)))
    _copy_extras(src, out, set(Path(s).name for s in shards))
    hf = dict(hf)
    hf.pop("quantization_config", None)
    if to == "fp8":
        hf["quantization_config"] = quantization_config(cfg, block)
    hf["dtype"] = "bfloat16"
    hf.pop("torch_dtype", None)
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2)))
    return out


@torch.no_grad()
def save_fp8_checkpoint(model, out_dir: str | Path, dense_dtype=torch.bfloat16, max_shard_bytes: int = 4 << 30) -> Path:
    """Write an in-memory FP8 model (glm5.load_model of an FP8 checkpoint, or quantize_model) as an FP8 checkpoint: e4m3 weights and their
    scales as they are, kv_b_proj re-quantized (its values are already on the e4m3 grid), other tensors in
    dense_dtype except the fp32-kept ones. (glm5.save_checkpoint would cast e4m3 buffers as if unscaled.)"""
    cfg = model.config
    fp8_mods = [n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))]
    if not fp8_mods:
        raise ValueError("save_fp8_checkpoint: the model has no FP8 modules (use quantize_model first)")
    block = model.get_submodule(fp8_mods[0]).block

    def items():
        for name, t in model.state_dict().items():
            base = name.removesuffix(SCALE)
            for hf, e in to_hf_names(base, cfg):
                hf = hf + SCALE if name.endswith(SCALE) else hf
                x = t[e] if e is not None else t
                if x.dtype == FP8 or name.endswith(SCALE):
                    yield hf, x.contiguous()
                elif quantized_by_release(hf):  # kv_b_proj, held dense
                    q, s = quantize(x, block)
                    yield hf, q
                    yield hf + SCALE, s
                elif x.is_floating_point() and not name.endswith(FP32_PARAM_SUFFIXES):
                    yield hf, x.to(dense_dtype).contiguous()
                else:
                    yield hf, x.contiguous()

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output directory must be new or empty")
    out.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], {}, 0
    for hf, t in items():  # one shard in memory at a time
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(_write_shard(out, len(shards), cur))
            cur, size = {}, 0
        cur[hf] = t
        size += nbytes
    shards.append(_write_shard(out, len(shards), cur))
    if len(shards) == 1:
        os.replace(out / shards[0][0], out / "model.safetensors")
    else:
        n = len(shards)
        wmap, total = {}, 0
        for i, (fname, keys, nbytes) in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(out / fname, out / final)
            wmap.update({k: final for k in keys})
            total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
        atomic_write(out / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2)))
    hf_cfg = cfg.to_hf()
    hf_cfg["dtype"] = str(dense_dtype).removeprefix("torch.")
    hf_cfg["quantization_config"] = quantization_config(cfg, block)
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf_cfg, indent=2)))
    return out


def _write_shard(out: Path, i: int, tensors: dict) -> tuple[str, list[str], int]:
    fname = f"shard-{i:05d}.safetensors"
    atomic_write(out / fname, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return fname, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def _convert(key: str, t: torch.Tensor, to: str, block, in_block, fetch) -> dict[str, torch.Tensor]:
    """One input tensor -> its output tensor(s)."""
    if t.dtype == FP8:
        s = fetch(key + SCALE)
        if s is None:
            raise CheckpointError(f"{key}: stored as float8_e4m3fn but {key}{SCALE} is missing; refusing to read "
                                  "FP8 values without their scales")
        if to == "fp8":  # unreachable: an FP8 input is refused above
            raise CheckpointError(f"{key}: already e4m3")
        return {key: dequantize(t, s.float(), in_block, torch.bfloat16)}
    if t.dtype.is_floating_point and key.endswith(FP32_PARAM_SUFFIXES):
        return {key: t}  # router weight / bias, indexer head weights: fp32 in every release
    if to == "fp8" and quantized_by_release(key) and t.dim() == 2:
        q, s = quantize(t, block)
        return {key: q, key + SCALE: s}
    return {key: t.to(torch.bfloat16) if t.dtype.is_floating_point else t}


def _tensor(f, shard: str, where: dict[str, str], key: str) -> torch.Tensor | None:
    s = where.get(key)
    if s is None:
        return None
    if s == shard:
        return f.get_tensor(key)
    with safe_open(s, framework="pt", device="cpu") as g:
        return g.get_tensor(key)


def _copy_extras(src: Path, out: Path, shard_names: set[str]) -> None:
    """Tokenizer, generation config, chat template...: every other regular file, never pickles."""
    for p in src.iterdir():
        if (p.is_file() and p.name not in shard_names and p.name not in ("config.json", INDEX_FILE)
                and p.suffix != ".safetensors" and p.suffix not in PICKLE_SUFFIXES and not p.name.startswith(".")):
            shutil.copy2(p, out / p.name)
