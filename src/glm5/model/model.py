"""The GLM-5 model: embeddings, decoder layers (MLA + DSA, dense MLP or MoE), final norm, untied head, and the
multi-token-prediction (MTP) layer(s). One definition for training, RL and serving: the KV cache is an argument.

Letters: B batch, T tokens, S key slots, D model dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .layers import MLP, RMSNorm, rope_angles
from .dsa import key_ends
from .mla import AttnContext, ForwardAux, MLAttention
from .moe import MOE_IMPLS, MoE


@dataclass
class Impl:
    """Which implementation each block uses. Reference paths: attn="expanded", dsa="mask", moe="loop"."""

    attn: str = "auto"  # "expanded" | "absorbed" | "auto" (expanded for prefill, absorbed for decode)
    dsa: str = "auto"  # "mask" | "gather" | "auto" | "off" (dense attention: the DSA warm-up stage)
    moe: str = "grouped"  # "grouped" | "loop"


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, has_indexer: bool, moe: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx, has_indexer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTD, ctx: AttnContext, prev_topk, moe_impl: str):
        a, topk = self.self_attn(self.input_layernorm(x_BTD), ctx, prev_topk)
        x_BTD = x_BTD + a
        h = self.post_attention_layernorm(x_BTD)
        if isinstance(self.mlp, MoE):
            record = ctx.aux.router if ctx.aux is not None else None
            h = self.mlp(h, moe_impl, record, self.layer_idx)
        else:
            h = self.mlp(h)
        return x_BTD + h, topk


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 "NextN": h' = eh_proj([enorm(embed(tok[t+1])); hnorm(h[t])]) -> decoder block ->
    shared_head.norm -> the main lm_head, predicting tok[t+2]. Embedding first in the concat, as the released
    weights (and vLLM / SGLang, which serve them) expect. h is the main model's output *after* its final norm,
    the hidden state those engines hand to the MTP draft."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, has_indexer=True, moe=cfg.n_routed_experts > 0)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Weights are set by init_weights or a checkpoint; _weight skips nn.Embedding's own normal_ init, which on
        # the meta device imports torch._dynamo (seconds per process).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, cfg.indexer_types[i] == "full", cfg.mlp_layer_types[i] == "sparse")
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# Parameters kept in fp32 whatever the model dtype (as released, and as the reference keeps them).
FP32_PARAM_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "indexer.weights_proj.weight")


class GLM5(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.impl = Impl()
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(cfg, L + j) for j in range(cfg.num_nextn_predict_layers))

    # -- forward ------------------------------------------------------------------------------------------------
    def _context(self, positions_BT, cache, doc_ids_BT, aux, T, device) -> AttnContext:
        cos, sin = rope_angles(positions_BT, self.config.qk_rope_head_dim, self.config.rope_theta)
        if cache is not None:
            kpos_BS = cache.key_positions(positions_BT)  # slots of this row's sequence; -1 = empty slot
            visible = (kpos_BS[:, None, :] >= 0) & (kpos_BS[:, None, :] <= positions_BT[:, :, None])
        else:
            idx = torch.arange(T, device=device)
            visible = (idx[None, :] <= idx[:, None]).unsqueeze(0).expand(positions_BT.shape[0], T, T)
            if doc_ids_BT is not None:  # packed sequences: never attend across a document boundary
                visible = visible & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])
        return AttnContext(cos, sin, visible, key_ends(visible), cache, self.impl.attn, self.impl.dsa, aux)

    def hidden(self, input_ids_BT, positions_BT=None, cache=None, doc_ids_BT=None, aux: ForwardAux | None = None):
        """Final-norm hidden states [B, T, D]."""
        if input_ids_BT.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids_BT.shape)}")
        B, T = input_ids_BT.shape
        if positions_BT is None:
            start = cache.next_position() if cache is not None else 0
            positions_BT = torch.arange(start, start + T, device=input_ids_BT.device).expand(B, T)
        if self.impl.moe not in MOE_IMPLS:
            raise ValueError(f"impl.moe must be one of {MOE_IMPLS}, got {self.impl.moe!r}")
        ctx = self._context(positions_BT, cache, doc_ids_BT, aux, T, input_ids_BT.device)
        x_BTD = self.model.embed_tokens(input_ids_BT)
        topk = None
        for layer in self.model.layers:
            x_BTD, topk = layer(x_BTD, ctx, topk, self.impl.moe)
        return self.model.norm(x_BTD)

    def forward(self, input_ids_BT, positions_BT=None, cache=None, doc_ids_BT=None, aux=None, last_only=False):
        """Logits [B, T, V] (fp32 matmul in the model dtype; [B, 1, V] with last_only)."""
        h_BTD = self.hidden(input_ids_BT, positions_BT, cache, doc_ids_BT, aux)
        if last_only:
            h_BTD = h_BTD[:, -1:]
        return self.lm_head(h_BTD)

    def mtp_step(self, h_BTD, next_ids_BT, positions_BT, depth: int = 0, cache=None, doc_ids_BT=None, aux=None):
        """One MTP depth: main hidden at t and token t+1 in, (logits for token t+2, MTP hidden) out."""
        x_BTD = self.mtp_hidden(h_BTD, next_ids_BT, positions_BT, depth, cache, doc_ids_BT, aux)
        return self.mtp_head(depth)(x_BTD), x_BTD

    def mtp_hidden(self, h_BTD, next_ids_BT, positions_BT, depth: int = 0, cache=None, doc_ids_BT=None, aux=None,
                   embeds_BTD=None):
        """mtp_step without the head: the MTP layer's hidden state (training applies the head where labels are).
        embeds_BTD: the next tokens' embeddings if the caller has them (RL passes them detached, so that the MTP loss
        trains the MTP layer alone)."""
        layer = self.mtp[depth]
        e_BTD = layer.enorm(self.model.embed_tokens(next_ids_BT) if embeds_BTD is None else embeds_BTD)
        x_BTD = layer.eh_proj(torch.cat([e_BTD, layer.hnorm(h_BTD)], dim=-1))
        ctx = self._context(positions_BT, cache, doc_ids_BT, aux, x_BTD.shape[1], x_BTD.device)
        return layer(x_BTD, ctx, None, self.impl.moe)[0]

    def mtp_head(self, depth: int = 0, head=None):
        """MTP hidden -> logits: the depth's own norm, then the shared LM head (or `head`, a callable that applies
        it: the engine's runner has its own)."""
        norm, head = self.mtp[depth].shared_head.norm, head or self.lm_head
        return lambda x: head(norm(x))

    def forward_with_mtp(self, input_ids_BT, doc_ids_BT=None, aux=None):
        """(logits [B, T, V], mtp_logits [B, T-1, V]): mtp_logits[:, t] predicts token t+2 from h[t] and tok[t+1]."""
        if not len(self.mtp):
            raise ValueError("this model has no MTP layer (num_nextn_predict_layers = 0)")
        B, T = input_ids_BT.shape
        pos = torch.arange(T, device=input_ids_BT.device).expand(B, T)
        h_BTD = self.hidden(input_ids_BT, pos, None, doc_ids_BT, aux)
        docs = doc_ids_BT[:, :-1] if doc_ids_BT is not None else None
        mtp_logits, _ = self.mtp_step(h_BTD[:, :-1], input_ids_BT[:, 1:], pos[:, :-1], 0, None, docs, aux)
        return self.lm_head(h_BTD), mtp_logits

    # -- weights ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None):
        """Random init as the reference does it: N(0, std) matrices, unit norms, zero biases."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight")):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)
        for name, b in self.named_buffers():
            b.zero_()
        return self

    def cast_(self, dtype: torch.dtype):
        """Cast to dtype in place, keeping the router and indexer head weights in fp32."""
        for name, p in self.named_parameters():
            want = torch.float32 if name.endswith(FP32_PARAM_SUFFIXES) else dtype
            if p.dtype != want and p.dtype.is_floating_point:
                p.data = p.data.to(want)
        return self

    def num_params(self) -> dict:
        """Parameter counts. `active` = per token: routed experts count k of E. The published GLM-5 figures
        (744B total, 40B active) leave out the MTP layer; the 40B also leaves out the embedding and head."""
        cfg = self.config

        def inactive(mod):
            n = 0
            for m in mod.modules():
                if isinstance(m, MoE):
                    n += sum(p[0].numel() for p in m.experts.parameters()) * (cfg.n_routed_experts - cfg.num_experts_per_tok)
            return n

        main = sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in self.mtp.parameters())
        mtp = sum(p.numel() for p in self.mtp.parameters())
        embed_head = self.model.embed_tokens.weight.numel() + self.lm_head.weight.numel()
        active = main - inactive(self.model)
        return {"total": main, "mtp": mtp, "active": active, "active_no_embed": active - embed_head,
                "mtp_active": mtp - inactive(self.mtp)}
