"""Decode steps from static buffers, one CUDA graph per batch bucket.

A decode step (every sequence exactly one new token) of B sequences runs in the smallest bucket
b >= B. Its inputs are written in place into preallocated device buffers (tokens, positions, cache
slots, the block table and the context lengths); rows B..b-1 are padding: token 0 at position 0
of a scratch block the engine never hands out, context length 1, so they compute something finite
and write only the scratch block. The forward of bucket b is captured once as a CUDA graph and
replayed, so a step costs a few host-to-device copies and one graph launch instead of thousands of
kernel launches. Without CUDA (CPU tests), the same buffers run the same forward eagerly: that is
how the padding and the in-place updates are tested without a GPU.

Eligible (``graph_safe``) only where every host-side decision of the forward is fixed and nothing
reads the device back: FP8 experts on the Triton path (fused router, one-launch alignment,
``fused_moe``; the torch expert loop reads its per-expert counts), the local dispatcher (the
all-to-all reads split sizes, so an expert-parallel group steps eagerly: capturing pieces between
the all-to-alls is not done), no served variants in the step.

Shape legend: B sequences of the step, b its bucket, M blocks per block-table row, V vocabulary.
"""

import torch

from expertpool import kernels
from expertpool.model.attention import AttnBatch, Decode, PagedLatentCache
from expertpool.model.dispatch import LocalDispatcher


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: powers of two below ``max_batch``, and ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def graph_safe(model) -> tuple[bool, str]:
    """(whether a decode step of ``model`` can be captured, the reason)."""
    device = model.lm_head.weight.device
    for moe in model.moe_layers():
        if not isinstance(moe.dispatcher, LocalDispatcher):
            return False, "expert-parallel all-to-all reads split sizes on the host"
        if moe.experts.w13_weight.dtype != torch.float8_e4m3fn:
            return False, "non-FP8 experts run the torch expert loop, which reads per-expert counts"
        if kernels.select_backend(device)[0] != "triton":
            return False, "the Triton kernels are not selected on this device"
    return True, "sync-free FP8 decode on the Triton path, local experts"


class DecodeGraphs:
    def __init__(self, model, cache: PagedLatentCache, max_blocks: int, buckets: list[int], scratch_block: int,
                 capture: bool):
        self.model, self.cache = model, cache
        self.buckets = sorted(buckets)
        self.bs, self.max_blocks, self.scratch = cache.block_size, max_blocks, scratch_block
        self.capture = capture
        dev = cache.kv_LPC.device
        b = self.buckets[-1]
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slots = torch.full((b,), scratch_block * self.bs, dtype=torch.long, device=dev)
        self.table = torch.full((b, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.lens = torch.ones(b, dtype=torch.int32, device=dev)
        self._pin = dev.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _batch(self, b: int) -> AttnBatch:
        decode = Decode(None, self.table[:b], self.lens[:b], self.max_blocks * self.bs, self.bs)
        return AttnBatch(self.positions[:b], self.slots[:b], [], decode, self.cache, b)

    def _forward(self, b: int) -> torch.Tensor:
        return self.model.forward_batch(self.tokens[:b], self._batch(b))

    def _write(self, tokens: list[int], start_pos: list[int], block_tables: list[list[int]], b: int) -> None:
        """The step's inputs into rows 0..B-1 of the static buffers and padding into B..b-1 (in place)."""
        B, bs, M = len(tokens), self.bs, self.max_blocks
        pad = b - B
        pos = list(start_pos) + [0] * pad
        table = torch.full((b, M), self.scratch, dtype=torch.int32)
        for i, bt in enumerate(block_tables):
            n = -(-(start_pos[i] + 1) // bs)
            assert n <= M, f"context of {start_pos[i] + 1} tokens exceeds the graph's {M} blocks"
            table[i, :n] = torch.tensor(bt[:n], dtype=torch.int32)
        host = [torch.tensor(list(tokens) + [0] * pad, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                torch.tensor([bt[p // bs] * bs + p % bs for bt, p in zip(block_tables, start_pos)]
                             + [self.scratch * bs] * pad, dtype=torch.long),
                table, torch.tensor([p + 1 for p in start_pos] + [1] * pad, dtype=torch.int32)]
        for dst, src in zip((self.tokens, self.positions, self.slots, self.table, self.lens), host):
            dst[:b].copy_(src.pin_memory() if self._pin else src, non_blocking=self._pin)

    def _capture(self, b: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm on a side stream before capture (allocator, cuBLAS handles)
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[b] = self._forward(b)
        self.graphs[b] = graph

    def capture_all(self) -> int:
        """Capture every bucket, largest first (the pool then fits the smaller ones). Returns how many."""
        if self.capture:
            for b in sorted(self.buckets, reverse=True):
                self._write([0] * b, [0] * b, [[self.scratch]] * b, b)
                self._capture(b)
        return len(self.graphs)

    def run(self, tokens: list[int], start_pos: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [B, V] of a decode step (one new token per sequence, at ``start_pos``)."""
        B = len(tokens)
        b = self.bucket(B)
        assert b is not None, f"{B} sequences exceed the largest bucket {self.buckets[-1]}"
        self._write(tokens, start_pos, block_tables, b)
        if not self.capture:
            return self._forward(b)[:B]
        if b not in self.graphs:
            self._capture(b)
            self._write(tokens, start_pos, block_tables, b)  # the capture's warm-up ran on these buffers
        self.graphs[b].replay()
        return self.outputs[b][:B]
