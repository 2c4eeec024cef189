"""MLA over the paged cache: prefill chunks (expanded, fused attention) and decodes (absorbed, through
the block table) against the formula the serving path used before (absorbed, every score
materialized), the prefill's peak memory, measured, and the few oneDNN kernel shapes a serving
workload takes (each one costs resident memory)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from expertpool.model.attention import AttnBatch, PagedLatentCache
from expertpool.model.layers import apply_rope
from tests.model.helpers import random_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def materialized_absorbed(mla, x_ND, cos_sin, cache_PC, batch: AttnBatch, seqs):
    """The attention of the previous serving path, kept here as the oracle: absorbed form, per
    sequence, the whole [S, H, T] score tensor built, masked with -inf, softmax in fp32. ``seqs``:
    (rows, context slots, start) per sequence. Reads the cache the new path already wrote."""
    N, H, C = x_ND.shape[0], mla.n_heads, mla.kv_lora_rank
    q = (mla.q_proj(x_ND) if mla.q_lora_rank is None
         else mla.q_b_proj(mla.q_a_layernorm(mla.q_a_proj(x_ND)))).view(N, H, mla.qk_dim)
    q_nope, q_pe = q.split([mla.nope, mla.rope_dim], -1)
    cos, sin = cos_sin
    q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])
    w = mla.kv_b_proj.weight.view(H, mla.nope + mla.v_dim, C)
    w_uk, w_uv = w[:, :mla.nope], w[:, mla.nope:]
    q_abs = torch.einsum("nhd,hdc->nhc", q_nope, w_uk)
    out = x_ND.new_empty(N, H * mla.v_dim)
    for rows, slots, start in seqs:
        ctx = cache_PC[slots]                                                   # [T, C+R]
        scores = (torch.einsum("shc,tc->sht", q_abs[rows], ctx[:, :C])
                  + torch.einsum("shr,tr->sht", q_pe[rows], ctx[:, C:])) * mla.scale
        s = scores.shape[0]
        visible = torch.arange(len(slots))[None, :] <= (start + torch.arange(s))[:, None]
        p = torch.softmax(scores.masked_fill(~visible[:, None, :], float("-inf")), -1, dtype=torch.float32)
        o = torch.einsum("sht,tc->shc", p, ctx[:, :C])
        out[rows] = torch.einsum("shc,hdc->shd", o, w_uv).flatten(1)
    return mla.o_proj(out)


def test_mixed_step_equals_the_materialized_formula():
    """Two prefill chunks (one continuing a cached prefix) and three decodes in one step, on scattered
    non-contiguous blocks: the new attention (expanded + fused for the chunks, absorbed through the
    block table for the decodes) equals the old formula in fp32 up to summation order."""
    torch.manual_seed(0)
    m = random_model("tiny")
    mla = m.model.layers[0].self_attn
    a = m.args
    bs, nb = 4, 40
    cache = PagedLatentCache(a.num_hidden_layers, nb, bs, a.kv_cache_dim)
    cache.kv_LPC.normal_()  # every context slot holds a latent
    perm = torch.randperm(nb).tolist()
    tables = [perm[0:6], perm[6:9], perm[9:14], perm[14:16], perm[16:22]]
    starts, q_lens = [0, 10, 5, 7, 19], [9, 1, 6, 1, 1]
    batch = AttnBatch.build(cache, tables, starts, q_lens)
    N = sum(q_lens)
    x = torch.randn(N, a.hidden_size)
    cos_sin = m.rope(batch.positions_N)
    with torch.no_grad():
        got = mla(x, cos_sin, batch)
        seqs, off = [], 0
        for bt, st, q in zip(tables, starts, q_lens):
            t = torch.arange(st + q)
            slots = torch.tensor(bt)[t // bs] * bs + t % bs
            seqs.append((slice(off, off + q), slots, st))
            off += q
        want = materialized_absorbed(mla, x, cos_sin, cache.kv_LPC[0], batch, seqs)
    assert batch.decode is not None and len(batch.prefills) == 2
    # fp32, same products in another order (expanded vs absorbed, fused vs materialized): ~1e-6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # the continuing chunk as decode rows (speculative verification: one query per token, each over its
    # own context through the block table) computes the same function, and every row is a decode row
    as_rows = AttnBatch.build(cache, tables, starts, q_lens, as_decode=[False, True, True, True, True])
    with torch.no_grad():
        got_rows = mla(x, cos_sin, as_rows)
    assert len(as_rows.prefills) == 1 and as_rows.decode.seq_lens_B.tolist() == [11, 6, 7, 8, 9, 10, 11, 8, 20]
    torch.testing.assert_close(got_rows, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_serving_step_takes_the_cpu_prep_and_it_changes_no_bit(dtype, monkeypatch):
    """A serving step on CPU writes the cache and ropes the queries in one C call (cpu_attention.prep),
    after MLA's merged down-projection; the layer's output and the cache it wrote equal the torch ops'
    (``without_prep``) bit for bit, for prefill chunks and decodes."""
    from expertpool.kernels import cpu_attention, cpu_experts
    if cpu_experts.library() is None:
        pytest.skip("needs a C compiler to build the CPU kernels")
    torch.manual_seed(0)
    m = random_model("tiny").to(dtype)
    m.prepare_for_inference()
    mla = m.model.layers[0].self_attn
    a = m.args
    caches, outs = [], []
    calls = []
    real = cpu_attention.prep
    monkeypatch.setattr(cpu_attention, "prep", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    x = torch.randn(17, a.hidden_size).to(dtype)
    for off in (False, True):
        cache = PagedLatentCache(a.num_hidden_layers, 24, 4, a.kv_cache_dim, dtype=dtype)
        batch = AttnBatch.build(cache, [list(range(0, 8)), list(range(8, 14)), list(range(14, 20))], [0, 10, 5],
                                [9, 1, 7])
        with torch.no_grad():
            if off:
                with cpu_attention.without_prep():
                    outs.append(mla(x, m.rope(batch.positions_N), batch))
            else:
                outs.append(mla(x, m.rope(batch.positions_N), batch))
        caches.append(cache.kv_LPC[0])
    assert calls == [1]
    assert torch.equal(outs[0], outs[1]) and torch.equal(caches[0], caches[1])


PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from expertpool.model.args import preset
    from expertpool.model.transformer import init_random
    from expertpool.model.attention import AttnBatch, PagedLatentCache
    S, chunk = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    args = preset("tiny")
    m = init_random(args, seed=0, std=0.1)
    bs = 16
    cache = PagedLatentCache(args.num_hidden_layers, S // bs + 1, bs, args.kv_cache_dim)
    table = list(range(S // bs + 1))
    ids = torch.randint(0, args.vocab_size, (S,))
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    with torch.inference_mode():
        for s0, n in ((0, 8), (8, 8)):  # first use of each path (one-time allocations) outside the window
            m.forward_batch(ids[s0:s0 + n], AttnBatch.build(cache, [table], [s0], [n]))
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        base = status("VmRSS")
        for s0 in range(0, S, chunk):
            n = min(chunk, S - s0)
            m.forward_batch(ids[s0:s0 + n], AttnBatch.build(cache, [table], [s0], [n]), torch.tensor([n - 1]))
    print(status("VmHWM") - base)
""")


def _prefill_peak_bytes(S: int, chunk: int) -> int:
    # large allocations through mmap, so a freed buffer leaves RSS at once and VmHWM is the peak of
    # what was live, not of what glibc kept cached
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(S), str(chunk)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_prefill_peak_memory_is_linear_in_tokens_and_context():
    """A 4,096-token prefill of the tiny model (one chunk, and 512-token chunks over the growing
    context) stays under ``16 KiB * S + 16 MiB``. Reason for the slope: the per-token buffers of a
    layer are the MoE's per-pair rows (K = 8 pairs of x, h, y and the combine, 8 * (64 + 32 + 64 +
    64) * 4 B = 7 KiB), the router's three [E = 256] fp32 score rows (3 KiB) and the attention's q,
    k, v rows (< 1 KiB): ~11 KiB, with margin. The scores tensor the old path built is 4 * H * T
    bytes per query token, 64 KiB at T = 4,096: four times the whole slope, so it cannot hide."""
    per_token, fixed = 16 << 10, 16 << 20
    for S, chunk in ((4096, 4096), (4096, 512)):
        peak = _prefill_peak_bytes(S, chunk)
        assert peak < per_token * S + fixed, (S, chunk, peak)


SHAPES_SCRIPT = textwrap.dedent("""
    import torch
    from expertpool.model.args import preset
    from expertpool.model.attention import AttnBatch, PagedLatentCache
    from expertpool.model.transformer import init_random
    torch.set_num_threads(1)
    args = preset("tiny")
    dtype = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    m = init_random(args, seed=0, std=0.1, dtype=dtype)
    m.prepare_for_inference()
    bs, T = 16, 256
    nb = T // bs
    cache = PagedLatentCache(args.num_hidden_layers, 8 * nb, bs, args.kv_cache_dim, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in range(1, T + 1):  # a prefill chunk of every size
            ids = torch.randint(0, args.vocab_size, (n,), generator=g)
            m.forward_batch(ids, AttnBatch.build(cache, [list(range(nb))], [0], [n]), torch.tensor([n - 1]))
        for b in (1, 2, 5, 8):  # decode batches over contexts of every length
            tables = [list(range(i * nb, (i + 1) * nb)) for i in range(b)]
            for t in range(1, T + 1):
                ids = torch.randint(0, args.vocab_size, (b,), generator=g)
                m.forward_batch(ids, AttnBatch.build(cache, tables, [t - 1] * b, [1] * b))
""")


def test_serving_steps_take_few_onednn_kernel_shapes():
    """Prefill chunks of every size from 1 to 256 tokens and decode batches over contexts of every
    length up to 256 run through few distinct oneDNN problem shapes (counted from ONEDNN_VERBOSE):
    oneDNN compiles a kernel per shape and caches up to 1024 of them (plus ideep's cache of as many
    descriptors), a few hundred KB each, so every new shape grew a serving actor's resident memory
    (the soak: ~0.7 GB before both caches filled). Row counts and decode contexts padded to buckets
    (``kernels.shape_bucket``) keep this workload at ~420 shapes (~4,500 before the buckets); the
    bound is the cache capacity, under which nothing is evicted and compiled again."""
    env = dict(os.environ, ONEDNN_VERBOSE="1", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", SHAPES_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    # onednn_verbose,...,exec,cpu,<kind>,<impl>,...,<problem>,<time>: the line less its time is the shape
    shapes = {line.rsplit(",", 1)[0] for line in out.stdout.splitlines()
              if line.startswith("onednn_verbose") and ",exec," in line}
    if not shapes:
        pytest.skip("this torch build prints no oneDNN verbose lines")
    assert len(shapes) < 1024, len(shapes)
