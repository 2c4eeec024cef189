"""Shared helpers for model tests: random checkpoints of several DeepSeek-V3 configs."""

import torch

from expertpool.model.args import ModelArgs, YarnArgs, preset
from expertpool.model.attention import AttnBatch, PagedLatentCache
from expertpool.model.checkpoint import save_checkpoint
from expertpool.model.transformer import init_random

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
             num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, max_position_embeddings=256)

CONFIGS = {
    "tiny": preset("tiny"),
    # Moonlight-like: no q compression, a single expert group
    "no_q_lora_one_group": ModelArgs(**SMALL, q_lora_rank=None, n_routed_experts=64, n_shared_experts=2,
                                     num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=2.446),
    # YaRN with mscale != mscale_all_dim, so cos/sin carry an attention factor and softmax an mscale^2
    "yarn_mscale": ModelArgs(**SMALL, q_lora_rank=48, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                             topk_group=2, rope_scaling=YarnArgs(factor=8.0, original_max_position_embeddings=32,
                                                                 mscale=1.0, mscale_all_dim=0.707)),
    # router bias strongly negative: biased selection scores are negative, -inf group masking matters
    "negative_bias": ModelArgs(**SMALL, q_lora_rank=48, n_routed_experts=32, num_experts_per_tok=4, n_group=8,
                               topk_group=3, rope_scaling=YarnArgs(factor=4.0, original_max_position_embeddings=64,
                                                                   mscale=1.0, mscale_all_dim=1.0)),
}
BIAS = {"tiny": (0.0, 0.5), "no_q_lora_one_group": (0.0, 0.3), "yarn_mscale": (0.0, 0.3), "negative_bias": (-2.0, 0.5)}


def random_model(name: str, seed: int = 0):
    args = CONFIGS[name]
    m = init_random(args, seed=seed, std=0.1)
    g = torch.Generator().manual_seed(seed + 100)
    mean, std = BIAS[name]
    for moe in m.moe_layers():
        moe.gate.e_score_correction_bias.copy_(mean + std * torch.randn(args.n_routed_experts, generator=g))
    return m


def make_checkpoint(name: str, out_dir, seed: int = 0, **save_kw):
    m = random_model(name, seed)
    save_kw.setdefault("dtype", torch.float32)
    return save_checkpoint(m, out_dir, **save_kw)


def stepwise_logits(model, ids_S: list[int], prefill: int, block_size: int = 4) -> torch.Tensor:
    """Prefill ``prefill`` tokens through the absorbed path, then decode one token at a time.
    Returns the logits of every position [S, V]."""
    S = len(ids_S)
    nblocks = -(-S // block_size)
    cache = PagedLatentCache(model.args.num_hidden_layers, nblocks + 2, block_size, model.args.kv_cache_dim,
                             dtype=model.compute_dtype)
    table = list(range(nblocks + 1, 0, -1))[:nblocks]  # non-contiguous blocks on purpose
    out = []
    pos = 0
    with torch.no_grad():
        for n in [prefill] + [1] * (S - prefill):
            b = AttnBatch.build(cache, [table], [pos], [n])
            out.append(model.forward_batch(torch.tensor(ids_S[pos:pos + n]), b))
            pos += n
    return torch.cat(out)
