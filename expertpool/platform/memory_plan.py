"""The per-worker memory plan of a fine-tuning job, checked before any worker starts.

``train_memory_plan(job, args)`` estimates what one Ray Train worker holds at the peak of a step,
in four parts, from the architecture (``ModelArgs``) and the job, with the trainer's formats
(``jobs.train``, ``jobs.esft``):

- frozen weights, in their stored format: ESFT keeps FP8 linears FP8 (1 byte, scales ~0.02%) and
  loads the rest in the compute dtype (bf16 on GPU, fp32 on CPU): the dense weights, replicated on
  every worker, and the worker's share of the routed experts (E / workers);
- trainable weights with their gradients, fp32: ESFT's selected experts; full fine-tuning's dense
  weights (gradients partitioned under ZeRO 2) and the worker's experts;
- optimizer state, fp32 AdamW moments (and ZeRO's fp32 partition of the dense weights);
- activations autograd keeps for one step of batch_size / workers sequences of seq_len tokens
  (attention projections, the MoE dispatch rows and expert intermediates, the fp32 logits for the
  loss; the MTP layer when it has a loss). Flash-style attention on GPU keeps no seq_len^2 term.

ESFT selects its experts only once it has scored them, so the plan assumes the most it can take: per
layer the fewest experts whose normalized scores reach p number at most ceil(p * E) (reached when
scores are uniform, as a balanced router makes them), spread evenly over the workers. Everything
else is exact parameter arithmetic; activations are an estimate (within a few tens of percent of a
profile), which the headroom absorbs: a job fits when the total is at most ``HEADROOM`` of
``gpu x gpu_memory_gb`` (the rest: the CUDA context, NCCL buffers, allocator fragmentation). GPU
jobs that do not fit are refused with the fix; CPU jobs get the plan printed, unchecked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertpool.model.args import ModelArgs
from expertpool.platform.config_base import GIB
from expertpool.platform.train_config import TrainJobConfig

HEADROOM = 0.9
ADAM_MOMENTS = 8  # bytes per trainable parameter: exp_avg + exp_avg_sq in fp32
FP32 = 4


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of the architecture."""
    embed_head: int      # embedding + lm_head (never FP8)
    dense_linear: int    # attention, dense MLPs, shared experts, MTP projection: FP8 in FP8 checkpoints
    small: int           # norms, router weights and biases
    expert: int          # one routed expert
    moe_layers: int      # main MoE layers + MTP MoE layers

    @property
    def dense(self) -> int:
        return self.embed_head + self.dense_linear + self.small


def sizes(a: ModelArgs) -> Sizes:
    D, H = a.hidden_size, a.num_attention_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = D * a.q_lora_rank + a.q_lora_rank * H * qk if a.q_lora_rank else D * H * qk
    attn = q + D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) \
        + H * a.v_head_dim * D
    layers = a.num_hidden_layers + a.num_nextn_predict_layers
    dense_layers = min(a.first_k_dense_replace, a.num_hidden_layers)
    moe_layers = layers - dense_layers
    mlp = dense_layers * 3 * D * a.intermediate_size + moe_layers * 3 * D * a.moe_intermediate_size * a.n_shared_experts
    mtp = a.num_nextn_predict_layers * 2 * D * D  # eh_proj
    small = layers * (2 * D + (a.q_lora_rank or 0) + a.kv_lora_rank) + moe_layers * a.n_routed_experts * (D + 1) \
        + D + a.num_nextn_predict_layers * 3 * D
    return Sizes(embed_head=2 * a.vocab_size * D, dense_linear=layers * attn + mlp + mtp, small=small,
                 expert=3 * D * a.moe_intermediate_size, moe_layers=moe_layers)


@dataclass(frozen=True)
class MemoryPlan:
    device: str                # "GPU" or "CPU"
    frozen: float              # bytes
    trainable: float
    optimizer: float
    activations: float
    tokens: int                # tokens per worker per step
    budget: float | None       # bytes a worker may use (GPU jobs), None = unchecked
    problem: str | None        # why the job cannot fit, with the fix; None = fits or unchecked

    @property
    def total(self) -> float:
        return self.frozen + self.trainable + self.optimizer + self.activations

    def describe(self) -> str:
        gib = [f"{x / GIB:.3g}" for x in (self.total, self.frozen, self.trainable, self.optimizer, self.activations)]
        fit = "" if self.budget is None else f" of {self.budget / GIB:.3g} GiB"
        return (f"~{gib[0]} GiB per worker{fit} on {self.device} (frozen weights {gib[1]}, trainable weights and "
                f"gradients {gib[2]}, optimizer state {gib[3]}, activations for {self.tokens} tokens {gib[4]})")


def activation_bytes(a: ModelArgs, tokens: int, seq_len: int, elem: int, with_mtp: bool, gpu: bool) -> float:
    D, H, K, F = a.hidden_size, a.num_attention_heads, a.num_experts_per_tok, a.moe_intermediate_size
    attn = 3 * D + (a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_rope_head_dim \
        + H * (3 * a.qk_nope_head_dim + 2 * a.qk_rope_head_dim + 3 * a.v_head_dim)
    per_token_attn = attn * elem + (0 if gpu else H * seq_len * FP32)  # CPU SDPA keeps the score matrix
    # the rows each rank receives and sends back (K per token) and each expert's inputs and SwiGLU halves
    moe = K * (2 * D + 4 * F) * elem + 3 * F * a.n_shared_experts * elem + 2 * a.n_routed_experts * FP32
    dense_mlp = (3 * a.intermediate_size + D) * elem
    dense_layers = min(a.first_k_dense_replace, a.num_hidden_layers)
    layers = dense_layers * (per_token_attn + dense_mlp) + (a.num_hidden_layers - dense_layers) * (per_token_attn + moe)
    logits = a.vocab_size * (elem + 2 * FP32)  # the logits, their fp32 copy for the loss, its gradient
    mtp = (per_token_attn + moe + logits) * a.num_nextn_predict_layers if with_mtp else 0
    return float(tokens * (layers + logits + mtp))


def train_memory_plan(job: TrainJobConfig, a: ModelArgs) -> MemoryPlan:
    """The plan of ``job`` on the model ``a`` (see the module docstring)."""
    s = sizes(a)
    res = job.worker_resources
    gpu = res.gpu > 0
    elem = 2 if gpu else FP32  # the compute dtype: bf16 on GPU
    W = job.workers
    owned = math.ceil(a.n_routed_experts / W)
    layers_with_experts = s.moe_layers
    if job.mode in ("esft", "mtp"):
        linear_bytes = 1 if a.fp8 else elem
        frozen = s.embed_head * elem + s.dense_linear * linear_bytes + s.small * FP32 \
            + layers_with_experts * owned * s.expert * linear_bytes
        n_mtp = a.num_nextn_predict_layers if job.mode == "mtp" or job.mtp_loss_weight > 0 else 0
        # the MTP module's non-expert tensors in fp32 (attention, shared experts, eh_proj, norms)
        mtp_dense = n_mtp * (s.dense_linear / max(1, a.num_hidden_layers + a.num_nextn_predict_layers)
                             + 2 * a.hidden_size * a.hidden_size)
        if job.mode == "mtp":
            selected = owned * n_mtp * s.expert
        else:
            selected = math.ceil(math.ceil(job.esft.p * a.n_routed_experts) / W) * (a.num_hidden_layers + n_mtp) \
                * s.expert
        trainable = (selected + mtp_dense) * 2 * FP32  # fp32 master + gradient
        optimizer = (selected + mtp_dense) * ADAM_MOMENTS
    else:
        frozen = 0.0
        experts = layers_with_experts * owned * s.expert
        dense_grads = s.dense * FP32 / (W if job.zero_stage == 2 else 1)
        trainable = s.dense * FP32 + dense_grads + experts * 2 * FP32
        dense_opt = s.dense * (ADAM_MOMENTS + FP32) / W if job.zero_stage >= 1 else s.dense * ADAM_MOMENTS
        optimizer = dense_opt + experts * ADAM_MOMENTS
    tokens = job.batch_size // W * job.seq_len
    acts = activation_bytes(a, tokens, job.seq_len, elem, job.mtp_loss_weight > 0 or job.mode == "mtp", gpu)
    budget = HEADROOM * res.gpu * res.gpu_memory_gb * GIB if gpu and res.gpu_memory_gb else None
    plan = MemoryPlan("GPU" if gpu else "CPU", frozen, trainable, optimizer, acts, tokens, budget, None)
    if budget is not None and plan.total > budget:
        fixes = [f"add workers (each holds 1/workers of the experts: {owned} now)",
                 "lower batch_size or seq_len" if acts > 0.2 * plan.total else None,
                 "lower esft.p" if job.mode == "esft" else "use mode: esft (only selected experts train)",
                 "or use GPUs with more memory"]
        problem = (f"needs {plan.describe()}, more than {HEADROOM:.0%} of worker_resources.gpu x gpu_memory_gb "
                   f"({res.gpu:g} x {res.gpu_memory_gb:g} GiB); " + ", ".join(f for f in fixes if f))
        plan = MemoryPlan(plan.device, frozen, trainable, optimizer, acts, tokens, budget, problem)
    return plan
