"""Internal consistency of the model: MLA paths, prefill/decode, the exact router, balance tools, MTP."""

import torch

from expertpool.model.args import ConfigError, ModelArgs, preset
from expertpool.model.moe import route, sequence_balance_loss, update_router_bias
from tests.model.helpers import CONFIGS, random_model, stepwise_logits

# fp32 on both sides; the two MLA formulations differ only in summation order (observed ~1e-6)
TOL = 1e-5


def test_expanded_equals_absorbed_and_prefill_then_decode_equals_full_forward():
    for name in ("tiny", "no_q_lora_one_group"):
        m = random_model(name)
        ids = torch.randint(0, m.args.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            full = m(ids)[0]                                            # expanded path
        for prefill in (1, 4, 11):                                      # absorbed: prefill + decode steps
            got = stepwise_logits(m, ids[0].tolist(), prefill=prefill, block_size=3)
            assert (got - full).abs().max().item() < TOL, (name, prefill)


def _reference_route(x, weight, bias, a: ModelArgs):
    """Straightforward per-token router following the DeepSeek-V3 report, written independently."""
    E, G, K = a.n_routed_experts, a.n_group, a.num_experts_per_tok
    per = E // G
    out_ids, out_w = [], []
    for t in range(x.shape[0]):
        s = [1 / (1 + torch.exp(-(x[t].double() @ weight[e].double()))).item() for e in range(E)]
        c = [s[e] + bias[e].item() for e in range(E)]
        gscore = [sum(sorted(c[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: -gscore[g])[:a.topk_group]
        cand = [e for e in range(E) if e // per in kept]
        ids = sorted(cand, key=lambda e: -c[e])[:K]
        w = [s[e] for e in ids]
        tot = sum(w)
        out_ids.append(sorted(ids))
        out_w.append({e: s[e] / tot * a.routed_scaling_factor for e in ids})
    return out_ids, out_w


def test_router_topk_matches_reference_including_dropped_groups():
    for name in ("tiny", "negative_bias"):
        a = CONFIGS[name]
        g = torch.Generator().manual_seed(3)
        x = torch.randn(24, a.hidden_size, generator=g)
        weight = torch.randn(a.n_routed_experts, a.hidden_size, generator=g) * 0.3
        bias = torch.randn(a.n_routed_experts, generator=g) * 0.5 + (-2.0 if name == "negative_bias" else 0.0)
        w, ids, scores = route(x, weight, bias, a)
        ref_ids, ref_w = _reference_route(x, weight, bias, a)
        assert [sorted(r) for r in ids.tolist()] == ref_ids
        for t in range(x.shape[0]):
            for k, e in enumerate(ids[t].tolist()):
                assert abs(w[t, k].item() - ref_w[t][e]) < 1e-5
        assert torch.allclose(w.sum(-1), torch.full((24,), a.routed_scaling_factor), atol=1e-5)
        if name == "negative_bias":  # the case where masking with 0 instead of -inf picks dropped groups
            assert ((scores + bias) < 0).float().mean() > 0.5
            _, ids_nobias, _ = route(x, weight, None, a)
            assert not torch.equal(ids.sort(-1).values, ids_nobias.sort(-1).values)


def test_sequence_balance_loss_and_bias_update():
    a = CONFIGS["negative_bias"]
    B, S = 2, 8
    scores = torch.rand(B * S, a.n_routed_experts, generator=torch.Generator().manual_seed(0))
    # perfectly balanced routing: each expert chosen equally, uniform scores -> loss = alpha
    ids = torch.arange(B * S * a.num_experts_per_tok).remainder(a.n_routed_experts).view(B * S, -1)
    loss_bal = sequence_balance_loss(torch.ones_like(scores), ids, B, 1.0, a)
    assert abs(loss_bal.item() - 1.0) < 1e-5
    # collapsed routing (the same experts selected and scoring highest for every token) costs more
    ids_bad = torch.arange(a.num_experts_per_tok).repeat(B * S, 1)
    scores_bad = scores * 0.1
    scores_bad[:, : a.num_experts_per_tok] += 1.0
    assert sequence_balance_loss(scores_bad, ids_bad, B, 1.0, a) > 2 * loss_bal
    m = random_model("negative_bias")
    gate = m.moe_layers()[0].gate
    before = gate.e_score_correction_bias.clone()
    load = torch.zeros(a.n_routed_experts)
    load[0] = 10
    update_router_bias(gate, load, 0.001)
    delta = gate.e_score_correction_bias - before
    assert abs(delta[0].item() + 0.001) < 1e-6 and abs(delta[1].item() - 0.001) < 1e-6


def test_expert_load_counts_tokens():
    m = random_model("tiny")
    ids = torch.randint(0, m.args.vocab_size, (2, 5))
    with torch.no_grad():
        m(ids)
    for moe in m.moe_layers():
        if moe.layer_id < m.args.num_hidden_layers:
            assert moe.expert_load.sum().item() == 10 * m.args.num_experts_per_tok


def test_mtp_gives_next_next_token_logits():
    m = random_model("tiny")
    assert len(m.model.mtp) == 1
    ids = torch.randint(0, m.args.vocab_size, (2, 9))
    with torch.no_grad():
        h = m.hidden_states(ids)
        logits = m.mtp_logits(h, ids)
    assert logits.shape == (2, 8, m.args.vocab_size) and torch.isfinite(logits).all()
    # row i depends on tokens <= i+1 only (causal): changing token 8 leaves rows 0..6 unchanged
    ids2 = ids.clone()
    ids2[:, 8] = (ids2[:, 8] + 1) % m.args.vocab_size
    with torch.no_grad():
        l2 = m.mtp_logits(m.hidden_states(ids2), ids2)
    assert torch.allclose(logits[:, :7], l2[:, :7], atol=1e-6) and not torch.allclose(logits[:, 7], l2[:, 7])


def test_presets_and_config_errors():
    assert preset("tiny").n_routed_experts == 256 and preset("tiny").n_group == 8
    assert preset("bench-mini").kv_lora_rank == 512
    v3 = preset("deepseek-v3")
    assert abs(v3.num_params() / 1e9 - 671.03) < 0.01
    assert abs(v3.softmax_scale - 0.135234) < 1e-6
    cfg = preset("tiny").to_hf_config()
    for key, value, needle in [("model_type", "llama", "model_type"), ("scoring_func", "relu", "scoring_func"),
                               ("n_group", 7, "n_group"), ("hidden_act", "gelu", "hidden_act")]:
        bad = dict(cfg, **{key: value})
        try:
            ModelArgs.from_hf_config(bad)
        except ConfigError as e:
            assert needle in str(e)
        else:
            raise AssertionError(f"{key}={value} accepted")
    bad = dict(cfg, quantization_config={"quant_method": "fp8", "weight_block_size": [64, 64]})
    try:
        ModelArgs.from_hf_config(bad)
    except ConfigError as e:
        assert "weight_block_size" in str(e)
    # rope_parameters (transformers v5 name) is read like rope_scaling
    v5 = dict(cfg)
    v5["rope_parameters"] = dict(v5.pop("rope_scaling"), rope_type="yarn")
    assert ModelArgs.from_hf_config(v5).rope_scaling == ModelArgs.from_hf_config(cfg).rope_scaling
