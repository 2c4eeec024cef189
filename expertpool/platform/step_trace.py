"""An opt-in trace of the engine's step loop: when each step was planned, submitted and finished.

``EXPERTPOOL_STEP_TRACE=DIR`` makes every serving engine write one JSON line per event to
``DIR/steps-<pid>.jsonl`` (one file per replica process): a ``submit`` line when a step goes to the
workers (``plan``: when planning began, ``t``: when it was submitted, ``tokens``: new tokens in it,
``decodes``: single-token decodes that sample, ``drafts``: speculative tokens they verify,
``seqs``: its items) and a ``result`` line when its
result is back (``wait``: when the loop began waiting for it, ``t``: when it arrived). Steps finish
in submission order, so the n-th ``result`` is the n-th ``submit``'s. Times are ``time.monotonic()``.
``python bench/step_trace.py DIR`` summarises a trace: time in decode steps, in steps with prompt
tokens, and between a result and the next submission.

Lines are buffered and written every ``FLUSH_EVERY`` events and at shutdown, so the trace costs the
loop a list append per event when on and one attribute test when off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "EXPERTPOOL_STEP_TRACE"
FLUSH_EVERY = 512


class StepTrace:
    def __init__(self, directory: str | os.PathLike):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"steps-{os.getpid()}.jsonl"
        self._lines: list[str] = []

    @classmethod
    def from_env(cls) -> StepTrace | None:
        d = os.environ.get(ENV)
        return cls(d) if d else None

    def submitted(self, t_plan: float, t: float, items_per_worker) -> None:
        items = [it for w in items_per_worker for it in w]
        self._add({"ev": "submit", "plan": t_plan, "t": t, "tokens": sum(len(it.tokens) for it in items),
                   "decodes": sum(1 for it in items if len(it.tokens) == 1 and it.sample),
                   "drafts": sum(len(it.draft) for it in items), "seqs": len(items)})

    def finished(self, t_wait: float, t: float) -> None:
        self._add({"ev": "result", "wait": t_wait, "t": t})

    def _add(self, rec: dict) -> None:
        self._lines.append(json.dumps(rec))
        if len(self._lines) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            with open(self.path, "a") as f:
                f.write("\n".join(self._lines) + "\n")
            self._lines = []


def read(path: str | os.PathLike) -> list[list[dict]]:
    """The records of a trace directory (one list per file, i.e. per replica process) or of one file."""
    p = Path(path)
    files = sorted(p.glob("steps-*.jsonl")) if p.is_dir() else [p]
    return [[json.loads(line) for line in f.read_text().splitlines() if line.strip()] for f in files]


def steps(records: list[dict]) -> list[tuple[dict, dict]]:
    """(submit, result) pairs, in order (a submission without its result yet is left out)."""
    subs = [r for r in records if r["ev"] == "submit"]
    res = [r for r in records if r["ev"] == "result"]
    return list(zip(subs, res))


def summarize(pairs: list[tuple[dict, dict]]) -> dict:
    """Where the loop's time went between the first submission and the last result: ``decode`` steps
    (every item one sampled token), ``prompt`` steps (any prompt tokens), and ``gap``, from a result
    to the next submission when that one was planned after the result (the workers idle; with async
    scheduling or multi-step chains the next step is usually submitted before, and there is no gap).
    Per kind: count, seconds, share of the span, mean ms, and for decode steps the mean batch."""
    if not pairs:
        return {"span_s": 0.0, "steps": 0}
    span = pairs[-1][1]["t"] - pairs[0][0]["plan"]
    out: dict = {"span_s": span, "steps": len(pairs)}
    for kind in ("decode", "prompt"):
        sel = [(s, r) for s, r in pairs if (s["tokens"] == s["decodes"]) == (kind == "decode")]
        secs = sum(r["t"] - s["t"] for s, r in sel)
        out[kind] = {"count": len(sel), "seconds": secs, "share": secs / span if span else 0.0,
                     "mean_ms": 1e3 * secs / len(sel) if sel else 0.0}
        if kind == "decode":
            out[kind]["mean_batch"] = sum(s["decodes"] for s, _ in sel) / len(sel) if sel else 0.0
    gaps = [b[0]["t"] - a[1]["t"] for a, b in zip(pairs, pairs[1:]) if b[0]["plan"] >= a[1]["t"]]
    out["gap"] = {"count": len(gaps), "seconds": sum(gaps), "share": sum(gaps) / span if span else 0.0,
                  "mean_ms": 1e3 * sum(gaps) / len(gaps) if gaps else 0.0}
    return out
