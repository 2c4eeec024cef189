"""A fake ``Engine`` and a byte-level tokenizer with the lead's interfaces, for HTTP-layer tests.

FakeTokenizer: ids 0-2 are <pad>, <s>, </s>; ids 3..258 are the 256 bytes; a few multi-byte merges
(" world", "Hello") follow. Decoding is UTF-8 with replacement, so a character split across tokens
decodes to U+FFFD until its last byte arrives, as with real byte-level BPE.

FakeEngine counts a prompt it has seen before as a prefix-cache hit of all but its last token (the
real engine's rule), so the prefix-cache metrics have something to export.
FakeEngine replies with REPLY (or, when the prompt contains "ECHO", the decoded prompt) one token
per step, then EOS ("stop"), honouring max_tokens, stop_token_ids, ignore_eos and max_seq_len.
Prompt keywords: "OVERLOAD" raises the engine's EngineOverloaded before the first event, "SLOW" sleeps 0.2 s per
token, "BOOM" raises RuntimeError after two tokens. Every request that ends without its final event
(closed or cancelled) is appended to ``log_path`` as a JSON line, which is how tests see from outside
the replica that a client disconnect closed the engine generator.
"""

import asyncio
import json
import os
import tempfile

from expertpool.platform.scheduler import EngineOverloaded, Sampled, TokenEvent

PAD, BOS, EOS = 0, 1, 2
BYTE0 = 3
MERGES = [b" world", b"Hello"]
SPECIAL = {"<s>": BOS, "</s>": EOS}
VOCAB = BYTE0 + 256 + len(MERGES)

REPLY = "Hello world! Grüße 😀 from the fake engine."


class FakeTokenizer:
    bos_token_id = BOS
    eos_token_id = EOS

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [BOS] if add_bos else []
        i = 0
        while i < len(text):
            for s, tid in SPECIAL.items():
                if text.startswith(s, i):
                    ids.append(tid)
                    i += len(s)
                    break
            else:
                ids.extend(self._encode_bytes(text[i].encode()))
                i += 1
        return self._merge(ids)

    @staticmethod
    def _encode_bytes(b: bytes) -> list[int]:
        return [BYTE0 + x for x in b]

    def _merge(self, ids: list[int]) -> list[int]:
        for m, merged in enumerate(MERGES):
            pat = self._encode_bytes(merged)
            out, i = [], 0
            while i < len(ids):
                if ids[i:i + len(pat)] == pat:
                    out.append(BYTE0 + 256 + m)
                    i += len(pat)
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        buf = bytearray()
        for t in ids:
            if t < BYTE0:
                if not skip_special_tokens:
                    buf += {PAD: b"<pad>", BOS: b"<s>", EOS: b"</s>"}[t]
            elif t < BYTE0 + 256:
                buf.append(t - BYTE0)
            else:
                buf += MERGES[t - BYTE0 - 256]
        return buf.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs) -> str:
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):  # as a template does for roles it has no slot for
                raise ValueError(f"chat template failed: unsupported role: {m['role']}")
        text = "<s>" + "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


def make_tokenizer(cfg=None) -> FakeTokenizer:
    return FakeTokenizer()


def side_files(app_name: str) -> tuple[str, str]:
    """(request log, 'unhealthy' flag file) of the fake engine serving ``app_name``: plain files, so the
    test process and the replica process agree on them without passing anything but the config."""
    base = os.path.join(tempfile.gettempdir(), f"expertpool-fake-{app_name}")
    return base + ".jsonl", base + ".unhealthy"


def make_engine(cfg) -> "FakeEngine":
    """Engine factory with the ``build_engine(cfg)`` signature (import path target in tests)."""
    log_path, unhealthy_path = side_files(cfg.serving.app_name)
    return FakeEngine(max_seq_len=cfg.serving.max_seq_len, base=cfg.model.name, log_path=log_path,
                      unhealthy_path=unhealthy_path)


class FakeEngine:
    def __init__(self, max_seq_len: int = 256, log_path: str | None = None, unhealthy_path: str | None = None,
                 base: str = "fake-base", step_s: float = 0.002):
        self.max_seq_len = max_seq_len
        self.log_path = log_path
        self.unhealthy_path = unhealthy_path
        self.step_s = step_s
        self.tok = FakeTokenizer()
        self.ids = [base]
        self.running = 0
        self.expert_tokens = [0] * 8
        self.steps = 0
        self.seen_prompts: set[tuple[int, ...]] = set()  # a prefix cache of whole prompts
        self.prefix_queries = self.prefix_hits = 0
        self.calls: list[tuple[str, list[int], object, str | None]] = []
        self.closed_early: list[str] = []
        self.aborted: list[str] = []

    def model_ids(self) -> list[str]:
        return list(self.ids)

    def _log(self, **rec) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    async def generate(self, request_id, prompt_token_ids, params, model=None):
        """n > 1: the n completions run interleaved, one token each per step (completion i starts its
        reply i tokens in, so they differ). With logprobs each token comes as a ``Sampled`` with
        made-up values (token t: logprob -t/1000, alternatives t+1..t+k modulo the vocabulary)."""
        self.calls.append((request_id, list(prompt_token_ids), params, model))
        prompt_text = self.tok.decode(prompt_token_ids)
        if "OVERLOAD" in prompt_text:
            raise EngineOverloaded("fake queue is full", retry_after_s=2.5)
        reply = self.tok.encode(prompt_text if "ECHO" in prompt_text else REPLY, add_bos=False)
        delay = 0.2 if "SLOW" in prompt_text else self.step_s
        n_prompt = len(prompt_token_ids)
        self.prefix_queries += n_prompt
        if tuple(prompt_token_ids) in self.seen_prompts:  # all but the last token, as the real engine
            self.prefix_hits += n_prompt - 1
        self.seen_prompts.add(tuple(prompt_token_ids))
        if n_prompt + params.max_tokens > self.max_seq_len:  # the HTTP layer must clamp max_tokens
            raise ValueError(f"prompt {n_prompt} + max_tokens {params.max_tokens} > max_seq_len {self.max_seq_len}")
        limit = params.max_tokens
        n = params.n
        outs: list[list[int]] = [[] for _ in range(n)]
        pos = list(range(n))
        live = set(range(n))
        self.running += 1
        try:
            yield TokenEvent([], None, n_prompt, 0)  # prefill scheduled: an empty first event is legal
            while live:
                await asyncio.sleep(delay)
                for i in sorted(live):
                    out = outs[i]
                    if "BOOM" in prompt_text and len(out) == 2:
                        raise RuntimeError("fake engine exploded")
                    j = pos[i]
                    if j < len(reply):
                        tid = reply[j]
                    elif params.ignore_eos:
                        tid = reply[j % len(reply)]
                    else:
                        tid = EOS
                    pos[i] += 1
                    self.steps += 1
                    self.expert_tokens[tid % 8] += 1
                    lps = None
                    if params.logprobs is not None:
                        alts = [(tid + k) % VOCAB for k in range(1, params.logprobs + 1)]
                        lps = [Sampled(tid, -tid / 1000, [(a, -a / 1000) for a in alts])]
                    if tid == EOS or tid in params.stop_token_ids:
                        live.discard(i)
                        yield TokenEvent([], "stop", n_prompt, len(out) + 1, i, queue_s=0.001)
                        continue
                    out.append(tid)
                    if len(out) >= limit:
                        live.discard(i)
                        yield TokenEvent([tid], "length", n_prompt, len(out), i, lps, queue_s=0.001)
                        continue
                    yield TokenEvent([tid], None, n_prompt, len(out), i, lps)
        finally:
            self.running -= 1
            if live:
                self.closed_early.append(request_id)
                self._log(event="closed_early", request_id=request_id, tokens=sum(len(o) for o in outs))

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._log(event="abort", request_id=request_id)

    def stats(self) -> dict:
        return {"running": self.running, "waiting": 0, "kv_blocks_used": self.running, "kv_blocks_total": 64,
                "kv_usage": self.running / 64, "expert_tokens": list(self.expert_tokens), "steps": self.steps,
                "max_batch_seen": 1, "prefix_cache_queries": self.prefix_queries,
                "prefix_cache_hits": self.prefix_hits}

    async def check_health(self) -> None:
        if self.unhealthy_path and os.path.exists(self.unhealthy_path):
            raise RuntimeError("actor 1 of the expert-parallel group is dead")

    async def load_patch(self, domain: str, patch_dir: str) -> str:
        vid = f"{self.ids[0]}:{domain}"
        if vid not in self.ids:
            self.ids.append(vid)
        return vid
