"""The engine's paged latent KV cache: block bookkeeping with prefix reuse, block storage, and a per-call batch view
that implements the model's cache protocol (next_position / key_positions / update, see glm5/model/cache.py).

Per token and main layer a slot holds the MLA latent row [C | R] (kv_lora_rank + qk_rope_head_dim) and, for layers
with their own indexer, the indexer key [Di] -- never expanded K/V. With `mtp=True` (the engine speculates with the
MTP layer, speculative.py) the first MTP layer gets a latent row and an index key per slot too: slot t holds the
MTP layer's row for (main hidden at t, token t+1), so its blocks and block tables are the main layers' own.

Prefix reuse (as vLLM's automatic prefix caching): a block is registered once all its P slots are computed, under
the key (key of the previous block, its P token ids). The key holds the token ids themselves, not a hash of them,
so a lookup can never return another prefix's block; each registered block gets a fresh integer id that the next
block's key refers to. Blocks are ref-counted; a registered block whose count drops to 0 moves to an LRU list and
keeps its contents, so a later request with the same prefix takes it back; it is overwritten only when no
never-registered free block is left.

Letters: B rows (sequences) in one model call, T query tokens per row, S key slots, N blocks per row,
P slots per block, W latent width (C + R), Di indexer key width.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict

import torch

from ..config import ModelConfig

ROOT = 0  # key id of the empty prefix


class NoFreeBlocks(RuntimeError):
    pass


class BlockManager:
    """Which blocks are free, who holds them, and which hold a reusable prefix. No tensors."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.key = [None] * num_blocks  # (parent key id, tokens) of a registered block
        self.key_id = [ROOT] * num_blocks  # the id the next block's key refers to
        self.table: dict[tuple, int] = {}  # key -> block
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-registered free blocks (pop from end)
        self.lru: OrderedDict[int, None] = OrderedDict()  # registered blocks with ref 0, oldest first
        self._next_id = ROOT + 1
        self.hit_tokens = 0  # tokens admitted sequences took from the prefix cache (counted by the scheduler)

    # -- counts ----------------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable cached)."""
        return len(self.free) + len(self.lru)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Free blocks still holding a reusable prefix."""
        return len(self.lru)

    # -- allocation ------------------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:  # evict the least recently freed cached prefix block
                b, _ = self.lru.popitem(last=False)
                self._unregister(b)
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]):
        # Tail blocks first: they reach the LRU first and are evicted first, so shared heads outlive private tails.
        for b in reversed(blocks):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released twice"
            if self.ref[b] == 0:
                if self.key[b] is not None:
                    self.lru[b] = None
                else:
                    self.free.append(b)

    # -- prefix reuse ----------------------------------------------------------------------------------------------
    def take_prefix(self, tokens: list[int], max_blocks: int) -> tuple[list[int], int]:
        """Acquire the longest registered chain of full blocks matching tokens (at most max_blocks).
        Returns (blocks, key id of the last one)."""
        P, parent, out = self.block_size, ROOT, []
        for i in range(max_blocks):
            b = self.table.get((parent, tuple(tokens[i * P:(i + 1) * P])))
            if b is None:
                break
            if self.ref[b] == 0:
                del self.lru[b]
            self.ref[b] += 1
            out.append(b)
            parent = self.key_id[b]
        return out, parent

    def register(self, block: int, parent: int, tokens: list[int]) -> int:
        """Register a just-filled block under (parent, tokens); returns the key id for the next block. If another
        block already holds this prefix, that one stays the cached copy and this block stays private."""
        key = (parent, tuple(tokens))
        other = self.table.get(key)
        if other is not None:
            return self.key_id[other]
        self.table[key] = block
        self.key[block], self.key_id[block] = key, self._next_id
        self._next_id += 1
        return self.key_id[block]

    def reset_prefix_cache(self):
        """Forget every registered prefix (after a weight update their contents are stale)."""
        for b in list(self.table.values()):
            self._unregister(b)
        self.free.extend(self.lru)
        self.lru.clear()

    def _unregister(self, b: int):
        if self.key[b] is not None:
            del self.table[self.key[b]]
            self.key[b], self.key_id[b] = None, ROOT


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, mtp: bool = False) -> int:
    """Cache bytes one token takes: its latent row in every main layer and its index key in every "full" layer
    (with mtp, also both for the MTP layer, which always has its own indexer)."""
    n_latent, n_index = cfg.num_hidden_layers + int(mtp), sum(t == "full" for t in cfg.indexer_types) + int(mtp)
    width = n_latent * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + n_index * cfg.index_head_dim
    return width * torch.empty((), dtype=dtype).element_size()


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, mtp: bool = False) -> int:
    return bytes_per_token(cfg, dtype, mtp) * block_size


# The share of the free memory a default-sized cache may take: an accelerator's memory is the server's alone (vLLM's
# gpu_memory_utilization is 0.9), a CPU's is shared with the OS and everything else running.
MEMORY_SHARE = {"cpu": 0.5, "other": 0.9}


def free_memory(device: torch.device) -> int | None:
    """Bytes free now on the device (CPU: the kernel's MemAvailable); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def default_num_blocks(cfg: ModelConfig, dtype: torch.dtype, block_size: int, max_num_seqs: int,
                       device: torch.device, mtp: bool = False) -> tuple[int, str]:
    """Enough blocks for max_num_seqs sequences of the model's whole context (max_position_embeddings), so the
    scheduler never preempts, capped by a share of the free memory. Returns (blocks, why, in words)."""
    per_token = bytes_per_token(cfg, dtype, mtp)
    per_seq = -(-cfg.max_position_embeddings // block_size)
    want = max_num_seqs * per_seq
    why = f"{max_num_seqs} sequences x {cfg.max_position_embeddings} tokens x {per_token} B/token"
    free = free_memory(device)
    share = MEMORY_SHARE["cpu" if device.type == "cpu" else "other"]
    if free is not None and want * block_size * per_token > share * free:
        cap = int(share * free) // (block_size * per_token)
        why = (f"{share:.0%} of the {free / (1 << 20):.0f} MiB free; {why} would take "
               f"{want * block_size * per_token / (1 << 20):.0f} MiB")
        return max(cap, 1), why
    return want, why


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros; on a CPU, in an anonymous mapping, whose pages the kernel zeroes on first touch: a cache sized for
    many long sequences then holds resident memory only for the blocks in use (torch.zeros writes every page up
    front)."""
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or n == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, n), dtype=dtype).view(shape)


class PagedKVCache:
    """Block storage for the main layers (and the first MTP layer with mtp=True, as layer num_hidden_layers):
    lat [layers, blocks, P, W], ikey [indexer layers, blocks, P, Di]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu",
                 mtp: bool = False):
        self.cfg, self.num_blocks, self.block_size, self.dtype, self.device = cfg, num_blocks, block_size, dtype, device
        if mtp and not cfg.num_nextn_predict_layers:
            raise ValueError("mtp=True: this model has no MTP layer (num_nextn_predict_layers = 0)")
        self.n_layers = cfg.num_hidden_layers + int(mtp)
        W = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        full = [i for i, t in enumerate(cfg.indexer_types) if t == "full"] + ([cfg.num_hidden_layers] if mtp else [])
        self.ikey_index = {layer: j for j, layer in enumerate(full)}  # "shared" layers keep no index keys
        self.lat = _zeros((self.n_layers, num_blocks, block_size, W), dtype, device)
        self.ikey = _zeros((len(full), num_blocks, block_size, cfg.index_head_dim), dtype, device)
        # Where a batch's rows are gathered into [B, S, X] (block tables that are not one contiguous run): reused
        # from layer to layer and step to step. A fresh tensor per layer would cost more than the copy itself on a
        # CPU, where the kernel zeroes every new page on first touch (~1 ms per MB here).
        self._scratch: dict[str, torch.Tensor] = {}

    def scratch(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A [shape] buffer that stays valid until the next call with the same name."""
        n = torch.Size(shape).numel()
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n:
            buf = self._scratch[name] = torch.empty(max(n, 1), dtype=self.dtype, device=self.device)
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        return self.lat.nbytes + self.ikey.nbytes

    def batch_view(self, block_tables: list[list[int]], ctx_lens: list[int], new_lens: list[int]) -> "BatchView":
        return BatchView(self, block_tables, ctx_lens, new_lens)


class BatchView:
    """The cache as one model call sees it: row b already holds ctx_lens[b] tokens (slots 0..ctx-1 of its block
    table) and this call feeds new_lens[b] more; rows are padded to T = max(new_lens) query tokens and S key slots.
    Padding queries repeat the row's last real position (so they see real keys and stay finite) and write nothing;
    padding key slots have kpos = -1 (invisible)."""

    def __init__(self, cache: PagedKVCache, block_tables, ctx_lens, new_lens):
        P, dev = cache.block_size, cache.device
        self.cache = cache
        B, T = len(new_lens), max(new_lens)
        ends = [c + n for c, n in zip(ctx_lens, new_lens)]
        S = max(ends)
        N = -(-S // P)
        for b, table in enumerate(block_tables):
            if len(table) * P < ends[b]:
                raise ValueError(f"row {b}: {len(table)} blocks of {P} slots cannot hold {ends[b]} tokens")
        self.table_BN = torch.tensor([t[:N] + [0] * (N - len(t[:N])) for t in block_tables], device=dev)
        self.table_flat = self.table_BN.flatten()
        # One row whose first N blocks are consecutive (a lone long request usually is: free blocks are handed out
        # in order): its rows are a view of the block store, read in place without a copy.
        first = block_tables[0][:N] if B == 1 else []
        self.run_start = first[0] if B == 1 and first == list(range(first[0], first[0] + N)) else None
        t_T = torch.arange(T, device=dev)
        ctx_B1 = torch.tensor(ctx_lens, device=dev)[:, None]
        new_B1 = torch.tensor(new_lens, device=dev)[:, None]
        self.positions_BT = ctx_B1 + torch.minimum(t_T[None], new_B1 - 1)
        s_S = torch.arange(S, device=dev)
        self.kpos_BS = torch.where(s_S[None] < ctx_B1 + new_B1, s_S[None], -1)
        valid_BT = t_T[None] < new_B1
        self.all_valid = bool(valid_BT.all())
        self.valid_M = valid_BT.flatten().nonzero().squeeze(1)  # flat (b, t) index of each real new token
        pos_M = self.positions_BT.flatten()[self.valid_M]
        row_M = self.valid_M // T
        self.slot_M = self.table_BN[row_M, pos_M // P] * P + pos_M % P  # flat slot in [blocks * P]
        self.B, self.T, self.S, self.N = B, T, S, N

    # -- the model's cache protocol --------------------------------------------------------------------------------
    def next_position(self) -> int:
        raise RuntimeError("the engine passes positions explicitly")

    def key_positions(self, positions_BT: torch.Tensor) -> torch.Tensor:
        if positions_BT.shape != self.positions_BT.shape:
            raise ValueError(f"positions {tuple(positions_BT.shape)} do not match the batch view "
                             f"{tuple(self.positions_BT.shape)}")
        return self.kpos_BS

    def update(self, layer: int, lat_BTW: torch.Tensor, ikey_BTd: torch.Tensor | None, need_latent: bool = True):
        c = self.cache
        if layer >= c.n_layers:
            mtp = ", 1 MTP" if c.n_layers > c.cfg.num_hidden_layers else "; MTP rows only with mtp=True"
            raise ValueError(f"layer {layer}: the paged cache holds {c.n_layers} layers "
                             f"({c.cfg.num_hidden_layers} main{mtp})")
        lat = self._write_and_gather(c.lat[layer], lat_BTW, "lat", gather=need_latent)
        ik = self._write_and_gather(c.ikey[c.ikey_index[layer]], ikey_BTd, "ikey") if ikey_BTd is not None else None
        return lat, ik

    def gather_latent(self, layer: int, idx_BTK: torch.Tensor) -> torch.Tensor:
        """Latent rows [B, T, K, W] of the key slots idx (sparse decode reads only its top-k rows)."""
        P = self.cache.block_size
        b_B11 = torch.arange(self.B, device=idx_BTK.device)[:, None, None]
        slot_BTK = self.table_BN[b_B11, idx_BTK // P] * P + idx_BTK % P
        store = self.cache.lat[layer]
        W = store.shape[-1]
        return store.view(-1, W).index_select(0, slot_BTK.flatten()).view(*idx_BTK.shape, W)

    def _write_and_gather(self, store_NPX: torch.Tensor, new_BTX: torch.Tensor, name: str, gather: bool = True):
        """Write this call's rows; return every row's S slots [B, S, X] (None without gather): a view of the store
        when the block table is one run, else a copy into the cache's scratch (valid until the next layer's)."""
        X = store_NPX.shape[-1]
        src_MX = new_BTX.reshape(-1, X)
        if not self.all_valid:
            src_MX = src_MX[self.valid_M]
        store_NPX.view(-1, X).index_copy_(0, self.slot_M, src_MX.to(store_NPX.dtype))
        if not gather:
            return None
        P = self.cache.block_size
        if self.run_start is not None:
            return store_NPX[self.run_start:self.run_start + self.N].view(1, self.N * P, X)[:, : self.S]
        # [B, N, P, X] -> [B, S, X]: one memcpy per block (index_select, ~1.3x faster than advanced indexing here).
        # Sparse attention skips the latent (gather_latent reads its top-k rows).
        out = self.cache.scratch(name, (self.B * self.N, P * X))
        torch.index_select(store_NPX.view(store_NPX.shape[0], -1), 0, self.table_flat, out=out)
        return out.view(self.B, self.N * P, X)[:, : self.S]
