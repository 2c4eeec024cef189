"""Multi-head Latent Attention (MLA) with an expanded path and a weight-absorbed latent-cache path.

Shape legend: B batch, S new tokens per sequence, T context length, N flat tokens (sequences
concatenated), H heads, C kv_lora_rank, R qk_rope_head_dim, Dn qk_nope_head_dim, Dv v_head_dim.

- Expanded path (``batch is None``): x [B, S, D] from position 0, keys/values expanded per head
  through ``kv_b_proj``; causal SDPA. Used for training and full-sequence scoring.
- Absorbed path (``batch`` is an ``AttnBatch``): x [N, D] flat. Only the normalized latent (C) and
  the roped shared key (R) are cached per token, in a paged pool. ``W_UK`` is folded into the query
  and ``W_UV`` applied after attention, so keys and values are never expanded (DeepSeek-V3 "absorb").
  Sequences are grouped by their number of new tokens so decode rows batch together and a prefill
  chunk is not padded against them.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from expertpool.model.args import ModelArgs
from expertpool.model.layers import Linear, RMSNorm, RotaryEmbedding, apply_rope


class PagedLatentCache:
    """Per-layer pool of ``num_blocks * block_size`` token slots, each [C + R] in ``dtype``."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, dim: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        self.num_blocks, self.block_size, self.dim = num_blocks, block_size, dim
        self.kv_LPC = torch.zeros(num_layers, num_blocks * block_size, dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(args: ModelArgs, num_layers: int, dtype: torch.dtype) -> int:
        return num_layers * args.kv_cache_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class _Group:
    token_idx_BS: torch.Tensor     # flat token index of each new token
    slots_BT: torch.Tensor         # cache slot of each context position (0 where padded)
    mask_BST: torch.Tensor         # True where key t is visible to query s


@dataclass
class AttnBatch:
    """How the flat tokens of one forward map to sequences and cache slots (built once per step)."""

    positions_N: torch.Tensor
    slot_mapping_N: torch.Tensor
    groups: list[_Group]
    cache: PagedLatentCache
    num_tokens: int
    variant_N: torch.Tensor | None = None  # served variant per token (None = all base)

    @classmethod
    def build(cls, cache: PagedLatentCache, block_tables: list[list[int]], start_pos: list[int],
              q_lens: list[int], device="cpu", variants: list[int] | None = None) -> "AttnBatch":
        bs = cache.block_size
        positions, slots = [], []
        offsets, off = [], 0
        for bt, st, q in zip(block_tables, start_pos, q_lens):
            assert (st + q + bs - 1) // bs <= len(bt), f"block table too short for {st + q} tokens"
            offsets.append(off)
            off += q
            pos = range(st, st + q)
            positions.extend(pos)
            slots.extend(bt[p // bs] * bs + p % bs for p in pos)
        by_len: dict[int, list[int]] = {}
        for i, q in enumerate(q_lens):
            by_len.setdefault(q, []).append(i)
        groups = []
        for q, seqs in by_len.items():  # one padded group per new-token count (decodes: q = 1)
            n_B = torch.tensor([start_pos[i] + q for i in seqs])
            tmax = int(n_B.max())
            nb = -(-tmax // bs)
            bt_BM = torch.tensor([block_tables[i][:nb] + [0] * (nb - len(block_tables[i][:nb])) for i in seqs],
                                 dtype=torch.long)
            t_T = torch.arange(tmax)
            slots_BT = (bt_BM[:, t_T // bs] * bs + t_T % bs).masked_fill(t_T[None, :] >= n_B[:, None], 0)
            qpos_BS = (n_B - q)[:, None] + torch.arange(q)[None, :]
            tok_BS = torch.tensor([offsets[i] for i in seqs])[:, None] + torch.arange(q)[None, :]
            groups.append(_Group(tok_BS.to(device), slots_BT.to(device),
                                 (t_T[None, None, :] <= qpos_BS[:, :, None]).to(device)))
        variant_N = None
        if variants is not None and any(variants):
            variant_N = torch.tensor([v for v, q in zip(variants, q_lens) for _ in range(q)], dtype=torch.long,
                                     device=device)
        return cls(torch.tensor(positions, dtype=torch.long, device=device),
                   torch.tensor(slots, dtype=torch.long, device=device), groups, cache, off, variant_N)


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = args.q_lora_rank, args.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.qk_dim = self.nope + self.rope_dim
        self.scale = args.softmax_scale
        d, h = args.hidden_size, self.n_heads
        if self.q_lora_rank is None:
            self.q_proj = Linear(d, h * self.qk_dim)
        else:
            self.q_a_proj = Linear(d, self.q_lora_rank)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, h * self.qk_dim)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_lora_rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, h * (self.nope + self.v_dim))
        self.o_proj = Linear(h * self.v_dim, d)

    def _q(self, x):
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, batch: AttnBatch | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if batch is None:
            return self._forward_expanded(x, rope, positions)
        return self._forward_absorbed(x, rope, batch)

    def _forward_expanded(self, x, rope, positions):
        B, S, _ = x.shape
        H = self.n_heads
        q = self._q(x).view(B, S, H, self.qk_dim)                                  # [B, S, H, Dn+R]
        q_nope, q_pe = q.split([self.nope, self.rope_dim], -1)
        kv = self.kv_a_proj_with_mqa(x)
        c, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], -1)
        if positions is None:
            positions = torch.arange(S, device=x.device)
        cos, sin = rope(positions)                                                 # [(B,) S, R/2]
        q_pe = apply_rope(q_pe, cos[..., None, :], sin[..., None, :])
        k_pe = apply_rope(k_pe, cos, sin)                                          # [B, S, R]
        kvb = self.kv_b_proj(self.kv_a_layernorm(c)).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kvb.split([self.nope, self.v_dim], -1)
        q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)                          # [B, H, S, Dn+R]
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope_dim)], -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * self.v_dim))

    def absorbed_weights(self, dtype):
        w = self.kv_b_proj.dense_weight(dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope], w[:, self.nope:]                                 # W_UK [H,Dn,C], W_UV [H,Dv,C]

    def _forward_absorbed(self, x_ND, rope, batch: AttnBatch):
        N = x_ND.shape[0]
        H, C = self.n_heads, self.kv_lora_rank
        q = self._q(x_ND).view(N, H, self.qk_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], -1)
        kv = self.kv_a_proj_with_mqa(x_ND)
        c, k_pe = kv.split([C, self.rope_dim], -1)
        cos, sin = rope(batch.positions_N)                                         # [N, R/2]
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])                        # [N, H, R]
        k_pe = apply_rope(k_pe, cos, sin)                                          # [N, R]
        cache_LPC = batch.cache.kv_LPC
        cache_PC = cache_LPC[self.layer_id]
        cache_PC.index_copy_(0, batch.slot_mapping_N,
                             torch.cat([self.kv_a_layernorm(c), k_pe], -1).to(cache_PC.dtype))
        w_uk, w_uv = self.absorbed_weights(x_ND.dtype)
        q_abs = torch.einsum("nhd,hdc->nhc", q_nope, w_uk)                          # [N, H, C]
        o_NHC = x_ND.new_empty(N, H, C)
        for g in batch.groups:
            ctx_BTC = cache_PC[g.slots_BT].to(x_ND.dtype)                          # [B, T, C+R]
            qa_BSHC = q_abs[g.token_idx_BS]
            qp_BSHR = q_pe[g.token_idx_BS]
            scores = (torch.einsum("bshc,btc->bsht", qa_BSHC, ctx_BTC[..., :C])
                      + torch.einsum("bshr,btr->bsht", qp_BSHR, ctx_BTC[..., C:])) * self.scale
            scores = scores.masked_fill(~g.mask_BST[:, :, None, :], float("-inf"))
            p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x_ND.dtype)
            o_NHC[g.token_idx_BS] = torch.einsum("bsht,btc->bshc", p, ctx_BTC[..., :C])
        o = torch.einsum("nhc,hdc->nhd", o_NHC, w_uv).reshape(N, H * self.v_dim)
        return self.o_proj(o)
