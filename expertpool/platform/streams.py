"""One engine request seen as text: incremental detokenizing, stop strings, n choices, chat output.

``GenerationStream`` turns the engine's ``TokenEvent``s (of all ``n`` completions of a request) into
per-choice ``Delta``s of text. Token ids are detokenized incrementally (vLLM's prefix/read offsets:
decode a small window and emit only text that is complete, i.e. does not end in an unfinished UTF-8
sequence). Stop strings are matched on that text across token boundaries; text that could still be
the start of a stop string is held back, so a stop string is never streamed, and the output is cut
before it. A choice that hits a stop string while others run is aborted alone (``abort_choice``).

``ChatChoice`` turns one choice's text into chat deltas: ``reasoning_content`` (reasoning parser),
``content`` and ``tool_calls`` (tool parser), and says the finish reason (``tool_calls`` when the
model called a tool).

Contract with the engine: ``generate`` is an async generator; we always close it (``aclose``) when we
stop reading, whatever the reason (client gone, error, every choice stopped), and closing aborts
what still runs. The close is shielded from cancellation so the engine's cleanup can await.
"""

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio

from expertpool.platform.metrics import ServerMetrics
from expertpool.platform.parsers import (ReasoningParser, ToolCallParser, held_back_len, stream_tool_deltas)
from expertpool.platform.scheduler import Sampled


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without ever emitting half a character.

    Decodes ``ids[prefix:]`` and ``ids[prefix:read]`` and emits the difference: the short prefix
    window keeps tokenizers whose pieces depend on their left neighbour (leading-space markers)
    right, and the cost per step stays O(window) instead of O(length)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full_text = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end, decoded as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full_text = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text):]


class StopStringMatcher:
    """Finds the earliest stop string in streamed text, however it is split across deltas.

    ``push`` returns the text that is safe to emit and whether a stop string was hit (then the text
    before it is all that is left to emit). The held-back tail is the longest suffix that is a
    prefix of some stop string: any match must start inside it, so emitted text is never part of a
    match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        cut = len(self.pending) - held_back_len(self.pending, self.stops)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Delta:
    index: int
    text: str
    finish_reason: str | None             # None while running
    logprobs: list[Sampled] | None = None  # of the tokens behind this text (and any held back before it)


async def close_shielded(gen: Any) -> None:
    """Close the engine generator even while our task is being cancelled (client disconnect)."""
    with anyio.CancelScope(shield=True):
        await gen.aclose()


class _Choice:
    def __init__(self, tokenizer, stops: list[str], skip_special_tokens: bool, drop_ids: set[int]):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.matcher = StopStringMatcher(stops)
        self.drop_ids = drop_ids
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.logprobs: list[Sampled] = []


class GenerationStream:
    """One engine request seen as per-choice text deltas. ``start`` waits for the first engine event
    (so an overload is raised before any response is sent); iterating yields ``Delta``s until every
    choice has finished; ``aclose`` closes the engine generator, which aborts what still runs.
    ``drop_ids``: token ids never shown as text (EOS, when special tokens are kept for a parser)."""

    def __init__(self, gen: Any, tokenizer, stops: list[str], metrics: ServerMetrics, model: str, t_arrival: float,
                 n: int = 1, abort_choice: Callable[[int], Awaitable[None]] | None = None,
                 skip_special_tokens: bool = True, drop_ids: set[int] = frozenset()):
        self.gen = gen
        self.choices = [_Choice(tokenizer, stops, skip_special_tokens, set(drop_ids)) for _ in range(n)]
        self.abort_choice = abort_choice
        self.metrics = metrics
        self.model = model
        self.t_arrival = t_arrival
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.first_event: Any = None
        self.closed = False
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.queue_s: float | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    async def start(self) -> None:
        try:
            self.first_event = await self.gen.__anext__()
        except StopAsyncIteration:
            raise RuntimeError("engine.generate() ended without a final event") from None
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await close_shielded(self.gen)

    def _timing(self, n_tokens: int) -> None:
        if n_tokens <= 0:
            return
        t = time.perf_counter()
        if self.t_last is None:
            self.t_first = t
            self.metrics.first_token(self.model, t - self.t_arrival)
            self.metrics.tokens(self.model, n_tokens, None)
        else:
            self.metrics.tokens(self.model, n_tokens, t - self.t_last)
        self.t_last = t

    def _handle(self, ev: Any) -> Delta | None:
        c = self.choices[ev.index]
        if c.finish_reason is not None:
            return None  # the abort event of a choice a stop string already ended
        self._timing(len(ev.token_ids))
        self.prompt_tokens, c.completion_tokens = ev.num_prompt_tokens, ev.num_output_tokens
        if ev.index == 0:  # the prompt's cache hit (forks share the first completion's prompt)
            self.cached_tokens = max(self.cached_tokens, getattr(ev, "cached_tokens", 0))
        if ev.queue_s is not None:
            self.queue_s = max(self.queue_s or 0.0, ev.queue_s)
        # one token at a time: an event of several tokens (speculative decoding) whose first one
        # completes a stop string counts and shows nothing past that token
        safe, hit, ids = "", False, list(ev.token_ids)
        for i, t in enumerate(ids):
            if ev.logprobs and i < len(ev.logprobs):
                c.logprobs.append(ev.logprobs[i])
            text = c.detok.push([] if t in c.drop_ids else [t])
            if ev.finish_reason is not None and i == len(ids) - 1:
                text += c.detok.flush()
            piece, hit = c.matcher.push(text)
            safe += piece
            if hit:
                c.completion_tokens -= len(ids) - 1 - i
                break
        if not ids and ev.finish_reason is not None:
            piece, hit = c.matcher.push(c.detok.flush())
            safe += piece
        if hit:
            c.finish_reason = "stop"
        elif ev.finish_reason is not None:
            c.finish_reason = ev.finish_reason
            safe += c.matcher.flush()
        if c.finish_reason is None and not safe and not c.logprobs:
            return None
        lps, c.logprobs = c.logprobs or None, []
        return Delta(ev.index, safe, c.finish_reason, lps)

    def _running(self) -> bool:
        return any(c.finish_reason is None for c in self.choices)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        assert self.first_event is not None, "call start() first"
        try:
            ev = self.first_event
            while True:
                was_running = self.choices[ev.index].finish_reason is None
                d = self._handle(ev)
                if d is not None:
                    yield d
                    if not self._running():
                        return
                    if was_running and d.finish_reason is not None and ev.finish_reason is None \
                            and self.abort_choice is not None:
                        await self.abort_choice(d.index)  # a stop string ended this choice; the others go on
                try:
                    ev = await self.gen.__anext__()
                except StopAsyncIteration:
                    raise RuntimeError("engine.generate() ended without a finish_reason") from None
        finally:
            await self.aclose()


class ChatChoice:
    """One choice's text as chat deltas: reasoning first (when a parser is set), then tool calls."""

    def __init__(self, reasoning: bool, tools: bool, parallel_tool_calls: bool = True):
        self.reasoning = ReasoningParser() if reasoning else None
        self.tools = ToolCallParser(parallel_tool_calls) if tools else None
        self.num_calls = 0

    def _delta(self, reasoning: str, content: str, calls: list[dict]) -> dict:
        d: dict[str, Any] = {}
        if reasoning:
            d["reasoning_content"] = reasoning
        if content:
            d["content"] = content
        if calls:
            d["tool_calls"] = stream_tool_deltas(calls, self.num_calls)
            self.num_calls += len(calls)
        return d

    def push(self, text: str) -> dict:
        reasoning, content = self.reasoning.push(text) if self.reasoning else ("", text)
        calls: list[dict] = []
        if self.tools and content:
            content, calls = self.tools.push(content)
        return self._delta(reasoning, content, calls)

    def finish(self) -> dict:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        calls: list[dict] = []
        if self.tools:
            c1, calls = self.tools.push(content) if content else ("", [])
            c2, more = self.tools.finish()
            content, calls = c1 + c2, calls + more
        return self._delta(reasoning, content, calls)

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self.num_calls and engine_reason == "stop" else engine_reason
