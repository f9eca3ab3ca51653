"""Parameter and weight-byte accounting for a config, on the meta device (no memory, seconds for 744B)."""

from __future__ import annotations

import math


from .config import ModelConfig
from .loader import build_model
from .quant.format import quantized_by_release
from .weights import to_hf_names

FP8_BLOCK = 128


def weight_report(cfg: ModelConfig) -> dict:
    model = build_model(cfg, device="meta")
    counts = model.num_params()
    bf16 = fp8 = 0
    for name, t in model.state_dict().items():
        n = t.numel()
        if name.endswith("e_score_correction_bias") or name.endswith("mlp.gate.weight"):
            bf16 += 4 * n  # stored fp32 in both releases
            fp8 += 4 * n
            continue
        bf16 += 2 * n
        if quantized_by_release(to_hf_names(name, cfg)[0][0]):
            *lead, rows, cols = t.shape
            mats = math.prod(lead) if lead else 1
            scales = mats * math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK)
            fp8 += n + 4 * scales  # e4m3 weights + fp32 weight_scale_inv per 128x128 block
        else:
            fp8 += 2 * n
    return {**counts, "bytes_bf16": bf16, "bytes_fp8": fp8}


def format_report(cfg: ModelConfig, rep: dict, title: str) -> str:
    def b(x):
        return f"{x / 1e9:,.2f}B" if x >= 1e8 else f"{x / 1e6:,.2f}M"

    def gb(x):
        return f"{x / 1e12:,.3f} TB" if x >= 1e11 else f"{x / 1e6:,.1f} MB"

    moe_layers = cfg.mlp_layer_types.count("sparse")
    lines = [
        f"{title}",
        f"  layers {cfg.num_hidden_layers} (+{cfg.num_nextn_predict_layers} MTP), hidden {cfg.hidden_size}, "
        f"heads {cfg.num_attention_heads}, vocab {cfg.vocab_size}",
        f"  MLA q_lora {cfg.q_lora_rank}, kv_lora {cfg.kv_lora_rank}, qk {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim}, "
        f"v {cfg.v_head_dim}; DSA indexer {cfg.index_n_heads}x{cfg.index_head_dim}, top-{cfg.index_topk} "
        f"({cfg.indexer_types.count('full')} full / {cfg.indexer_types.count('shared')} shared)",
        f"  MoE {moe_layers} layers x {cfg.n_routed_experts} experts (top-{cfg.num_experts_per_tok}, "
        f"{cfg.n_shared_experts} shared, width {cfg.moe_intermediate_size}); "
        f"{cfg.num_hidden_layers - moe_layers} dense layers (width {cfg.intermediate_size})",
        f"  parameters   total {b(rep['total'])}   active/token {b(rep['active'])} "
        f"({b(rep['active_no_embed'])} without embedding and head)",
        f"  MTP layers   {b(rep['mtp'])} more ({b(rep['mtp_active'])} active)",
        f"  weights      (incl. MTP) BF16 {gb(rep['bytes_bf16'])}   FP8 (128x128 blocks) {gb(rep['bytes_fp8'])}",
        f"  KV cache     {(cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim) * 2 * cfg.num_hidden_layers:,} "
        f"bytes/token in BF16 (latent {cfg.kv_lora_rank}+{cfg.qk_rope_head_dim} + index key {cfg.index_head_dim}, per layer)",
    ]
    return "\n".join(lines)
