"""FP8 checkpoints into a GLM5 whose quantized matrices stay e4m3 in memory; and the same in memory, from a model.

How the model is made FP8 without touching glm5/model: build it as usual (on the meta device), then swap modules
by name: each quantized nn.Linear of a decoder / MTP layer becomes an FP8Linear, each routed `Experts` an
FP8Experts (same forward signatures). Which HF tensor a module holds comes from the one name table
(glm5.weights.to_hf_names / from_hf_name). What is FP8 follows the checkpoint: a matrix stored as e4m3 with its
weight_scale_inv stays e4m3, a dense one stays dense.

One exception: `kv_b_proj` is dequantized at load into a dense Linear in the model dtype. Absorbed MLA reads its
weight to fold it into the query and the output (glm5/model/mla.py `_w_kv`); vLLM does the same ("we currently do
not have quantized bmm's which are needed for W_UV and W_UK_T ... the extra memory overhead of this is fairly
low", vllm/v1/attention/backends/mla/common.py). In GLM-5 it is 0.16% of the weights.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from ..model.moe import Experts
from ..weights import _MTP_TIED_COPIES, CheckpointError, from_hf_name, raise_mismatch, to_hf_names
from .fp8 import BLOCK, FP8, FP8Experts, FP8Linear, dequantize, quantize, scale_shape
from .format import FP8Format, quantized_by_release

SCALE = "_scale_inv"
DENSE_LINEARS = ("kv_b_proj",)  # read as .weight by the model: dequantized at load (see the module docstring)
_SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# -- which modules can hold FP8 ------------------------------------------------------------------------------------
def fp8_candidates(model: nn.Module) -> dict[str, str]:
    """{module name: "linear" | "experts"} for the modules that may be swapped for FP8 ones."""
    out = {}
    for name, m in model.named_modules():
        in_layer = name.startswith(("model.layers.", "mtp."))
        if isinstance(m, Experts):
            out[name] = "experts"
        elif isinstance(m, nn.Linear) and in_layer and not name.endswith(DENSE_LINEARS):
            out[name] = "linear"
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _swap(model: nn.Module, swap: dict[str, str], block, device) -> None:
    for name, kind in swap.items():
        old = model.get_submodule(name)
        if kind == "linear":
            new = FP8Linear(old.in_features, old.out_features, old.bias is not None, block, device, old.weight.dtype)
        else:
            E, Fw, D = old.gate_proj.shape
            new = FP8Experts(E, D, Fw, block, device)
        _set_module(model, name, new)


@torch.no_grad()
def quantize_model(model: nn.Module, block=BLOCK) -> nn.Module:
    """In place: the model `glm5 quantize --to fp8` followed by loading would give, without the disk. Matrices
    the release quantizes become FP8 modules; kv_b_proj is quantized and dequantized (its values are the FP8
    checkpoint's, held dense)."""
    cfg = model.config
    cands = fp8_candidates(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, Experts) and name in cands:
            if quantized_by_release(to_hf_names(f"{name}.gate_proj", cfg)[0][0]):
                _set_module(model, name, FP8Experts.from_experts(m, block))
        elif isinstance(m, nn.Linear) and quantized_by_release(to_hf_names(f"{name}.weight", cfg)[0][0]):
            if name in cands:
                _set_module(model, name, FP8Linear.from_linear(m, block))
            else:
                m.weight.copy_(dequantize(*quantize(m.weight, block), block, m.weight.dtype))
    return model


# -- loading -------------------------------------------------------------------------------------------------------
def fill_fp8(model: nn.Module, shards: dict[str, list[str]], fmt: FP8Format, device: str | torch.device = "cpu",
             where: str = "checkpoint") -> nn.Module:
    """A GLM5 built on the meta device, filled from FP8 shards (ours or laid out like zai-org/GLM-5-FP8): the modules
    whose matrices are stored e4m3 are swapped for FP8 ones and keep their e4m3 values and scales; everything else
    is read in the model's dtype. Returns the materialised model."""
    info = _scan(shards)
    fp8_keys = _check_pairs(info, fmt, where)
    _swap(model, _plan(model, fp8_keys, where), fmt.block, "meta")
    model = model.to_empty(device=device)
    _fill(model, shards, info, fp8_keys, fmt, where)
    return model


def _scan(shards: dict[str, list[str]]) -> dict[str, tuple[str, str, tuple]]:
    """{HF name: (shard, safetensors dtype, shape)} from the headers alone."""
    info = {}
    for shard, keys in shards.items():
        try:
            with safe_open(shard, framework="pt") as f:
                for key in keys:
                    sl = f.get_slice(key)
                    info[key] = (shard, sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as e:  # safetensors raises its own types for a bad header or a missing key
            raise CheckpointError(f"{shard}: unreadable safetensors file ({e})") from None
    return info


def _check_pairs(info, fmt: FP8Format, where: str) -> set[str]:
    """The e4m3 weights, each with its scale. Anything else FP8-looking is an error, never read unscaled."""
    errors, fp8 = [], set()
    for key, (_, dt, shape) in sorted(info.items()):
        if key.endswith(SCALE):
            base = key[: -len(SCALE)]
            if base not in info:
                errors.append(f"{key}: a scale with no tensor {base} to scale")
            elif dt not in _SCALE_DTYPES:
                errors.append(f"{key}: stored as {dt}, expected float32 scales")
            continue
        if dt.startswith("F8"):
            if dt != "F8_E4M3":
                errors.append(f"{key}: stored as {dt}; GLM-5-FP8 is e4m3 (F8_E4M3)")
            elif key + SCALE not in info:
                errors.append(f"{key}: stored as float8_e4m3fn but {key}{SCALE} is missing; refusing to read FP8 "
                              "values without their scales")
            elif len(shape) != 2:
                errors.append(f"{key}: e4m3 tensor of shape {list(shape)}; block scales need a matrix")
            else:
                fp8.add(key)
            if fmt.listed_unconverted(key.removesuffix(".weight")):
                errors.append(f"{key}: stored as e4m3 but its module is in modules_to_not_convert")
        elif key + SCALE in info:
            errors.append(f"{key}: has {key}{SCALE} but is stored as {dt}, not e4m3")
    if errors:
        raise CheckpointError(f"{where}: inconsistent FP8 checkpoint\n  " + "\n  ".join(errors[:20])
                              + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""))
    return fp8


def _plan(model, fp8_keys: set[str], where: str) -> dict[str, str]:
    cfg = model.config
    swap, errors = {}, []
    for name, kind in fp8_candidates(model).items():
        if kind == "linear":
            if to_hf_names(f"{name}.weight", cfg)[0][0] in fp8_keys:
                swap[name] = kind
            continue
        keys = [hf for proj in FP8Experts.PROJS for hf, _ in to_hf_names(f"{name}.{proj}", cfg)]
        n = sum(k in fp8_keys for k in keys)
        if n == len(keys):
            swap[name] = kind
        elif n:
            errors.append(f"{name}: {n} of {len(keys)} routed-expert matrices are e4m3 and the rest are not; a "
                          "layer's experts must be all FP8 or all dense")
    if errors:
        raise CheckpointError(f"{where}: " + "\n  ".join(errors))
    return swap


@torch.no_grad()
def _fill(model, shards, info, fp8_keys: set[str], fmt: FP8Format, where: str) -> None:
    """Every tensor copied once into its place; all missing / unexpected / wrongly shaped keys in one error."""
    cfg = model.config
    targets = dict(model.state_dict(keep_vars=True))
    filled: dict[str, set] = {n: set() for n in targets}
    unexpected, wrong = [], []
    for shard, keys in shards.items():
        with safe_open(shard, framework="pt", device="cpu") as f:
            for key in keys:
                if key.endswith(SCALE):
                    continue  # read together with its weight
                ours, e = from_hf_name(key, cfg)
                if ours not in targets:
                    if not (ours.startswith("mtp.") and ours.endswith(_MTP_TIED_COPIES)):
                        unexpected.append(key)
                    continue
                t = targets[ours]
                want = tuple(t.shape[1:]) if e is not None else tuple(t.shape)
                got = info[key][2]
                filled[ours].add(e)  # a wrongly shaped tensor is reported once, as such, not again as missing
                if got != want or (e is not None and e >= t.shape[0]):
                    wrong.append(f"{key}: checkpoint {list(got)}, model expects {list(want)}")
                    continue
                dst = t.data[e] if e is not None else t.data
                src = f.get_tensor(key)
                if key not in fp8_keys:
                    if dst.dtype == FP8:
                        # unreachable: _plan swaps a module only when the checkpoint holds all its matrices as e4m3
                        raise CheckpointError(f"{where}: {key} is dense but the model holds it as e4m3")
                    dst.copy_(src)
                    continue
                s = _read_scale(f, shard, key, info)
                if tuple(s.shape) != scale_shape(got, fmt.block):
                    if ours + SCALE in targets:
                        filled[ours + SCALE].add(e)
                    wrong.append(f"{key}{SCALE}: checkpoint {list(s.shape)}, expected "
                                 f"{list(scale_shape(got, fmt.block))} for {key} {list(got)} in "
                                 f"{fmt.block[0]}x{fmt.block[1]} blocks")
                    continue
                if dst.dtype == FP8:
                    dst.copy_(src)
                    (targets[ours + SCALE].data[e] if e is not None else targets[ours + SCALE].data).copy_(s)
                    filled[ours + SCALE].add(e)
                else:  # a module glm5 keeps dense (kv_b_proj, or eh_proj in a DeepSeek-style checkpoint)
                    dst.copy_(dequantize(src, s, fmt.block, dst.dtype))
    missing = []
    for name, got in filled.items():
        base = name.removesuffix(SCALE)
        stacked = isinstance(model.get_submodule(base.rpartition(".")[0]), (Experts, FP8Experts))
        need = set(range(cfg.n_routed_experts)) if stacked else {None}
        for e in sorted(need - got, key=lambda x: -1 if x is None else x):
            hf = to_hf_names(base, cfg)[e if e is not None else 0][0]
            missing.append(hf + (SCALE if name.endswith(SCALE) else ""))
    raise_mismatch(where, missing, unexpected, wrong)


def _read_scale(f, shard: str, key: str, info) -> torch.Tensor:
    sshard = info[key + SCALE][0]
    if sshard == shard:
        s = f.get_tensor(key + SCALE)
    else:  # the release keeps a weight and its scale together, but nothing guarantees it
        with safe_open(sshard, framework="pt", device="cpu") as g:
            s = g.get_tensor(key + SCALE)
    return s.float()  # bf16 / fp16 scales widen exactly


# -- weight updates (RL rollout engines holding FP8 weights) -----------------------------------------------------
@torch.no_grad()
def fp8_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense tensors under glm5 names -> what to copy into this FP8 model: e4m3 + `_scale_inv` for its FP8
    modules, the quantize-dequantized values for kv_b_proj, the rest unchanged. (Copying a dense tensor
    straight into an e4m3 buffer would cast it without a scale.)"""
    fp8_mods = {n: m for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}
    block = next(iter(fp8_mods.values())).block if fp8_mods else None
    out = {}
    for name, t in state_dict.items():
        mod, _, leaf = name.rpartition(".")
        m = fp8_mods.get(mod)
        if m is not None and ((isinstance(m, FP8Linear) and leaf == "weight") or
                              (isinstance(m, FP8Experts) and leaf in FP8Experts.PROJS)):
            out[name], out[name + SCALE] = quantize(t, m.block)
        elif block is not None and mod.endswith(DENSE_LINEARS) and leaf == "weight":
            out[name] = dequantize(*quantize(t, block), block, t.dtype)
        else:
            out[name] = t
    return out
