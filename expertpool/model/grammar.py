"""Constrained decoding: a grammar's allowed-token mask, applied to the logits where sampling happens.

Library: llguidance. ``bench/grammar.py`` measured it against xgrammar and outlines-core on this
CPU (docs/benchmarks.md): on a 32k byte-level BPE, mask + apply + accept cost ~70-80 µs per token
(xgrammar ~95 µs, outlines-core ~2 ms), and compiling a JSON schema ~1 ms (xgrammar 5-75 ms), so a
request's own schema never stalls the step loop. Its Lark front end takes inline JSON schemas
(``%json {...}``), which the tool-call grammar uses. It needs neither torch nor transformers at run
time; its tokenizer is built once per worker from ``tokenizer.json`` (or from a tiktoken vocabulary).

``GrammarSpec`` is what a request asks for; it travels inside ``SamplingParams`` to the worker.
``Constrainer`` lives on the worker that samples a sequence and keeps one matcher per sequence. The
matcher's state is a function of the sequence's accepted output tokens only, and the contract keeps
it so across everything the scheduler does:

- a token enters the matcher when it comes back as an input token of a step item (positions at or
  past ``prompt_len``), not when it is sampled, so the state before sampling is exactly "every
  output token up to this position";
- a re-prefill (preemption, recovery on a new worker) sends the output tokens again as prompt
  chunk tokens, which rebuild a fresh matcher; an item that starts before the matcher's position
  (a surviving worker after a rolled-back step) rolls the matcher back first;
- under async scheduling a decode's token is ``PLACEHOLDER``: the worker resolves it to the token
  it sampled itself, so the mask for the next token is known here although the replica does not
  know the token yet; nothing needs to wait a step.

A matcher that has accepted EOS (a run-ahead decode after the sequence ended) allows only EOS.
"""

from dataclasses import dataclass
from typing import Literal

import torch

from expertpool.errors import UserError

JSON_OBJECT_SCHEMA = '{"type": "object"}'
# JSON without free whitespace between tokens (as json.dumps with separators writes it): a model
# cannot stall in endless blanks, and the answer is the same document.
COMPACT_JSON = {"whitespace_flexible": False}


class GrammarError(UserError, ValueError):
    """The grammar or schema of a request cannot be compiled."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: Literal["json_schema", "lark"]
    source: str                     # the JSON schema text, or a Lark grammar

    def llguidance_grammar(self) -> str:
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, defaults=COMPACT_JSON)
        return LLMatcher.grammar_from_lark(self.source)


def json_object() -> GrammarSpec:
    return GrammarSpec("json_schema", JSON_OBJECT_SCHEMA)


def check(spec: GrammarSpec, lltokenizer=None) -> None:
    """Raise ``GrammarError`` with llguidance's message if ``spec`` does not compile."""
    from llguidance import LLMatcher

    try:
        err = LLMatcher.validate_grammar(spec.llguidance_grammar(), lltokenizer)
    except ValueError as e:  # a schema that is not JSON at all
        err = str(e)
    if err:
        raise GrammarError(err)


@dataclass
class _State:
    matcher: object
    prompt_len: int
    consumed: int = 0               # output tokens fed to the matcher


class Constrainer:
    """Per-worker matchers, one per constrained sequence. ``lltokenizer``: an ``llguidance.LLTokenizer``
    whose vocabulary covers the model's logits (``n_vocab`` = the model's vocab_size)."""

    def __init__(self, lltokenizer, vocab_size: int):
        self.lltok = lltokenizer
        self.vocab_size = vocab_size
        self._seqs: dict[str, _State] = {}

    def advance(self, seq_id: str, spec: GrammarSpec, prompt_len: int, start_pos: int, tokens: list[int]) -> None:
        """Feed the output tokens among ``tokens`` (written at ``start_pos``...) to the sequence's matcher."""
        from llguidance import LLMatcher

        st = self._seqs.get(seq_id)
        if st is None or start_pos == 0:
            st = self._seqs[seq_id] = _State(LLMatcher(self.lltok, spec.llguidance_grammar()), prompt_len)
            assert not st.matcher.is_error(), f"grammar of {seq_id} failed to compile: {st.matcher.get_error()}"
        first = max(start_pos, prompt_len) - prompt_len  # output index of the first output token here
        assert first <= st.consumed, (f"{seq_id}: the matcher has {st.consumed} output tokens but the item starts at "
                                      f"output token {first}: tokens were skipped")
        if first < st.consumed:
            st.matcher.rollback(st.consumed - first)
            st.consumed = first
        for t in tokens[max(0, prompt_len - start_pos):]:
            if st.matcher.is_stopped():  # ended (EOS accepted): only a dropped run-ahead gets here
                break
            ok = st.matcher.consume_token(t)
            assert ok, f"{seq_id}: token {t} violates its grammar: {st.matcher.get_error()}"
            st.consumed += 1

    def fill(self, seq_id: str, bitmask: torch.Tensor, row: int) -> None:
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self._seqs[seq_id].matcher, bitmask, row)

    def bitmask(self, rows: int) -> torch.Tensor:
        from llguidance.torch import allocate_token_bitmask

        return allocate_token_bitmask(rows, self.vocab_size)

    @staticmethod
    def apply(logits_BV: torch.Tensor, bitmask: torch.Tensor) -> None:
        from llguidance.torch import apply_token_bitmask_inplace

        apply_token_bitmask_inplace(logits_BV, bitmask.to(logits_BV.device))

    def release(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self._seqs.pop(s, None)
