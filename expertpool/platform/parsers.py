"""What the chat API makes of generated text: reasoning, tool calls, logprobs; and the tool-call grammar.

All parsers here are incremental: ``push(text)`` takes the next piece of (stop-string-safe) text and
returns what may be sent now; ``finish()`` returns the rest. Text that could be the start of a tag
is held back (as stop strings are), so a tag is never streamed half-way and streaming and
non-streaming answers agree.

- ``ReasoningParser`` (``serving.reasoning_parser: deepseek_r1``, as vLLM's): the text up to
  ``</think>`` is ``reasoning_content`` (a leading ``<think>`` dropped), the rest ``content``. R1's
  template opens the ``<think>`` in the prompt, so output without ``</think>`` is all reasoning.
- ``ToolCallParser``: the DeepSeek-V3 format, as its chat template writes assistant tool calls:
  ``<｜tool▁calls▁begin｜>`` then per call
  ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>``
  (calls separated by a newline), then ``<｜tool▁calls▁end｜>``. Text before the first tag is
  ``content``; each call is sent as one streaming delta when its end tag arrives.
- ``tool_call_grammar``: the Lark grammar (llguidance) of exactly that format, with each function's
  ``parameters`` schema inline, for ``tool_choice: required`` or a named function.
"""

import json
import re
import uuid

from expertpool.model.grammar import COMPACT_JSON, GrammarSpec
from expertpool.model.tokenizer import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
                                        TOOL_SEP)
from expertpool.platform.scheduler import Sampled

THINK_START, THINK_END = "<think>", "</think>"
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM sends the same floor
REASONING_PARSERS = ("deepseek_r1",)

_CALL_RE = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(?P<type>.*?)" + re.escape(TOOL_SEP)
                      + r"(?P<name>.*?)\s*```json\s*(?P<args>.*?)\s*```\s*" + re.escape(TOOL_CALL_END), re.DOTALL)


def held_back_len(text: str, tags: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``: text that
    may still turn into a tag and must not be sent yet."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        tail = text[-n:]
        if any(t.startswith(tail) for t in tags):
            return n
    return 0


class ReasoningParser:
    def __init__(self):
        self.buf = ""
        self.started = False
        self.done = False

    def push(self, text: str) -> tuple[str, str]:
        """-> (reasoning, content) that may be sent now."""
        if self.done:
            return "", text
        self.buf += text
        if not self.started:
            if THINK_START.startswith(self.buf):
                return "", ""  # may still become "<think>"
            self.started = True
            if self.buf.startswith(THINK_START):
                self.buf = self.buf[len(THINK_START):]
        i = self.buf.find(THINK_END)
        if i >= 0:
            reasoning, content = self.buf[:i], self.buf[i + len(THINK_END):]
            self.buf, self.done = "", True
            return reasoning, content
        cut = len(self.buf) - held_back_len(self.buf, [THINK_END])
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, ""

    def finish(self) -> tuple[str, str]:
        out, self.buf = self.buf, ""
        return (out, "") if not self.done else ("", out)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    def __init__(self, parallel: bool = True):
        self.parallel = parallel
        self.buf = ""
        self.in_calls = False
        self.calls: list[dict] = []

    def push(self, text: str) -> tuple[str, list[dict]]:
        """-> (content, tool calls completed by this text) that may be sent now."""
        self.buf += text
        content = ""
        if not self.in_calls:
            i = self.buf.find(TOOL_CALLS_BEGIN)
            if i < 0:
                cut = len(self.buf) - held_back_len(self.buf, [TOOL_CALLS_BEGIN])
                content, self.buf = self.buf[:cut], self.buf[cut:]
                return content, []
            content, self.buf, self.in_calls = self.buf[:i], self.buf[i + len(TOOL_CALLS_BEGIN):], True
        new = []
        while (m := _CALL_RE.search(self.buf)) is not None:
            self.buf = self.buf[m.end():]
            if self.parallel or not self.calls:  # parallel_tool_calls=false: the first call only
                call = {"id": new_call_id(), "type": "function",
                        "function": {"name": m["name"].strip(), "arguments": m["args"]}}
                self.calls.append(call)
                new.append(call)
        return content, new

    def finish(self) -> tuple[str, list[dict]]:
        """The rest: held-back text, or (when the calls block never produced a complete call) the raw
        text after the calls tag, so nothing the model wrote is lost."""
        rest, self.buf = self.buf, ""
        if not self.in_calls:
            return rest, []
        if not self.calls:
            return TOOL_CALLS_BEGIN + rest.split(TOOL_CALLS_END)[0], []
        return "", []


def stream_tool_deltas(calls: list[dict], first_index: int) -> list[dict]:
    return [{"index": first_index + k, **c} for k, c in enumerate(calls)]


def _literal(text: str, special_id) -> str:
    """A Lark terminal for ``text``: the token itself when the vocabulary has it as one token (a
    special token would never match as plain text), else the quoted string."""
    tid = special_id(text)
    return f"<[{tid}]>" if tid is not None else json.dumps(text, ensure_ascii=False)


def tool_call_grammar(tools: list, parallel: bool, special_id=lambda _t: None) -> GrammarSpec:
    """Lark grammar forcing one (or, with ``parallel``, one or more) DeepSeek-V3 tool calls of ``tools``
    (``protocol.Tool``), each function's arguments constrained to its ``parameters`` schema."""
    lit = lambda t: _literal(t, special_id)  # noqa: E731
    rules = []
    for i, t in enumerate(tools):
        schema = json.dumps({**(t.function.parameters or {"type": "object"}), "x-guidance": COMPACT_JSON},
                            ensure_ascii=False)
        rules.append(f"call_{i}: {lit(TOOL_CALL_BEGIN)} \"function\" {lit(TOOL_SEP)} "
                     f"{json.dumps(t.function.name + chr(10) + '```json' + chr(10))} %json {schema} "
                     f"{json.dumps(chr(10) + '```')} {lit(TOOL_CALL_END)}")
    call = "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))
    more = ' ("\\n" call)*' if parallel else ""
    start = f"start: {lit(TOOL_CALLS_BEGIN)} call{more} {lit(TOOL_CALLS_END)}"
    return GrammarSpec("lark", "\n".join([start, call, *rules]) + "\n")


def _token_text(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid], skip_special_tokens=False)


def _lp(x: float) -> float:
    return max(x, LOGPROB_FLOOR)


def chat_logprobs(tokenizer, samples: list[Sampled]) -> dict:
    def entry(tid, lp):
        t = _token_text(tokenizer, tid)
        return {"token": t, "logprob": _lp(lp), "bytes": list(t.encode("utf-8"))}
    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(i, v) for i, v in s.top]}
                        for s in samples], "refusal": None}


def completion_logprobs(tokenizer, samples: list[Sampled], text_offset: int) -> dict:
    tokens, offsets, off = [], [], text_offset
    for s in samples:
        t = _token_text(tokenizer, s.token)
        tokens.append(t)
        offsets.append(off)
        off += len(t)
    tops = []
    for s in samples:  # keyed by text: tokens that read the same (byte pieces: U+FFFD) keep the likelier
        top: dict[str, float] = {}
        for i, v in s.top:
            top.setdefault(_token_text(tokenizer, i), _lp(v))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [_lp(s.logprob) for s in samples], "top_logprobs": tops,
            "text_offset": offsets}
