"""Grouped FP8 MoE (``fused_moe``) under TRITON_INTERPRET=1 (run via test_kernels_interpreter.py).

Oracles, both float64 (kernel_oracles.py):
- ``moe_w8a8_f64``: the same W8A8 recipe per (token, slot). The kernel differs by fp32
  accumulation order, which can move an h value across an e4m3 rounding boundary and flip one
  code (one step = 2**-4 of that element, a ~1e-3 relative change of the output on these sizes);
  the bound 2e-3 allows a flip while an indexing or scale bug (order-1 errors) fails it.
- ``moe_w8a16_f64``: unquantized activations; x and h are both quantized by the kernel, so the
  bound is ``E4M3_REL_ERROR_BOUND`` (two e4m3 roundings in quadrature, reason in kernel_oracles).
"""

import pytest
import torch

from tests.kernels.kernel_oracles import (E4M3_REL_ERROR_BOUND, make_moe, moe_w8a8_f64, moe_w8a16_f64, rel_err,
                            requires_interpreter)

pytest.importorskip("triton")
pytestmark = requires_interpreter

from expertpool.kernels import fused_moe as fm  # noqa: E402  (after the triton check)

W8A8_ORACLE_BOUND = 2e-3
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32}


@pytest.mark.parametrize("t,top_k,e,f", [(8, 2, 4, 96), (20, 3, 3, 128), (1, 2, 4, 128)])
def test_fused_moe_matches_float64(gen, t, top_k, e, f):
    layer = make_moe(gen, t=t, top_k=top_k, e=e, d=256, f=f, idle_expert=e - 1)
    x, ids, weights, w13_q, w13_s, w2_q, w2_s = layer
    w13_q[e - 1] = float("nan")  # the idle expert has no tokens: never read
    w2_q[e - 1] = float("nan")
    y = fm.fused_moe(*layer, config=SMALL_TILES)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert rel_err(y, moe_w8a8_f64(*layer)) < W8A8_ORACLE_BOUND
    assert rel_err(y, moe_w8a16_f64(*layer)) < E4M3_REL_ERROR_BOUND


def test_fused_moe_bf16_default_config(gen):
    x, *rest = make_moe(gen, t=4, top_k=2, e=2, d=256, f=128)
    y = fm.fused_moe(x.to(torch.bfloat16), *rest)  # JSON default config (BLOCK_M 16)
    assert y.dtype == torch.bfloat16
    # bf16 h and output add ~2**-7 each (interpreter truncation) on top of the e4m3 bound.
    assert rel_err(y, moe_w8a16_f64(x, *rest)) < E4M3_REL_ERROR_BOUND + 2 * 2.0 ** -7


def test_fused_moe_zero_activations_and_remote_slots(gen):
    x, ids, *rest = make_moe(gen, t=4, top_k=2, e=2, d=128, f=128)
    y = fm.fused_moe(torch.zeros_like(x), ids, *rest, config=SMALL_TILES)
    assert torch.equal(y, torch.zeros_like(x))  # no NaN from all-zero groups
    y = fm.fused_moe(x, torch.full_like(ids, -1), *rest, config=SMALL_TILES)
    assert torch.equal(y, torch.zeros_like(x))


def test_launch_count_is_constant(gen, monkeypatch):
    """act_quant(x), gate/up, act_quant(h), down: 4 Triton launches, however many experts run."""
    launches = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    from expertpool.kernels import quant

    monkeypatch.setattr(fm, "_fused_moe_kernel", Counting(fm._fused_moe_kernel))
    monkeypatch.setattr(quant, "_block_quant_kernel", Counting(quant._block_quant_kernel))
    layer = list(make_moe(gen, t=8, top_k=2, e=6, d=128, f=128))
    counts = []
    for active in (1, 6):
        layer[1] = torch.randint(0, active, (8, 2), generator=gen)
        launches.clear()
        fm.fused_moe(*layer, config=SMALL_TILES)
        counts.append(len(launches))
    assert counts == [4, 4]


def test_align_block_size_layout():
    ids = torch.tensor([[2, 0], [2, -1], [0, 2], [2, 2]])  # expert 1 idle, one remote slot
    sorted_pair, block_expert, num_padded = fm.moe_align_block_size(ids, num_experts=3, block_m=4)
    p = ids.numel()
    assert int(num_padded) == 4 + 8  # expert 0: 2 pairs -> 4 rows; expert 2: 5 pairs -> 8 rows
    assert sorted_pair[:4].tolist() == [1, 4, p, p]
    assert sorted_pair[4:9].tolist() == [0, 2, 5, 6, 7] and sorted_pair[9:12].tolist() == [p] * 3
    assert block_expert[:3].tolist() == [0, 2, 2]
    assert (sorted_pair[12:] == p).all()
    assert sorted_pair.numel() == block_expert.numel() * 4
    assert sorted_pair.numel() >= p + min(3, p) * 3  # the no-sync bound
    sorted_pair, _, num_padded = fm.moe_align_block_size(torch.tensor([[0, 7]]), 3, 4)
    assert int(num_padded) == 4 and sorted_pair[:4].tolist() == [0, 2, 2, 2]  # id >= E: remote


def test_fused_moe_rejects_bad_inputs(gen):
    x, ids, w, w13_q, w13_s, w2_q, w2_s = make_moe(gen, t=2, top_k=2, e=2, d=128, f=128)
    with pytest.raises(TypeError, match="x_TD must be"):
        fm.fused_moe(x.long(), ids, w, w13_q, w13_s, w2_q, w2_s)
    with pytest.raises(TypeError, match="w13_E2FD must be torch.float8_e4m3fn"):
        fm.fused_moe(x, ids, w, w13_q.float(), w13_s, w2_q, w2_s)
    with pytest.raises(TypeError, match="topk_ids_TK must be an integer"):
        fm.fused_moe(x, ids.float(), w, w13_q, w13_s, w2_q, w2_s)
    with pytest.raises(ValueError, match="w13_scale must be"):
        fm.fused_moe(x, ids, w, w13_q, w13_s[:, :1], w2_q, w2_s)
    with pytest.raises(ValueError, match="w2_EDF must be"):
        fm.fused_moe(x, ids, w, w13_q, w13_s, w2_q[:, :, :64], w2_s)
    with pytest.raises(ValueError, match="D=100 must be a multiple"):
        fm.fused_moe(x[:, :100], ids, w, w13_q, w13_s, w2_q, w2_s)
    with pytest.raises(ValueError, match="w2_EDF and its scale must be 3-D with unit stride"):
        fm.fused_moe(x, ids, w, w13_q, w13_s, w2_q.transpose(1, 2).contiguous().transpose(1, 2),
                     w2_s)


@pytest.mark.parametrize("t,k,e,bm", [(4, 2, 3, 4), (9, 3, 5, 16), (40, 8, 16, 16), (1, 6, 64, 16)])
def test_align_kernel_equals_torch_align(gen, t, k, e, bm):
    """The one-launch alignment gives exactly the torch version's layout (stable order within each
    expert's run, sentinels, block labels, padded length), with remote (-1) and out-of-range slots."""
    ids = torch.randint(-1, e + 1, (t, k), generator=gen)  # -1 and e: not owned here
    want = fm.moe_align_block_size(ids, e, bm)
    got = fm.moe_align(ids, e, bm)
    n = int(want[2])
    assert int(got[2]) == n
    assert torch.equal(got[0][:n], want[0][:n]) and torch.equal(got[1][: -(-n // bm)], want[1][: -(-n // bm)])
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
