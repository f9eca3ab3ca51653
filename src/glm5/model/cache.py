"""A contiguous latent KV cache for one batch of sequences that advance together.

The serving engine has its own paged cache with the same methods; the model only ever calls these:
next_position, key_positions, update, and gather_latent (optional: lets sparse decode read only its top-k rows).
Per token and layer it stores the MLA latent row [C | R] and the indexer key [Di], never expanded K/V.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class DenseCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.lat = torch.zeros(n_layers, batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.ikey = torch.zeros(n_layers, batch, max_len, cfg.index_head_dim, dtype=dtype, device=device)
        self.max_len, self.len, self.start = max_len, 0, 0

    def next_position(self) -> int:
        return self.len

    def key_positions(self, positions_BT: torch.Tensor) -> torch.Tensor:
        """Called once per forward, before the layers: reserves this step's slots and returns all slot positions."""
        B, T = positions_BT.shape
        if self.len + T > self.max_len:
            raise ValueError(f"cache full: {self.len} + {T} tokens > max_len {self.max_len}")
        self.start, self.len = self.len, self.len + T
        return torch.arange(self.len, device=positions_BT.device).expand(B, self.len)

    def update(self, layer: int, lat_BTL: torch.Tensor, ikey_BTd: torch.Tensor | None, need_latent: bool = True):
        """Store this step's rows; return all rows so far (the latent only if need_latent: sparse decode reads
        just its top-k rows through gather_latent)."""
        s, e = self.start, self.len
        self.lat[layer, :, s:e] = lat_BTL
        if ikey_BTd is not None:
            self.ikey[layer, :, s:e] = ikey_BTd
        return (self.lat[layer, :, :e] if need_latent else None), (self.ikey[layer, :, :e] if ikey_BTd is not None else None)

    def gather_latent(self, layer: int, idx_BTK: torch.Tensor) -> torch.Tensor:
        b_B11 = torch.arange(idx_BTK.shape[0], device=idx_BTK.device)[:, None, None]
        return self.lat[layer][b_B11, idx_BTK]
