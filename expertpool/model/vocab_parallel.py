"""The output head split by vocabulary over the CPU ranks of an expert-parallel group (serving).

In the expert-parallel layout each rank runs the dense layers for its own sequences (data-parallel
attention), so each would read the whole ``lm_head`` for its few rows: on bench-mini that is 33M of
the ~58M dense parameters a rank reads per decode step, for 8 rows. With ``VocabParallelHead`` rank r
computes the logits of vocabulary slice r for every rank's rows, and the slices go back to each
row's rank, so each rank reads 1/W of the head. SGLang does the same under DP attention by default
(its ``--enable-dp-lm-head`` turns it off).

Three exchanges per call: the row counts, the rows to every rank (an all-gather), and each rank's
logits slices back. The workers use it only with the shared-memory exchange (``model.shm_exchange``):
over gloo those exchanges cost about what the slice saves (60.3 against 63.2 ms a step,
``bench/ep_step.py``), and between hosts they would cost more.
Every rank must call it once per forward, with zero rows if it has none, as with the MoE layers.
The logits of a row are the same products over the same weights as the whole head's; only oneDNN's
blocking of a narrower, taller GEMM may differ (the tests hold the split head to the whole one within
1e-6 in both fp32 and bf16, and the greedy tokens exactly).
"""

import torch
import torch.nn as nn

from expertpool.model.dispatch import GroupExchange
from expertpool.model.layers import Linear


class VocabParallelHead:
    """Callable in place of ``Transformer.lm_head`` on rank ``rank`` of ``world`` (see the module
    docstring). The whole head stays loaded (a re-formed group of another width slices it again); this
    rank's slice is a view of it, pre-packed for oneDNN."""

    def __init__(self, head: Linear, rank: int, world: int, exchange=None, group=None, w8a8: bool = False):
        V = head.out_features
        self.bounds = [r * V // world for r in range(world + 1)]
        self.head, self.rank, self.world = head, rank, world
        self.exchange = exchange if exchange is not None else GroupExchange(group)
        v0, v1 = self.bounds[rank], self.bounds[rank + 1]
        self.shard = Linear(head.in_features, v1 - v0)
        self.shard.weight = nn.Parameter(head.weight.detach()[v0:v1], requires_grad=False)
        self.shard.pack_for_cpu(w8a8)  # int8 under weight_dtype w8a8, as the whole head

    def __call__(self, x_ND: torch.Tensor) -> torch.Tensor:
        W, D, a2a = self.world, x_ND.shape[-1], self.exchange.all_to_all_single
        n = x_ND.shape[0]
        ns_W = torch.empty(W, dtype=torch.long)
        a2a(ns_W, torch.full((W,), n, dtype=torch.long))
        ns = ns_W.tolist()  # every rank's row count
        rows_MD = x_ND.new_empty((sum(ns), D))
        a2a(rows_MD, x_ND.contiguous().repeat(W, 1), ns, [n] * W)  # everyone's rows, in rank order
        part_MV = self.shard(rows_MD)  # this rank's vocabulary slice of every row's logits
        widths = [self.bounds[r + 1] - self.bounds[r] for r in range(W)]
        back = part_MV.new_empty(n * self.head.out_features)
        a2a(back, part_MV.reshape(-1), [n * w for w in widths], [m * widths[self.rank] for m in ns])
        pieces = back.split([n * w for w in widths])
        return torch.cat([p.view(n, w) for p, w in zip(pieces, widths)], dim=1)
