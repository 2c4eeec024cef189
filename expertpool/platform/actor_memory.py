"""Per-actor memory plan: what one expert-parallel actor needs on its GPU, checked before anything loads.

``plan(...)`` adds up, in bytes per actor:

- **weights**: ``model.checkpoint.resident_bytes`` (the loader's own resident-format rule): the
  actor's routed experts (n_routed_experts / actors per MoE layer), the dense part every actor
  replicates (attention with kv_b_proj's cached dense copy, dense MLPs, shared experts, routers,
  norms) and the embedding plus lm_head;
- **KV cache, at least**: one ``max_seq_len`` sequence (fewer and no request fits). After loading,
  the engine gives the KV cache ``serving.kv_cache.gpu_memory_utilization`` of the memory then free,
  less the two headrooms below (``kv_budget``);
- **prefill activations**: the transient peak of a ``max_num_batched_tokens`` prefill chunk over a
  ``max_seq_len`` context (``prefill_activation_bytes``);
- **communication**: the chunk's all-to-all send, receive and return buffers plus ``NCCL_RESERVE``;
- **runtime**: ``RUNTIME_RESERVE`` (CUDA context, cuBLAS/Triton workspaces, allocator slack).

``check`` refuses a plan over the GPU's size with the numbers and what to change: the smallest actor
count that fits (a divisor of n_routed_experts) and the GPU size the current count needs.
``validate_against_model`` runs it when ``pool.actor_resources.gpu_memory_gb`` is declared; every GPU
actor runs it against its own device before loading. No Ray here.

The estimates are on paper; the constants are stated allowances, not measurements (no GPU has run
this code yet: bench/gpu_check.py prints the measured use beside the plan).
"""

from dataclasses import dataclass

import torch

from expertpool.model.args import ModelArgs
from expertpool.model.checkpoint import resident_bytes

GIB = 1024 ** 3
# NCCL's channel buffers (NCCL_BUFFSIZE 4 MiB per channel and peer, up to 32 channels) and its
# proxy/workspace memory: an allowance for all-to-all between a few to 16 peers
NCCL_RESERVE = 1 * GIB
# CUDA context (~0.5 GiB on Hopper), cuBLAS and Triton workspaces, PyTorch caching-allocator slack
RUNTIME_RESERVE = 2 * GIB


@dataclass(frozen=True)
class MemoryPlan:
    actors: int
    experts_per_actor: int
    weights: dict[str, int]       # resident_bytes: experts, dense, embed_head
    kv_min: int                   # KV cache of one max_seq_len sequence
    kv_bytes_per_token: int
    activations: int
    comm: int
    runtime: int

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def headroom(self) -> int:
        """What stays free beside the weights and the KV cache: activations and communication."""
        return self.activations + self.comm

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_min + self.activations + self.comm + self.runtime

    def describe(self) -> str:
        w = self.weights
        return (f"{self.total / GIB:.1f} GiB each: weights {self.weight_bytes / GIB:.1f} GiB (routed experts "
                f"{w['experts'] / GIB:.1f}, dense {w['dense'] / GIB:.1f}, embedding+head {w['embed_head'] / GIB:.1f}), "
                f"KV for one sequence {self.kv_min / GIB:.2f}, prefill activations {self.activations / GIB:.2f}, "
                f"communication {self.comm / GIB:.2f}, runtime {self.runtime / GIB:.1f}")


def prefill_activation_bytes(args: ModelArgs, tokens: int, context: int, act_bytes: int, sampled_rows: int) -> int:
    """Transient peak of one prefill chunk of ``tokens`` tokens over a ``context``-token sequence, per
    actor: the larger of the attention's and the MoE's working sets, plus the hidden states kept
    across the layer and the logits of the ``sampled_rows`` rows (compute dtype and fp32).
    Attention (expanded form, one chunk): the context's keys and values expanded per head (k and v
    padded to the q/k head dim, and the kv_b product) and the chunk's queries and output. MoE (fused
    path): the chunk's (token, slot) rows of h in the compute dtype and quantized, the per-pair
    output, and the fp32 slot sum."""
    d, h = args.hidden_size, args.num_attention_heads
    qk, dv = args.qk_head_dim, args.qk_nope_head_dim + args.v_head_dim
    attention = (context * h * (2 * qk + dv) + 2 * tokens * h * qk) * act_bytes
    pairs = tokens * args.num_experts_per_tok
    f_pad = -(-args.moe_intermediate_size // 128) * 128
    moe = pairs * f_pad * (act_bytes + 1) + pairs * d * act_bytes + tokens * d * (4 + 1)
    hidden = 6 * tokens * d * act_bytes
    return max(attention, moe) + hidden + sampled_rows * args.vocab_size * (act_bytes + 4)


def comm_bytes(args: ModelArgs, tokens: int, actors: int, act_bytes: int) -> int:
    """All-to-all buffers of one chunk (rows out, rows in, results back) and NCCL's own; 0 for one actor."""
    if actors == 1:
        return 0
    pairs = tokens * args.num_experts_per_tok
    return 3 * pairs * args.hidden_size * act_bytes + 2 * pairs * 8 + NCCL_RESERVE


def plan(args: ModelArgs, actors: int, *, weight_dtype: str | None, dtype: torch.dtype, max_seq_len: int,
         max_num_batched_tokens: int, max_batch_size: int, redundant: int = 0) -> MemoryPlan:
    """``redundant``: the group's redundant expert slots (``pool.redundant_experts``); the plan is that
    of the actor holding the most slots."""
    from expertpool.platform.placement import slots_per_rank, usable_redundant

    act_bytes = torch.empty((), dtype=dtype).element_size()
    kv_per_token = args.num_hidden_layers * args.kv_cache_dim * act_bytes
    E = args.n_routed_experts
    per_actor = max(slots_per_rank(E, usable_redundant(E, redundant, actors), actors)) if actors <= E else 1
    return MemoryPlan(
        actors=actors, experts_per_actor=per_actor,
        weights=resident_bytes(args, per_actor, weight_dtype, dtype),
        kv_min=max_seq_len * kv_per_token, kv_bytes_per_token=kv_per_token,
        activations=prefill_activation_bytes(args, min(max_num_batched_tokens, max_seq_len), max_seq_len, act_bytes,
                                             -(-max_batch_size // actors)),
        comm=comm_bytes(args, max_num_batched_tokens, actors, act_bytes), runtime=RUNTIME_RESERVE)


def check(args: ModelArgs, actors: int, capacity_bytes: int, *, where: str, **plan_kw) -> MemoryPlan:
    """The plan for ``actors``; raises ``ValueError`` naming what to change when it exceeds
    ``capacity_bytes`` (``where`` says whose capacity: a config field or a device)."""
    p = plan(args, actors, **plan_kw)
    if p.total <= capacity_bytes:
        return p
    fits = [n for n in range(actors + 1, args.n_routed_experts + 1)
            if args.n_routed_experts % n == 0 and plan(args, n, **plan_kw).total <= capacity_bytes]
    fixes = []
    if fits:
        fixes.append(f"use {fits[0]} actors ({plan(args, fits[0], **plan_kw).total / GIB:.1f} GiB each)")
    fixes.append(f"GPUs with >= {-(-p.total // GIB)} GiB")
    raise ValueError(f"{actors} actors need {p.describe()}; {where} has {capacity_bytes / GIB:.1f} GiB: "
                     + " or ".join(fixes))


def kv_budget(free_bytes: int, utilization: float, p: MemoryPlan) -> int:
    """KV-cache bytes after loading: ``utilization`` of the free memory, less the activation and
    communication headroom (the runtime reserve is already spent or inside the free figure)."""
    return max(0, int(utilization * free_bytes) - p.headroom)
