"""Expert patches: save/read round trip, apply to full, partial (expert-parallel) and FP8 models,
and the errors a user can hit. Pure torch, no Ray."""

import json

import pytest
import torch

from expertpool import kernels
from expertpool.model.checkpoint import load_checkpoint
from expertpool.model.embedded import init_model
from expertpool.model.patch import PatchError, add_variant, apply_patch, base_fingerprint, read_patch, save_patch

LAYER = 1  # first MoE layer of the tiny preset (first_k_dense_replace=1)


def _fake_experts(model, picks: dict[int, list[int]], seed=0):
    g = torch.Generator().manual_seed(seed)
    args = model.args
    F_, D = args.moe_intermediate_size, args.hidden_size
    return {layer: {e: (torch.randn(2 * F_, D, generator=g), torch.randn(D, F_, generator=g)) for e in ids}
            for layer, ids in picks.items()}


@pytest.fixture(scope="module")
def base(tiny_dir):
    return load_checkpoint(tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def patch_dir(tiny_dir, base, tmp_path_factory):
    experts = _fake_experts(base, {1: [0, 5, 200], 2: [7]})
    return save_patch(tmp_path_factory.mktemp("p") / "law", base_model_dir=tiny_dir, domain="law", experts=experts,
                      info={"steps": 3}), experts


def test_round_trip_and_manifest(tiny_dir, patch_dir):
    path, experts = patch_dir
    p = read_patch(path, base_model_dir=tiny_dir)
    assert p.domain == "law" and p.dtype == "float32" and p.num_experts == 4
    assert p.expert_ids == {1: [0, 5, 200], 2: [7]}
    for layer, ex in experts.items():
        for e, (w13, w2) in ex.items():
            assert torch.equal(p.experts[layer][e][0], w13) and torch.equal(p.experts[layer][e][1], w2)
    m = json.loads((path / "manifest.json").read_text())
    assert m["base_model"]["fingerprint"] == base_fingerprint(tiny_dir) and m["info"] == {"steps": 3}
    assert not [f for f in path.parent.iterdir() if f.name.startswith(".")], "atomic temp dir left behind"


def test_apply_patch_to_a_loaded_checkpoint_changes_only_patched_experts(tiny_dir, base, patch_dir):
    path, experts = patch_dir
    patched = load_checkpoint(tiny_dir, dtype=torch.float32)
    apply_patch(patched, read_patch(path), base_model_dir=tiny_dir)
    before, after = base.state_dict(), patched.state_dict()
    assert before.keys() == after.keys()
    for name, t in before.items():
        if ".experts.w13_weight" in name or ".experts.w2_weight" in name:
            continue
        assert torch.equal(t, after[name]), name
    for moe_b, moe_a in zip(base.moe_layers(), patched.moe_layers()):
        touched = sorted(experts.get(moe_b.layer_id, {}))
        keep = [e for e in range(base.args.n_routed_experts) if e not in touched]
        assert torch.equal(moe_b.experts.w13_weight[keep], moe_a.experts.w13_weight[keep])
        assert torch.equal(moe_b.experts.w2_weight[keep], moe_a.experts.w2_weight[keep])
        for e in touched:
            w13, w2 = experts[moe_b.layer_id][e]
            assert torch.equal(moe_a.experts.w13_weight[e], w13) and torch.equal(moe_a.experts.w2_weight[e], w2)


def test_partial_model_applies_only_owned_experts(tiny_dir, patch_dir):
    path, experts = patch_dir
    owned = list(range(128, 256))  # rank 1 of 2
    model = load_checkpoint(tiny_dir, dtype=torch.float32, experts=owned)
    written = apply_patch(model, read_patch(path))
    assert written == {1: [200]}
    local = int(model.moe_layers()[0].experts.global_to_local[200])
    assert torch.equal(model.moe_layers()[0].experts.w13_weight[local], experts[1][200][0])


def test_fp8_model_is_requantized(tiny_dir, patch_dir):
    path, experts = patch_dir
    model = load_checkpoint(tiny_dir, dtype=torch.float32, weight_dtype="fp8")
    apply_patch(model, read_patch(path))
    ex = model.moe_layers()[0].experts
    F_ = model.args.moe_intermediate_size
    w13, w2 = experts[1][5]
    # exact: the patch must be quantized the way the loader quantizes (gate and up separately)
    g, gs = kernels.weight_quant(w13[:F_], scale_fmt=model.args.scale_fmt)
    u, us = kernels.weight_quant(w13[F_:], scale_fmt=model.args.scale_fmt)
    assert torch.equal(ex.w13_weight[5].view(torch.uint8), torch.cat([g, u]).view(torch.uint8))
    assert torch.equal(ex.w13_weight_scale_inv[5], torch.cat([gs, us]))
    d, ds = kernels.weight_quant(w2, scale_fmt=model.args.scale_fmt)
    assert torch.equal(ex.w2_weight[5].view(torch.uint8), d.view(torch.uint8))
    assert torch.equal(ex.w2_weight_scale_inv[5], ds)


def test_variant_routes_like_the_patched_model_and_leaves_the_base(tiny_dir, base, patch_dir):
    """A variant served beside the base computes what the patch applied in place computes; variant 0
    still computes the base."""
    path, _ = patch_dir
    patch = read_patch(path)
    served = load_checkpoint(tiny_dir, dtype=torch.float32)
    patched = load_checkpoint(tiny_dir, dtype=torch.float32)
    apply_patch(patched, patch)
    assert add_variant(served, patch.experts) == 1 and add_variant(served, {}) == 2
    x_TD = torch.randn(512, base.args.hidden_size, generator=torch.Generator().manual_seed(0))
    changed = []
    for moe_s, moe_p, moe_b in zip(served.moe_layers(), patched.moe_layers(), base.moe_layers()):
        if moe_s.layer_id >= base.args.num_hidden_layers:
            continue
        ones_T = torch.ones(512, dtype=torch.long)
        # same rows, same grouping and combine order: bit-equal
        assert torch.equal(moe_s(x_TD, variant_T=ones_T), moe_p(x_TD))
        assert torch.equal(moe_s(x_TD, variant_T=0 * ones_T), moe_b(x_TD))
        assert torch.equal(moe_s(x_TD, variant_T=2 * ones_T), moe_b(x_TD))
        changed.append(not torch.equal(moe_p(x_TD), moe_b(x_TD)))
    assert any(changed), "no token reached a patched expert: the test is vacuous"


def test_variant_on_a_partial_model_keeps_only_owned_experts(tiny_dir, patch_dir):
    path, experts = patch_dir
    model = load_checkpoint(tiny_dir, dtype=torch.float32, experts=list(range(128, 256)))  # rank 1 of 2
    assert add_variant(model, read_patch(path).experts) == 1
    ex = model.moe_layers()[0].experts
    E = model.args.n_routed_experts
    assert ex.num_variants == 2 and ex.num_local == 129 and ex.expert_ids[-1] == 200
    assert int(ex.global_to_local[E + 200]) == 128 and int(ex.global_to_local[E + 201]) == 73
    assert int(ex.global_to_local[E + 5]) == -1
    assert torch.equal(ex.w13_weight[128], experts[1][200][0])


def test_patch_from_another_base_is_rejected(tiny_dir, patch_dir, tmp_path):
    other = init_model("tiny", tmp_path / "other", seed=1)
    with pytest.raises(PatchError, match="trained from base"):
        apply_patch(load_checkpoint(other, dtype=torch.float32), read_patch(patch_dir[0]), base_model_dir=other)


def test_bad_patches_raise_clear_errors(tiny_dir, base, patch_dir, tmp_path):
    path, _ = patch_dir
    with pytest.raises(PatchError, match="manifest.json: not found"):
        read_patch(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(PatchError, match="not valid JSON"):
        read_patch(bad)
    m = json.loads((path / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "format": "something-else"}))
    with pytest.raises(PatchError, match="not an expertpool expert patch"):
        read_patch(bad)
    (bad / "manifest.json").write_text(json.dumps({**m, "layers": {"1": [0, 6]}}))
    (bad / "experts.safetensors").write_bytes((path / "experts.safetensors").read_bytes())
    with pytest.raises(PatchError, match=r"experts.safetensors: tensor 'model.layers.1.mlp.experts.6.gate_proj"):
        read_patch(bad)
    (bad / "experts.safetensors").write_bytes((path / "experts.safetensors").read_bytes()[:100])
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PatchError, match="truncated or corrupt"):
        read_patch(bad)
    with pytest.raises(PatchError, match="no experts to save"):
        save_patch(tmp_path / "empty", base_model_dir=tiny_dir, domain="x", experts={})
    wrong = {1: {0: (torch.zeros(8, 64), torch.zeros(64, 4))}}
    with pytest.raises(PatchError, match="moe_intermediate_size"):
        save_patch(tmp_path / "wrong", base_model_dir=tiny_dir, domain="x", experts=wrong)
