"""What GLM-5-FP8 quantizes, and the `quantization_config` that says so (zai-org/GLM-5-FP8; docs/formats.md).

Quantized (e4m3, 128x128 blocks): every projection matrix of the decoder and MTP layers: MLA q_a/q_b/kv_a/kv_b/o,
the indexer's wq_b and wk, the dense MLP, the shared experts and each routed expert.
Left as they are: embeddings, lm_head, every norm, the router (`mlp.gate`, fp32) and its
`e_score_correction_bias`, the indexer's `weights_proj` (fp32, it weighs the heads of a discrete top-k), and the
MTP layer's `eh_proj`.
- eh_proj: the GLM-5.x FP8 releases store it in BF16 with no weight_scale_inv (tenstorrent/tt-metal's GLM-5.2 MTP
  loader asserts exactly that: "eh_proj is BF16 in the checkpoint with no weight_scale_inv, unlike every MLA/MoE
  weight on the same layer"); DeepSeek-V3's FP8 release quantizes it. We follow GLM. The loader accepts either:
  any tensor stored as e4m3 with a valid scale loads (dequantized if glm5 keeps that module dense).
- indexer wq_b / wk: FP8 in GLM-5-FP8 (AWS neuronx-distributed-inference's GLM-5 loader dequantizes both from
  their weight_scale_inv), unlike weights_proj.
An allowlist rather than a skip list: a tensor this table does not know stays unquantized.
"""

from __future__ import annotations

import re

from ..config import ModelConfig
from ..weights import CheckpointError

QUANT_METHOD = "fp8"
_QUANTIZED = re.compile(
    r"model\.layers\.\d+\.(?:"
    r"self_attn\.(?:q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|indexer\.wq_b|indexer\.wk)"
    r"|mlp\.(?:shared_experts\.|experts\.\d+\.)?(?:gate_proj|up_proj|down_proj)"
    r")\.weight")
# The official list names the indexer's head weights `self_attn.indexers_proj`, a module that exists nowhere
# (the tensor is `self_attn.indexer.weights_proj`). We read it as the module it means.
_MISSPELLED = {"indexers_proj": "indexer.weights_proj"}


def quantized_by_release(hf_name: str) -> bool:
    """Is this HF tensor name stored as e4m3 + weight_scale_inv in GLM-5-FP8?"""
    return _QUANTIZED.fullmatch(hf_name) is not None


def modules_to_not_convert(cfg: ModelConfig) -> list[str]:
    """The linear modules left unquantized, as HF module names (what transformers' FP8 loader reads)."""
    mods = ["lm_head", "model.embed_tokens"]
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        mtp = i >= cfg.num_hidden_layers
        if mtp or cfg.indexer_types[i] == "full":
            mods.append(f"model.layers.{i}.self_attn.indexer.weights_proj")
        if (cfg.n_routed_experts > 0) if mtp else cfg.mlp_layer_types[i] == "sparse":
            mods.append(f"model.layers.{i}.mlp.gate")
        if mtp:
            mods.append(f"model.layers.{i}.eh_proj")
    return mods


def quantization_config(cfg: ModelConfig, block=(128, 128)) -> dict:
    return {"quant_method": QUANT_METHOD, "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block), "modules_to_not_convert": modules_to_not_convert(cfg)}


class FP8Format:
    """A checked `quantization_config`: block size and the unconverted modules (misspellings normalised)."""

    def __init__(self, block: tuple[int, int], not_convert: list[str], activation_scheme: str):
        self.block, self.not_convert, self.activation_scheme = block, not_convert, activation_scheme

    def listed_unconverted(self, hf_module: str) -> bool:
        return any(hf_module == m or hf_module.startswith(m + ".") for m in self.not_convert)


def read_quant_config(hf: dict, where: str = "config.json") -> FP8Format | None:
    """None for an unquantized checkpoint; a CheckpointError for anything glm5 cannot read exactly."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{where}: quantization_config.quant_method is {method!r}; glm5 reads only "
                              f"{QUANT_METHOD!r} (block-wise e4m3 as in GLM-5-FP8)")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{where}: quantization_config.fmt is {fmt!r}; glm5 reads only 'e4m3'")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise CheckpointError(f"{where}: quantization_config.activation_scheme is {scheme!r}; glm5 supports only "
                              "'dynamic' (static activation scales are not read)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive integers "
                              f"(GLM-5-FP8: [128, 128]), got {block!r}; per-tensor FP8 is not supported")
    not_convert = []
    for m in qc.get("modules_to_not_convert") or []:
        for wrong, right in _MISSPELLED.items():
            m = re.sub(rf"(^|\.){wrong}($|\.)", rf"\g<1>{right}\g<2>", m)
        not_convert.append(m)
    return FP8Format((block[0], block[1]), not_convert, scheme)
