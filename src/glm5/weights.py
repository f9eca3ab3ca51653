"""Hugging Face safetensors checkpoints: the name table, streaming load into a meta-built model, sharded save.

Only safetensors are read. Pickle-based weight files (.bin, .pt, .pth, .ckpt) are refused, never opened.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig

log = logging.getLogger("glm5.weights")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_EXPERT_STACKS = ("gate_proj", "up_proj", "down_proj")
# Some NextN checkpoints (DeepSeek-V3 style) repeat the main embedding and head inside the MTP layer. They are
# the same tensors as model.embed_tokens / lm_head, which the MTP layer uses; we accept and skip the copies.
_MTP_TIED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


class CheckpointError(ValueError):
    pass


# -- the name table ----------------------------------------------------------------------------------------------
# Ours equals HF's except: the MTP layers live in `mtp.{j}` (HF: `model.layers.{L+j}`), and routed experts are
# stacked `experts.{gate,up,down}_proj` [E, ...] (HF: one `experts.{e}.{gate,up,down}_proj.weight` per expert).
def to_hf_names(name: str, cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Our state-dict name -> [(HF name, expert index or None)]."""
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if m:
        name = f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    m = re.fullmatch(r"(.+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)", name)
    if m:
        return [(f"{m.group(1)}.{e}.{m.group(2)}.weight", e) for e in range(cfg.n_routed_experts)]
    return [(name, None)]


def from_hf_name(hf: str, cfg: ModelConfig) -> tuple[str, int | None]:
    """HF name -> (our state-dict name, expert index or None)."""
    e = None
    m = re.fullmatch(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", hf)
    if m:
        hf, e = f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        hf = f"mtp.{int(m.group(1)) - cfg.num_hidden_layers}.{m.group(2)}"
    return hf, e


# -- reading --------------------------------------------------------------------------------------------------------
def checkpoint_files(ckpt_dir: str | Path) -> dict[str, list[str]]:
    """{shard path: [tensor names]} for a checkpoint directory, checking that every shard exists."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    idx = d / INDEX_FILE
    if idx.exists():
        try:
            wmap = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{idx}: not a valid safetensors index ({e})") from None
        shards: dict[str, list[str]] = {}
        for key, fname in wmap.items():
            shards.setdefault(str(d / fname), []).append(key)
        missing = [s for s in shards if not Path(s).exists()]
        if missing:
            raise CheckpointError(f"{idx} names shard(s) that do not exist: {', '.join(missing)}")
        return shards
    single = d / SINGLE_FILE
    if single.exists():
        return {str(single): _keys(single)}
    files = sorted(d.glob("*.safetensors"))
    if files:
        return {str(f): _keys(f) for f in files}
    pickles = [f.name for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{d}: only pickle weight files ({', '.join(sorted(pickles))}); glm5 loads safetensors only and never "
            "unpickles (a pickle can run arbitrary code). Convert them to safetensors with a tool you trust."
        )
    raise CheckpointError(f"{d}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors found")


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header or a truncated file
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def has_mtp_weights(shards: dict[str, list[str]], cfg: ModelConfig) -> bool:
    pre = tuple(f"model.layers.{cfg.num_hidden_layers + j}." for j in range(cfg.num_nextn_predict_layers))
    return any(k.startswith(pre) for keys in shards.values() for k in keys)


@torch.no_grad()
def load_into(model: torch.nn.Module, shards: dict[str, list[str]]) -> None:
    """Fill every parameter and buffer of `model` (already allocated) from the shards, one tensor at a time.

    Raises CheckpointError listing missing, unexpected and wrongly shaped keys (checked before any error is raised,
    so one run reports all of them)."""
    cfg: ModelConfig = model.config
    targets = dict(model.state_dict(keep_vars=True))
    filled: dict[str, set] = {name: set() for name in targets}
    unexpected, wrong = [], []
    for shard, keys in shards.items():
        try:
            f = safe_open(shard, framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{shard}: unreadable safetensors file ({e})") from None
        with f:
            for key in keys:
                ours, e = from_hf_name(key, cfg)
                if ours not in targets:
                    if ours.startswith("mtp.") and ours.endswith(_MTP_TIED_COPIES):
                        continue
                    unexpected.append(key)
                    continue
                t = targets[ours]
                want = tuple(t.shape[1:]) if e is not None else tuple(t.shape)
                try:
                    sl = f.get_slice(key)
                    got = tuple(sl.get_shape())
                except Exception as err:
                    raise CheckpointError(f"{shard}: cannot read tensor {key!r} ({err})") from None
                if got != want or (e is not None and e >= t.shape[0]):
                    wrong.append(f"{key}: checkpoint {list(got)}, model expects {list(want)}")
                    filled[ours].add(e)  # reported as wrongly shaped, not again as missing
                    continue
                try:
                    src = f.get_tensor(key)
                except Exception as err:
                    raise CheckpointError(f"{shard}: cannot read tensor {key!r} ({err})") from None
                (t.data[e] if e is not None else t.data).copy_(src)
                filled[ours].add(e)
    missing = []
    for name, got in filled.items():
        need = set(range(cfg.n_routed_experts)) if name.endswith(tuple(f"experts.{s}" for s in _EXPERT_STACKS)) else {None}
        for e in sorted(need - got, key=lambda x: -1 if x is None else x):
            missing.append(to_hf_names(name, cfg)[e if e is not None else 0][0])
    where = os.path.dirname(next(iter(shards), "")) or "checkpoint"
    raise_mismatch(where, missing, unexpected, wrong)


def raise_mismatch(where: str, missing: list, unexpected: list, wrong: list) -> None:
    """One error listing every missing, unexpected and wrongly shaped key (nothing if all three are empty)."""
    if missing or unexpected or wrong:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"{len(items)} {title}:\n  " + "\n  ".join(shown))
        raise CheckpointError(f"{where}: checkpoint does not match the model config\n" + "\n".join(parts))


# -- writing --------------------------------------------------------------------------------------------------------
def hf_tensors(model: torch.nn.Module, dtype: torch.dtype | None = None):
    """Yield (HF name, tensor) in a stable order; fp32-kept tensors stay fp32."""
    from .model.model import FP32_PARAM_SUFFIXES

    cfg = model.config
    for name, t in model.state_dict().items():
        for hf, e in to_hf_names(name, cfg):
            x = t[e] if e is not None else t
            if dtype is not None and x.is_floating_point() and not name.endswith(FP32_PARAM_SUFFIXES):
                x = x.to(dtype)
            yield hf, x.contiguous()


def save_checkpoint(model: torch.nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json and safetensors (sharded with an index when larger than max_shard_bytes), each file
    through a temporary name and an atomic rename, so a crash never leaves a half-written file under its name."""
    if any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in model.state_dict().values()):
        raise CheckpointError("this model holds FP8 weights, whose scales save_checkpoint would drop: "
                              "use glm5.quant.save_fp8_checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    # Plan shards from shapes only, then materialise one shard at a time.
    plan: list[list[str]] = [[]]
    size, sizes = 0, {}
    for hf, t in _plan_items(model, dtype):
        nbytes = t[0]
        sizes[hf] = nbytes
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(hf)
        size += nbytes
    n = len(plan)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    it = hf_tensors(model, dtype)
    for fname, keys in zip(names, plan):
        shard = {}
        for _ in keys:
            hf, t = next(it)
            shard[hf] = t
        atomic_write(out / fname, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
        del shard
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: fname for fname, keys in zip(names, plan) for k in keys}}
        atomic_write(out / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2)))
    hf_cfg = cfg.to_hf()
    if dtype is not None:
        hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf_cfg, indent=2)))
    return out


def _plan_items(model, dtype):
    from .model.model import FP32_PARAM_SUFFIXES

    cfg = model.config
    for name, t in model.state_dict().items():
        keep = name.endswith(FP32_PARAM_SUFFIXES) or dtype is None
        item = t.element_size() if keep else torch.empty((), dtype=dtype).element_size()
        for hf, e in to_hf_names(name, cfg):
            numel = t[0].numel() if e is not None else t.numel()
            yield hf, (numel * item,)


def atomic_write(path: Path, write) -> None:
    """write(tmp) then rename over path: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
