"""MTP speculative decoding: the draft module over the paged cache, verification, and greedy outputs
equal to plain decoding under every scheduling path.

The tiny model's MTP module has random weights, so its drafts are almost never right. To exercise
acceptance, the in-process tests also run an ``OracleRunner``: the MTP module still runs every step
(its cache and collectives as in production), but the drafts it returns are replaced by the true
greedy continuation, with every third draft token corrupted, so steps accept all, some or none.
"""

import asyncio

import pytest
import torch

from expertpool.model.sampling import SamplingParams
from expertpool.platform.engine import generate
from expertpool.platform.scheduler import EngineCore, SpecOut, StepItem
from expertpool.platform.executor import LocalExecutor
from expertpool.platform.worker import ModelRunner
from tests.model.helpers import random_model

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny")


def reference(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


class OracleRunner(ModelRunner):
    def __init__(self, *a, oracle: dict[str, list[int]], **kw):
        super().__init__(*a, **kw)
        self.oracle, self.calls = oracle, 0

    def _draft(self, items, inputs, hidden_ND, offsets, emitted):
        super()._draft(items, inputs, hidden_ND, offsets, emitted)  # the module runs as in production
        out, j = [], 0
        for it in items:
            if not it.sample:
                continue
            # the position of the newest token: after a draft, one past the verified ones
            last = it.start_pos + (len(emitted[j]) if it.draft else len(it.tokens))
            ref = self.oracle[it.seq_id]
            d = list(ref[last + 1:last + 1 + self.spec_tokens])
            d += [0] * (self.spec_tokens - len(d))
            for i in range(len(d)):
                self.calls += 1
                if self.calls % 3 == 0:
                    d[i] = (d[i] + 1) % self.model.args.vocab_size
            out.append(d)
            j += 1
        return out


def engine(model, spec=0, oracle=None, max_batch_size=4, max_seq_len=96, block_size=4, num_blocks=None,
           budget=16, caching=True):
    num_blocks = num_blocks or max_batch_size * -(-max_seq_len // block_size)
    runner = (OracleRunner(model, num_blocks, block_size, spec_tokens=spec, oracle=oracle) if oracle is not None
              else ModelRunner(model, num_blocks, block_size, spec_tokens=spec))
    return EngineCore(LocalExecutor(runner), num_blocks=num_blocks, block_size=block_size,
                      max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_num_batched_tokens=budget,
                      eos_token_id=None, vocab_size=model.args.vocab_size, prefix_caching=caching, spec_tokens=spec)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (int(k),), generator=g).tolist() for k in torch.randint(1, 30, (n,), generator=g)]


def test_draft_module_over_the_paged_cache_matches_the_full_forward(tiny):
    """Drafts proposed step by step (prefill in chunks, then decodes) equal the argmax of the MTP
    module run over the whole sequence at once."""
    prompt = list(range(7, 30))
    runner = ModelRunner(tiny, 32, 4, spec_tokens=1)
    table = list(range(16))
    params = GREEDY
    toks = list(prompt)
    drafts = {}
    runner.step([StepItem("s", prompt[:10], 0, table, False, params, lookahead=prompt[10])])
    out = runner.step([StepItem("s", prompt[10:], 10, table, True, params)])[0]
    assert isinstance(out, SpecOut) and len(out.tokens) == 1 and len(out.draft) == 1
    toks += out.tokens
    drafts[len(toks)] = out.draft[0]  # proposes the token at position len(toks)
    for _ in range(6):
        out = runner.step([StepItem("s", [toks[-1]], len(toks) - 1, table, True, params)])[0]
        toks += out.tokens
        drafts[len(toks)] = out.draft[0]
    assert toks == reference(tiny, prompt, len(toks) - len(prompt))
    with torch.no_grad():
        ids = torch.tensor([toks])
        mtp = tiny.mtp_logits(tiny.hidden_states(ids), ids)[0]  # row i predicts token i + 2
    for pos, d in drafts.items():
        if pos < len(toks):
            assert d == int(mtp[pos - 2].argmax()), pos


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain(tiny, k):
    ps = prompts(6)
    plain = generate(engine(tiny), ps, GREEDY)
    assert plain == generate(engine(tiny, spec=k), ps, GREEDY)  # the random module: rejections
    oracle = {f"o{i}": reference(tiny, p, 24 + k + 1) for i, p in enumerate(ps)}
    core = engine(tiny, spec=k, oracle={f"gen-{i}": v for i, v in enumerate(oracle.values())})
    outs = {}
    for i, p in enumerate(ps):
        core.add_request(f"gen-{i}", p, GREEDY)
    while core.has_work():
        for sid, ev in core.step().items():
            outs.setdefault(sid, []).extend(ev.token_ids)
    assert [outs[f"gen-{i}"] for i in range(len(ps))] == plain
    st = core.stats()
    assert st["spec_decode_num_accepted_tokens"] > 0.4 * st["spec_decode_num_draft_tokens"] > 0
    assert st["steps"] < sum(len(o) for o in plain) / 4 + 20  # several tokens per step
    assert sum(st["spec_decode_num_accepted_tokens_per_pos"]) == st["spec_decode_num_accepted_tokens"]
    assert st["kv_blocks_used"] == 0


def _oracle_run(tiny, ps, params, k=2, continuations=None, **kw):
    """Run with oracle drafts: the greedy continuation, or the given ``continuations`` per prompt."""
    ids = [f"r{i}" for i in range(len(ps))]
    if continuations is None:
        oracle = {sid: reference(tiny, p, params.max_tokens + k + 1) for sid, p in zip(ids, ps)}
    else:
        oracle = {sid: p + c for sid, p, c in zip(ids, ps, continuations)}
    core = engine(tiny, spec=k, oracle=oracle, **kw)
    outs = {}
    for sid, p in zip(ids, ps):
        core.add_request(sid, p, params)
    events = []
    while core.has_work():
        for sid, ev in core.step().items():
            outs.setdefault(sid, []).extend(ev.token_ids)
            events.append(ev)
    return [outs[s] for s in ids], core, events


def test_16_streams_chunked_prefill_and_preemption(tiny):
    ps = prompts(16, seed=1)
    plain = generate(engine(tiny, max_batch_size=16), ps, GREEDY)
    # a small token budget chunks every prefill; 40 blocks of 4 cannot hold 16 growing sequences
    outs, core, _ = _oracle_run(tiny, ps, GREEDY, max_batch_size=16, num_blocks=40, budget=12)
    assert outs == plain
    assert core.stats()["preempted"] > 0 and core.stats()["spec_decode_num_accepted_tokens"] > 0


def test_max_tokens_and_stop_ids_are_exact(tiny):
    ps = prompts(4, seed=2)
    for n in (1, 2, 5):
        outs, _, _ = _oracle_run(tiny, ps, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), k=3)
        assert all(len(o) == n for o in outs)
    full = generate(engine(tiny), ps, GREEDY)
    stop = full[0][6]
    outs, _, events = _oracle_run(tiny, ps[:1], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                                stop_token_ids=(stop,)), k=3)
    assert outs[0] == full[0][:full[0].index(stop) + 1]
    assert events[-1].finish_reason == "stop" and events[-1].token_ids[-1] == stop


def test_seeded_sampling_gives_the_same_tokens_with_or_without_speculation(tiny):
    """Each token is the plain sample of its (seed, position); drafts only decide how many arrive per
    step. The oracle's drafts are the plain run's samples (every third corrupted), then the greedy
    continuation, which a sample at temperature 0.9 rarely equals."""
    ps = prompts(3, seed=3)
    sp = SamplingParams(max_tokens=16, temperature=0.9, seed=5, ignore_eos=True)
    plain = generate(engine(tiny), ps, sp)
    a, core, _ = _oracle_run(tiny, ps, sp, continuations=[o + [0] * 4 for o in plain])
    assert a == plain and all(len(o) == 16 for o in a)
    assert core.stats()["spec_decode_num_accepted_tokens"] > 0
    b, _, _ = _oracle_run(tiny, ps, sp)
    assert b == plain


def test_logprobs_of_every_emitted_token(tiny):
    ps = prompts(2, seed=4)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    outs, core, events = _oracle_run(tiny, ps, sp)
    assert core.stats()["spec_decode_num_accepted_tokens"] > 0
    for ev in events:
        assert ev.logprobs is not None and [lp.token for lp in ev.logprobs] == ev.token_ids
        assert all(lp.top[0][0] == lp.token for lp in ev.logprobs)  # greedy: the chosen token is the top-1


def test_stop_string_inside_a_multi_token_event_counts_exactly():
    """The API matches stop strings per token: a two-token event whose first token completes the stop
    string shows nothing of the second and does not count it."""
    from expertpool.platform.metrics import ServerMetrics
    from expertpool.platform.scheduler import TokenEvent
    from expertpool.platform.streams import GenerationStream
    from tests.platform.fake_engine import FakeTokenizer

    tok = FakeTokenizer()
    a, b, c = tok.encode("ab", add_bos=False), tok.encode("cd", add_bos=False), tok.encode("ef", add_bos=False)

    async def gen():
        yield TokenEvent(a, None, 3, 2)
        yield TokenEvent(b[:1] + c[:1], None, 3, 4)  # "c" completes the stop string "abc"; "e" follows
        yield TokenEvent(c[1:], "length", 3, 5)

    async def run():
        s = GenerationStream(gen(), tok, ["bc"], ServerMetrics(), "m", 0.0)
        await s.start()
        return [d async for d in s], s
    deltas, s = asyncio.run(run())
    assert "".join(d.text for d in deltas) == "a" and deltas[-1].finish_reason == "stop"
    assert s.completion_tokens == 3


def test_speculation_needs_the_mtp_module():
    from expertpool.model.args import preset
    from expertpool.model.transformer import Transformer

    args = preset("tiny")
    model = Transformer(args, with_mtp=False)
    with pytest.raises(ValueError, match="multi-token-prediction"):
        ModelRunner(model, 8, 4, spec_tokens=1)


def test_config_rejects_speculation_with_async_scheduling():
    from expertpool.platform.config import ConfigError, parse_config

    cfg = parse_config({"serving": {"speculative": {"num_speculative_tokens": 2}}})
    assert cfg.serving.speculative.method == "mtp"
    with pytest.raises(ConfigError, match="async"):
        parse_config({"serving": {"speculative": {}, "async_scheduling": True}})


@pytest.mark.parametrize("other", [{"speculative": {}}, {"async_scheduling": True}])
def test_config_rejects_multi_step_with_speculation_or_async_scheduling(other):
    """A chain's later steps are planned before the earlier ones' tokens are known: a speculative step's
    accepted count, or a second pipeline, would move the positions they were planned at."""
    from expertpool.platform.config import ConfigError, parse_config

    assert parse_config({"serving": {"num_scheduler_steps": 8}}).serving.num_scheduler_steps == 8
    with pytest.raises(ConfigError, match=f"num_scheduler_steps.*serving.{next(iter(other))}"):
        parse_config({"serving": {"num_scheduler_steps": 4, **other}})
    with pytest.raises(ConfigError, match="num_scheduler_steps"):
        parse_config({"serving": {"num_scheduler_steps": 0}})
