"""Stateless batched sampling: a token is a function of (logits, params, seed, position) alone."""

import pytest
import torch
from scipy.stats import chi2

from expertpool.model.sampling import SamplingParams, greedy, sample, uniform


def test_uniform_is_a_pure_function_in_unit_interval():
    us = [uniform(s, p) for s in (0, 1, 2**62 + 5) for p in range(200)]
    assert all(0.0 <= u < 1.0 for u in us)
    assert uniform(7, 11) == uniform(7, 11)
    assert len(set(us)) == len(us)  # distinct inputs, distinct draws (53 bits)


def test_greedy_rows_are_argmax_and_need_no_seed():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [SamplingParams(temperature=0)] * 5, [0] * 5)
    assert out.tolist() == logits.argmax(-1).tolist()


def test_greedy_is_torch_argmax_with_ties_nans_and_bf16_rows():
    """The CPU fast path (numpy's argmax) picks what torch.argmax picks: the first of tied maxima, the
    first NaN, on bf16 and fp16 logits (widened to fp32 first, exactly) their own argmax; non-contiguous
    rows and fp64 too."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 32000, generator=g)
    x[1, 7] = x[1, 900] = x[1, 31999] = 50.0                  # tied maxima: the first wins
    x[2, 5], x[2, 10] = float("nan"), float("nan")           # NaN counts as the maximum, the first one
    x[3] = float("-inf")
    x[4, 123] = float("inf")
    got = greedy(x)
    assert got.dtype == torch.long and got.tolist() == x.argmax(-1).tolist()
    assert got[1] == 7 and got[2] == 5 and got[4] == 123
    b = (x * 4).bfloat16()  # bf16 rounding makes many ties
    assert greedy(b).tolist() == greedy(b.float()).tolist() == b.argmax(-1).tolist()
    assert greedy(x.half()).tolist() == x.half().argmax(-1).tolist()
    assert greedy(x[::2, 1:]).tolist() == x[::2, 1:].argmax(-1).tolist()
    assert greedy(x.double()).tolist() == x.argmax(-1).tolist()


def test_token_depends_only_on_its_own_row():
    """The same row gives the same token alone or in any batch, whatever the other rows ask for
    (another row's larger top_k pads this row's candidates with zeros)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=g) * 3
    params = [SamplingParams(temperature=0.8, seed=11), SamplingParams(temperature=1.2, top_k=5, seed=12),
              SamplingParams(temperature=0.7, top_p=0.8, seed=13), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, top_k=200, top_p=0.95, seed=14), SamplingParams(temperature=1.0, seed=15)]
    positions = [3, 40, 7, 9, 100, 2]
    together = sample(logits, params, positions).tolist()
    for i in range(6):
        assert sample(logits[i:i + 1], [params[i]], [positions[i]]).tolist() == [together[i]]
    perm = [4, 2, 0, 5, 1, 3]
    shuffled = sample(logits[perm], [params[i] for i in perm], [positions[i] for i in perm]).tolist()
    assert shuffled == [together[i] for i in perm]
    # another position (or seed) is another draw
    moved = [sample(logits[5:6], [params[5]], [p]).item() for p in range(40)]
    assert len(set(moved)) > 5


def test_top_k_and_top_p_never_pick_outside_their_set():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 100, generator=g)
    order = logits[0].argsort(descending=True)
    probs = torch.softmax(logits[0], -1)[order]
    nucleus = int((probs.cumsum(0) - probs < 0.6).sum())
    topk_set, topp_set = set(order[:4].tolist()), set(order[:nucleus].tolist())
    for pos in range(300):
        assert sample(logits, [SamplingParams(temperature=1.0, top_k=4, seed=3)], [pos]).item() in topk_set
        assert sample(logits, [SamplingParams(temperature=1.0, top_p=0.6, seed=3)], [pos]).item() in topp_set


def _filtered_softmax(logits: torch.Tensor, temperature: float, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference the sampler must match, for descending ``logits``: (kept tokens, softmax
    renormalized over them) under ``kw``'s top-k, then top-p (the smallest prefix reaching top_p)."""
    p = torch.softmax(logits / temperature, -1)
    keep = torch.ones(logits.numel(), dtype=torch.bool)
    if kw.get("top_k"):
        keep[kw["top_k"]:] = False
    if kw.get("top_p"):
        q = p * keep / (p * keep).sum()
        keep &= (q.cumsum(0) - q) < kw["top_p"]
    return keep, (p * keep) / (p * keep).sum()


@pytest.mark.parametrize("kw", [dict(), dict(top_k=6), dict(top_p=0.7), dict(top_k=8, top_p=0.9)],
                         ids=["plain", "top_k", "top_p", "both"])
def test_frequencies_match_the_filtered_softmax(kw):
    """Chi-square goodness of fit at significance 0.001 against the renormalized softmax over the
    kept set; 20,000 draws over a 12-token vocabulary (every expected count >= 5)."""
    V, N, T = 12, 20_000, 0.9
    logits = torch.linspace(1.5, -1.5, V)
    keep, filtered = _filtered_softmax(logits, T, kw)
    expected = filtered * N
    params = [SamplingParams(temperature=T, seed=5, **kw)] * 1000
    counts = torch.zeros(V)
    for chunk in range(N // 1000):
        toks = sample(logits.expand(1000, V), params, list(range(chunk * 1000, (chunk + 1) * 1000)))
        counts += torch.bincount(toks, minlength=V).float()
    assert counts[~keep].sum() == 0
    k = int(keep.sum())
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert stat < chi2.ppf(0.999, k - 1), (stat, counts.tolist(), expected.tolist())


def test_verify_greedy_accepts_exactly_the_argmax():
    from expertpool.model.sampling import verify

    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(4))
    top = logits.argmax(-1).tolist()
    drafts = [top[0], (top[1] + 1) % 30, top[2], (top[3] + 3) % 30]
    acc, alt = verify(logits, [SamplingParams(temperature=0)] * 4, [5] * 4, drafts)
    assert acc.tolist() == [True, False, True, False] and alt.tolist() == top


@pytest.mark.parametrize("kw", [dict(), dict(top_k=5), dict(top_p=0.8)], ids=["plain", "top_k", "top_p"])
@pytest.mark.parametrize("draft", [0, 3, 11])
def test_speculative_token_frequencies_equal_plain_sampling(kw, draft):
    """The emitted token over 20,000 seeds against the filtered softmax, chi-square at significance
    0.001, for a likely draft (0), a middling one (3) and one outside the top-k / nucleus (11: never
    accepted); the acceptance rate is p(draft), as with the rejection rule; and every emitted token is
    the plain sample of its (seed, position)."""
    from expertpool.model.sampling import verify

    V, N, T = 12, 20_000, 0.9
    logits = torch.linspace(1.5, -1.5, V)
    keep, filtered = _filtered_softmax(logits, T, kw)
    counts, accepted = torch.zeros(V), 0
    for chunk in range(N // 1000):
        params = [SamplingParams(temperature=T, seed=chunk * 1000 + i, **kw) for i in range(1000)]
        acc, toks = verify(logits.expand(1000, V), params, [17] * 1000, [draft] * 1000)
        assert toks.tolist() == sample(logits.expand(1000, V), params, [17] * 1000).tolist()
        counts += torch.bincount(toks, minlength=V).float()
        accepted += int(acc.sum())
    assert counts[~keep].sum() == 0
    expected = filtered * N
    k = int(keep.sum())
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert stat < chi2.ppf(0.999, k - 1), (stat, counts.tolist(), expected.tolist())
    # acceptance ~ Binomial(N, p(d)): within 4.5 standard deviations
    pd = float(filtered[draft])
    assert abs(accepted - N * pd) <= 4.5 * (N * pd * (1 - pd)) ** 0.5 + 1e-9
