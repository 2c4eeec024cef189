"""Multi-head Latent Attention (MLA): expanded keys/values for prefill, the absorbed latent form for decode.

Shape legend: B sequences, S new tokens of a sequence, T its context length, N flat tokens
(sequences concatenated), H heads, C kv_lora_rank, R qk_rope_head_dim, Dn qk_nope_head_dim, Dv
v_head_dim, D = Dn + R (query/key head dim), M blocks per block-table row, P cache slots.

Three paths compute one function (they differ in summation order only):

- Full sequence (``batch is None``): x [B, S, D] from position 0; keys and values expanded per head;
  fused causal attention (``scaled_dot_product_attention``, no S x T score tensor). Training,
  scoring, parity with transformers.
- A serving step (``batch`` is an ``AttnBatch``): x [N, D] flat. Every new token's normalized latent
  and roped shared key (C + R values) are written to the paged cache first. Then
  - each prefill chunk (a sequence with more than one new token) takes the expanded form over its
    context, read from the cache through its block table: keys and values for its T positions
    (O(T) memory), fused attention with a lower-right causal mask over query tiles of
    ``PREFILL_TILE`` rows (CPU) or SDPA's causal bias (CUDA), so nothing S x T is ever built.
    Expanded costs ~3.4x fewer FLOPs than absorbed at DeepSeek-V3's shapes.
  - all decodes of the step (one new token each) together take the absorbed form: ``W_UK`` folded
    into the query, scores against the latent cache, ``W_UV`` applied after
    (``kernels.paged_mla_decode``: a Triton kernel that reads the cache through the block table
    with an online softmax on CUDA; the torch reference, which gathers each context padded to the
    longest of the step rounded up to a few sizes, elsewhere).
- ``kv_b_proj`` always multiplies with its dense weight (``MLA.kv_b_weight``, dequantized once and
  cached), never through the W8A8 FP8 GEMM: the full forward, prefill and decode then compute the
  same function. DeepSeek's own code quantizes the kv_b input in its naive attention and not in its
  absorbed one; we take the absorbed numerics everywhere (tests/model/test_attention.py).

RoPE tables are computed once per forward (``Transformer``) and passed to every layer. The batch
metadata (``AttnBatch``) is built once per step; the block table is a device tensor.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from expertpool import kernels
from expertpool.kernels import cpu_attention, cpu_gemm
from expertpool.model.args import ModelArgs
from expertpool.model.layers import Linear, MergedPack, RMSNorm, apply_rope

PREFILL_TILE = 256  # query rows per fused-attention call on CPU: bounds the mask at PREFILL_TILE x T


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
class Prefill:
    """One sequence's chunk of more than one new token."""
    rows: slice                # its new tokens in the flat batch
    slots_T: torch.Tensor      # cache slot of every context position [0, T), T = start + S (device, long)


@dataclass
class Decode:
    """Every sequence of the step with exactly one new token, attended together."""
    rows_B: torch.Tensor | None    # flat row of each decode token (device long); None: rows 0..B-1
    block_table_BM: torch.Tensor   # (device int32)
    seq_lens_B: torch.Tensor       # context length including the new token (device int32)
    max_len: int                   # the torch path's padded bound: the longest context, in whole blocks
                                   # rounded up to a ``kernels.shape_bucket`` (few shapes for oneDNN)
    block_size: int
    _padded: tuple | None = field(default=None, repr=False)

    def padded_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots_BT, valid_BT) of the torch path, built on first use and shared by every layer."""
        if self._padded is None:
            dev = self.block_table_BM.device
            t_T = torch.arange(self.max_len, device=dev)
            valid_BT = t_T[None, :] < self.seq_lens_B[:, None]
            slots_BT = self.block_table_BM[:, t_T // self.block_size].long() * self.block_size + t_T % self.block_size
            self._padded = (slots_BT.masked_fill(~valid_BT, 0), valid_BT)
        return self._padded


@dataclass
class AttnBatch:
    """How the flat tokens of one step map to sequences and cache slots (built once per step)."""

    positions_N: torch.Tensor
    slot_mapping_N: torch.Tensor
    prefills: list[Prefill]
    decode: Decode | None
    cache: PagedLatentCache
    num_tokens: int
    variant_N: torch.Tensor | None = None  # served variant per token (None = all base)

    @classmethod
    def build(cls, cache: PagedLatentCache, block_tables: list[list[int]], start_pos: list[int],
              q_lens: list[int], device="cpu", variants: list[int] | None = None,
              as_decode: list[bool] | None = None) -> "AttnBatch":
        """``as_decode``: per item, whether its tokens run as decode rows, one per token, each seeing
        the context up to itself (output tokens fed back: decodes, speculative verification, a
        replay's output part; the absorbed form reads the latent cache per query instead of expanding
        the whole context), or as a prefill chunk. None: single-token items decode, longer ones prefill."""
        bs = cache.block_size
        positions, slots, prefills = [], [], []
        dec_rows, dec_tables, dec_lens = [], [], []
        off = 0
        for i, (bt, st, q) in enumerate(zip(block_tables, start_pos, q_lens)):
            end = st + q
            assert (end + bs - 1) // bs <= len(bt), f"block table too short for {end} tokens"
            positions.extend(range(st, end))
            slots.extend(bt[p // bs] * bs + p % bs for p in range(st, end))
            if (q == 1 and as_decode is None) or (as_decode is not None and as_decode[i]):
                for r in range(q):  # row r sees positions <= st + r: causal by its context length
                    dec_rows.append(off + r)
                    dec_tables.append(bt[:(st + r + bs) // bs])
                    dec_lens.append(st + r + 1)
            else:
                ctx = torch.tensor(bt[:(end + bs - 1) // bs], dtype=torch.long)
                t_T = torch.arange(end)
                prefills.append(Prefill(slice(off, off + q), (ctx[t_T // bs] * bs + t_T % bs).to(device)))
            off += q
        decode = None
        if dec_rows:
            # the torch path gathers every context padded to max_len: a bucket of whole blocks, so that
            # its two batched products take few shapes (padding is masked: the same function)
            m = kernels.shape_bucket(max(len(t) for t in dec_tables), exact=4, per_octave=2)
            table = torch.tensor([t + [0] * (m - len(t)) for t in dec_tables], dtype=torch.int32)
            contiguous = dec_rows == list(range(len(dec_rows)))
            decode = Decode(None if contiguous else torch.tensor(dec_rows, dtype=torch.long, device=device),
                            table.to(device), torch.tensor(dec_lens, dtype=torch.int32, device=device),
                            m * bs, bs)
        variant_N = None
        if variants is not None and any(variants):
            variant_N = torch.tensor([v for v, q in zip(variants, q_lens) for _ in range(q)], dtype=torch.long,
                                     device=device)
        return cls(torch.tensor(positions, dtype=torch.long, device=device),
                   torch.tensor(slots, dtype=torch.long, device=device), prefills, decode, cache, off, variant_N)


def causal_attention(q_HSD: torch.Tensor, k_HTD: torch.Tensor, v_HTD: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of S queries at the last S of T positions (query i sees keys <= T - S + i), in fused
    kernels only: nothing of size S x T per head is built. q, k, v share the last dim (pad v)."""
    if q_HSD.dim() == 3:  # the fused kernels (CPU flash attention among them) take [B, H, S, D] only
        return causal_attention(q_HSD[None], k_HTD[None], v_HTD[None], scale)[0]
    S, T = q_HSD.shape[-2], k_HTD.shape[-2]
    if S == T:
        return F.scaled_dot_product_attention(q_HSD, k_HTD, v_HTD, is_causal=True, scale=scale)
    from torch.nn.attention.bias import causal_lower_right
    if q_HSD.device.type == "cuda":  # the causal bias dispatches to the fused kernels without a mask tensor
        return F.scaled_dot_product_attention(q_HSD, k_HTD, v_HTD, attn_mask=causal_lower_right(S, T), scale=scale)
    out = torch.empty_like(q_HSD)
    for i0 in range(0, S, PREFILL_TILE):  # CPU: the bias becomes a mask, so bound it to one tile x T
        n = min(PREFILL_TILE, S - i0)
        t = T - S + i0 + n
        out[..., i0:i0 + n, :] = F.scaled_dot_product_attention(
            q_HSD[..., i0:i0 + n, :], k_HTD[..., :t, :], v_HTD[..., :t, :], attn_mask=causal_lower_right(n, t),
            scale=scale)
    return out


def _per_head(x_BHK: torch.Tensor, w_HKN: torch.Tensor, packed: cpu_gemm.Packed | None = None) -> torch.Tensor:
    """``x[b, h] @ w[h]`` for every row b and head h: [B, H, N]. On the CPU with ``packed`` (``w`` in the
    layout of ``kernels.cpu_gemm``), the CPU kernel: x read in place, each row batch-independent.
    Otherwise ``torch.bmm``: on the CPU in bfloat16 (oneDNN), in
    batch-invariant mode (``kernels.set_batch_invariant``), the rows are padded to a multiple of
    ``kernels.ROW_TILE``: the batched GEMM rounds a row differently at some row counts (measured: 3 rows
    against 1), and a decode row must come out the same in any batch for a replay after a failure to
    continue exactly (tests/platform/test_engine_local). fp32 (MKL) keeps its own kernels, which the
    W8A8 path's tests pin down to the last bit."""
    if kernels.fast_paths() and cpu_gemm.applies(x_BHK, packed):
        return cpu_gemm.per_head(x_BHK, packed)
    B = x_BHK.shape[0]
    cpu_bf16 = x_BHK.device.type == "cpu" and x_BHK.dtype != torch.float32
    if cpu_bf16 and kernels.batch_invariant():
        x_BHK, B = kernels.pad_rows(x_BHK, kernels.tile_rows(B))
    return torch.bmm(x_BHK.transpose(0, 1), w_HKN).transpose(0, 1)[:B]


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
            # DeepSeek applies the checkpoint's scale format to these two down-projections' activations
            self.q_a_proj = Linear(d, self.q_lora_rank, act_scale_fmt=args.scale_fmt)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, h * self.qk_dim)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_lora_rank + self.rope_dim, act_scale_fmt=args.scale_fmt)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, h * (self.nope + self.v_dim))
        self.o_proj = Linear(h * self.v_dim, d)
        # (key, dense kv_b weight, W_UK [H, Dn, C], W_UV^T [H, C, Dv], both packed for the CPU kernel or
        # None) for inference
        self._kv_b: tuple | None = None
        self.merged_pack = MergedPack()  # q_a (or q) and kv_a together on CPU

    def merged(self) -> list[Linear]:
        """The down-projections of x, packed together for inference (``layers.MergedPack``)."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        return [first, self.kv_a_proj_with_mqa]

    def _q_kv(self, x):
        """(the query [.., H * (Dn + R)], kv_a_proj_with_mqa's output [.., C + R]) of x."""
        a, kv = self.merged_pack(self.merged(), x)
        if self.q_lora_rank is None:
            return a, kv
        return self.q_b_proj(self.q_a_layernorm(a)), kv

    def kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """kv_b_proj's weight [H * (Dn + Dv), C] dense in ``dtype``: dequantized once and cached for
        inference, taken live when autograd needs the parameter."""
        w = self.kv_b_proj.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return self.kv_b_proj.dense_weight(dtype)
        return self._kv_b_cached(dtype)[0]

    def _kv_b_cached(self, dtype):
        w, s = self.kv_b_proj.weight, self.kv_b_proj.weight_scale_inv
        key = (w.data_ptr(), w._version, dtype, None if s is None else (s.data_ptr(), s._version))
        if self._kv_b is None or self._kv_b[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable outside inference mode
                dense = self.kv_b_proj.dense_weight(dtype).contiguous()
                w_HxC = dense.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
                # the layouts the decode's batched matmuls read without a copy per call
                w_uk = w_HxC[:, :self.nope].contiguous()                               # [H, Dn, C]
                w_uv_t = w_HxC[:, self.nope:].transpose(1, 2).contiguous()            # [H, C, Dv]
                packed = (cpu_gemm.pack(w_uk), cpu_gemm.pack(w_uv_t))
            self._kv_b = (key, dense, w_uk, w_uv_t, packed)
        return self._kv_b[1:]

    def absorbed_weights(self, dtype):
        """(W_UK [H, Dn, C], W_UV^T [H, C, Dv]) for inference (cached)."""
        _, w_uk, w_uv_t, _ = self._kv_b_cached(dtype)
        return w_uk, w_uv_t

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                batch: AttnBatch | None = None) -> torch.Tensor:
        """cos_sin: the RoPE tables of x's positions ([S, R/2] or [B, S, R/2]; [N, R/2] with a batch)."""
        if batch is None:
            return self._forward_full(x, cos_sin)
        return self._forward_batch(x, cos_sin, batch)

    def _expand(self, c_TC, k_pe_TR, dtype, rows: int | None = None):
        """Per-head keys [.., H, T, D] and values padded to D (fused kernels need one head dim) from the
        normalized latent and the roped shared key (``rows``: only the first T = rows of them)."""
        H = self.n_heads
        kv = F.linear(c_TC, self.kv_b_weight(dtype))
        if rows is not None:
            kv, k_pe_TR = kv[:rows], k_pe_TR[:rows]
        kv = kv.unflatten(-1, (H, self.nope + self.v_dim))                         # [.., T, H, Dn+Dv]
        k_nope, v = kv.split([self.nope, self.v_dim], -1)
        k = torch.cat([k_nope, k_pe_TR.unsqueeze(-2).expand(*k_pe_TR.shape[:-1], H, self.rope_dim)], -1)
        v = F.pad(v, (0, self.qk_dim - self.v_dim))
        return k.transpose(-3, -2), v.transpose(-3, -2)                           # [.., H, T, D]

    def _forward_full(self, x, cos_sin):
        B, S, _ = x.shape
        H = self.n_heads
        q, kv = self._q_kv(x)
        q = q.view(B, S, H, self.qk_dim)                                           # [B, S, H, Dn+R]
        q_nope, q_pe = q.split([self.nope, self.rope_dim], -1)
        c, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], -1)
        cos, sin = cos_sin
        q_pe = apply_rope(q_pe, cos[..., None, :], sin[..., None, :])
        k_pe = apply_rope(k_pe, cos, sin)                                          # [B, S, R]
        k, v = self._expand(self.kv_a_layernorm(c), k_pe, x.dtype)                 # [B, H, S, D]
        q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)                          # [B, H, S, D]
        o = causal_attention(q, k, v, self.scale)[..., :self.v_dim]
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * self.v_dim))

    def _forward_batch(self, x_ND, cos_sin, batch: AttnBatch):
        N = x_ND.shape[0]
        H, C = self.n_heads, self.kv_lora_rank
        q, kv = self._q_kv(x_ND)
        q = q.view(N, H, self.qk_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], -1)
        cos, sin = cos_sin                                                         # [N, R/2]
        cache_PC = batch.cache.kv_LPC[self.layer_id]
        norm = self.kv_a_layernorm
        if kernels.fast_paths() and cpu_attention.prep_applies(q, kv, cos, sin, norm.weight, batch.slot_mapping_N,
                                                                cache_PC):
            # RoPE, the latent's norm and the cache write in one call (csrc/mla_prep.c), torch's roundings
            q_pe = cpu_attention.prep(q, self.rope_dim, kv, cos, sin, norm.weight, norm.eps, batch.slot_mapping_N,
                                      cache_PC)                                    # [N, H, R]
        else:
            c, k_pe = kv.split([C, self.rope_dim], -1)
            q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])                    # [N, H, R]
            k_pe = apply_rope(k_pe, cos, sin)                                      # [N, R]
            cache_PC.index_copy_(0, batch.slot_mapping_N, torch.cat([norm(c), k_pe], -1).to(cache_PC.dtype))
        d = batch.decode
        if d is not None and not batch.prefills and d.rows_B is None:             # a pure decode step
            return self.o_proj(self._decode(q_nope, q_pe, cache_PC, d))
        o_NV = x_ND.new_empty(N, H * self.v_dim)
        for p in batch.prefills:
            o_NV[p.rows] = self._prefill(q_nope[p.rows], q_pe[p.rows], cache_PC, p.slots_T, x_ND.dtype)
        if d is not None:
            rows = d.rows_B if d.rows_B is not None else slice(0, d.seq_lens_B.shape[0])
            o_NV[rows] = self._decode(q_nope[rows], q_pe[rows], cache_PC, d)
        return self.o_proj(o_NV)

    def _prefill(self, q_nope_SHd, q_pe_SHR, cache_PC, slots_T, dtype):
        T = slots_T.shape[0]
        # on CPU the context rows are padded to a bucket (slot 0, cut off after the kv_b product): few
        # shapes for oneDNN, which compiles and caches a kernel per shape
        pad = kernels.shape_bucket(T) - T if cache_PC.device.type == "cpu" else 0
        ctx_TC = cache_PC.index_select(0, F.pad(slots_T, (0, pad))).to(dtype)     # [T + pad, C+R]
        k, v = self._expand(ctx_TC[:, :self.kv_lora_rank], ctx_TC[:, self.kv_lora_rank:], dtype, T)  # [H, T, D]
        q = torch.cat([q_nope_SHd, q_pe_SHR], -1).transpose(0, 1)                  # [H, S, D]
        o = causal_attention(q, k, v, self.scale)[..., :self.v_dim]                # [H, S, Dv]
        return o.transpose(0, 1).flatten(1)

    def _decode(self, q_nope_BHd, q_pe_BHR, cache_PC, d: Decode):
        _, w_uk, w_uv_t, (uk_packed, uv_packed) = self._kv_b_cached(q_nope_BHd.dtype)
        q_abs = _per_head(q_nope_BHd, w_uk, uk_packed)                            # [B, H, C]
        o_BHC = kernels.paged_mla_decode(q_abs.contiguous(), q_pe_BHR.contiguous(), cache_PC, d.block_table_BM,
                                         d.seq_lens_B, self.scale, d.block_size, d.max_len, d.padded_slots)
        return _per_head(o_BHC, w_uv_t, uv_packed).flatten(1)                     # [B, H*Dv]
