"""Constrained decoding (``model.grammar``): the matcher state is a function of the accepted output
tokens, so a re-prefill (preemption, a new worker) and a rolled-back step (recovery on a surviving
worker) give the same masks as the undisturbed run."""

import json

import pytest
import torch

from expertpool.model.grammar import Constrainer, GrammarError, GrammarSpec, check, json_object
from expertpool.model.sampling import SamplingParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"enum": ["x", "y"]}},
          "required": ["a", "b"], "additionalProperties": False}
SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def tok():
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.model.tokenizer import Tokenizer
    return Tokenizer.from_dir(ensure_embedded_model())


def _mask(c: Constrainer, sid: str) -> torch.Tensor:
    m = c.bitmask(1)
    c.fill(sid, m, 0)
    return m.clone()


def test_check_reports_bad_schemas_and_grammars():
    check(SPEC)
    check(json_object())
    with pytest.raises(GrammarError, match="objekt"):
        check(GrammarSpec("json_schema", '{"type": "objekt"}'))
    with pytest.raises(GrammarError):
        check(GrammarSpec("lark", "start: undefined_rule"))


def test_replay_and_rollback_rebuild_the_same_matcher_state(tok):
    prompt = tok.encode("Give JSON:")
    out = tok.encode('{"a":42,"b":"y"}', add_bos=False)
    P = len(prompt)
    c = Constrainer(tok.llguidance_tokenizer(tok.vocab_size), tok.vocab_size)
    c.advance("s", SPEC, P, 0, prompt)  # prefill: no output tokens yet
    masks = [_mask(c, "s")]
    for k, t in enumerate(out):  # each decode feeds the previous sample back
        c.advance("s", SPEC, P, P + k, [t])
        masks.append(_mask(c, "s"))
    first = masks[0]
    assert first.sum() != -1 * first.numel()  # not "everything allowed"
    allowed = [i for i in range(tok.vocab_size) if first[0, i // 32] >> (i % 32) & 1]
    assert all(tok.decode([i]).startswith("{") for i in allowed)

    # re-prefill elsewhere (preempted, or a replacement worker): prompt + output as prefill chunks
    r = Constrainer(tok.llguidance_tokenizer(tok.vocab_size), tok.vocab_size)
    seq = prompt + out[:5]
    r.advance("s", SPEC, P, 0, seq[:7])
    r.advance("s", SPEC, P, 7, seq[7:])
    assert torch.equal(_mask(r, "s"), masks[5])

    # a surviving worker whose last two steps were rolled back: the items come again from earlier
    c.advance("s", SPEC, P, P + len(out) - 2, out[-2:])
    assert torch.equal(_mask(c, "s"), masks[-1])
    with pytest.raises(AssertionError, match="skipped"):
        c.advance("t", SPEC, P, 0, prompt)
        c.advance("t", SPEC, P, P + 3, [out[3]])


def test_constrained_output_survives_preemption_in_the_engine(tok):
    """Two constrained greedy requests compete for a small KV cache: the younger is preempted and
    re-prefilled (its matcher rebuilt from its tokens); both outputs equal their solo runs and parse."""
    from expertpool.model.checkpoint import load_checkpoint
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.platform.engine import generate, local_engine

    model = load_checkpoint(ensure_embedded_model(), dtype=torch.float32, with_mtp=False)
    params = SamplingParams(max_tokens=60, temperature=0, grammar=SPEC)
    # 55-token prompts: both fit at admission (2 x 14 of 32 blocks), their decodes then do not
    prompts = [(tok.encode(w + ": the quick brown fox jumps over the lazy dog " * 6))[:55] for w in ("first", "second")]

    def run(num_blocks, ps):
        core = local_engine(model, max_batch_size=2, max_seq_len=128, block_size=4, num_blocks=num_blocks,
                            eos_token_id=tok.eos_token_id, tokenizer=tok)
        return generate(core, ps, params), core.preempted

    solo = [run(64, [p])[0][0] for p in prompts]
    both, preempted = run(32, prompts)
    assert preempted > 0, "the cache was meant to force a preemption"
    assert both == solo
    for ids in both:
        assert ids[-1] == tok.eos_token_id
        doc = json.loads(tok.decode(ids))
        assert set(doc) == {"a", "b"} and doc["b"] in ("x", "y")
