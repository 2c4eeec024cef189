"""The scheduler: continuous batching over a (possibly expert-parallel) group of workers.

No Ray and no asyncio here: ``EngineCore`` is driven step by step, by ``engine.AsyncEngine`` in a
Serve replica and by ``engine.generate`` in process, and is unit-tested against a fake executor.

- ``EngineCore`` owns the waiting queue, per-worker paged KV block accounting and the sequences.
  Each step admits waiting requests while a batch slot and cache blocks are free (attention is
  data-parallel: a sequence lives on the worker with the most free blocks), gives every running
  decode one token, spends the rest of the per-worker token budget (``max_num_batched_tokens``) on
  prefill chunks so a long prompt never stalls running streams, and turns sampled tokens into
  events. When a decode needs a block and none is free, the youngest sequence on that worker is
  preempted (blocks freed, recomputed later): requests wait, nothing crashes.
- The step contract (``StepItem`` in, one sampled token or None per item out, ``PLACEHOLDER``) is
  what crosses to the workers; ``TokenEvent`` is what leaves for the API.
- Recovery after a worker failure, in two calls: ``rollback`` forgets the steps that were in
  flight (their tokens were never emitted, so nothing is emitted twice), and ``fail_workers`` sends
  every sequence of a dead worker back to the queue to be re-prefilled from prompt + generated
  tokens through the ordinary chunked prefill. Sequences on surviving workers keep their caches:
  a cache slot holds attention input computed before the failure, which the replacement worker
  (same experts, same weights) would compute identically; the partly-run step only wrote slots
  at or past the rolled-back position, which the replay overwrites.

Every piece of per-sequence state the workers use is rebuilt from the accepted tokens: the tokens
themselves, the cache position, and the sampling draw, a function of (seed, position) (see
``model.sampling``). A request without a seed gets one here, at admission.
"""

import itertools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

from expertpool.errors import UserError
from expertpool.model.sampling import SamplingParams
from expertpool.platform.kv_blocks import BlockPool, block_hashes

log = logging.getLogger(__name__)


PLACEHOLDER = -1  # StepItem token: "the token you sampled for this sequence in the previous step"


class EngineOverloaded(Exception):
    """The queue is full: the request is refused before it starts (HTTP 503 with Retry-After)."""

    def __init__(self, msg: str, retry_after_s: float = 1.0):
        super().__init__(msg)
        self.retry_after_s = retry_after_s


class EngineUnavailable(Exception):
    """The engine cannot serve: its worker group failed and could not be recovered (HTTP 503 with
    Retry-After; Serve's health check then replaces the replica)."""

    def __init__(self, msg: str, retry_after_s: float = 10.0):
        super().__init__(msg)
        self.retry_after_s = retry_after_s


class RequestTooLong(UserError, ValueError):
    """A request whose prompt and max_tokens exceed the serving length (serving.max_seq_len)."""


@dataclass
class StepItem:
    seq_id: str
    tokens: list[int]          # new tokens, written to the cache at start_pos... (PLACEHOLDER: the token this
                               # worker sampled for seq_id in its previous step)
    start_pos: int
    block_table: list[int]
    sample: bool               # sample one token after the last new token (it takes position start_pos + len(tokens))
    params: SamplingParams
    variant: int = 0           # served variant (0 = base weights; see model.patch.add_variant)
    prompt_len: int = 0        # output tokens start at this position (a grammar matcher consumes those)
    draft: list[int] = field(default_factory=list)  # speculative tokens after ``tokens``, to verify
    lookahead: int | None = None  # the known token after ``tokens`` (a prefill chunk that is not the last)


@dataclass
class Sampled:
    """A sampled token with its logprob and the ``params.logprobs`` most likely (id, logprob): what a
    worker returns instead of the bare id when the request asked for logprobs."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SpecOut:
    """A speculative-decoding item's result: the tokens it emits (accepted drafts, then one sampled
    token), the draft for the next step, and per emitted token its logprobs when asked for."""
    tokens: list[int]
    draft: list[int]
    logprobs: list[Sampled] | None = None


@dataclass
class TokenEvent:
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    index: int = 0                          # which of the request's n completions
    logprobs: list[Sampled] | None = None   # one per token id, when the request asked for logprobs
    queue_s: float | None = None            # on the final event: arrival to first scheduled
    cached_tokens: int = 0                  # prompt tokens the prefix cache supplied (not prefilled again)


class Executor(Protocol):
    """What ``EngineCore`` needs from the workers: their count, a synchronous step (one result list
    per worker, in item order) and the release of finished sequences' worker-side state."""

    world: int

    def run(self, items_per_worker: list[list[StepItem]]) -> list[list[int | Sampled | SpecOut | None]]: ...

    def release(self, finished: list[tuple[int, str]]) -> None: ...


@dataclass
class Sequence:
    seq_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output: list[int] = field(default_factory=list)
    worker: int = -1
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0        # tokens written to the KV cache, counting steps still in flight
    pending: int = 0           # sampled tokens in flight (their step is submitted, not yet applied)
    finish_reason: str | None = None
    aborted: bool = False
    variant: int = 0
    index: int = 0             # completion index within its request (n > 1)
    forks: list["Sequence"] = field(default_factory=list)  # siblings that will share this one's prompt blocks
    share_len: int = 0         # prompt tokens (whole blocks) the forks share
    first_scheduled: float | None = None
    hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of the full blocks of tokens known so far
    num_registered: int = 0    # leading blocks of ``blocks`` indexed in the prefix cache
    cached_tokens: int = 0     # prompt tokens the prefix cache supplied at first admission
    draft: list[int] = field(default_factory=list)  # speculative tokens the last step proposed

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def slots(self) -> int:
        """Batch slots this sequence holds: itself and its forks-to-be (admitted together, one worker)."""
        return 1 + len(self.forks)


class EngineCore:
    def __init__(self, executor: Executor, *, num_blocks: int, block_size: int, max_batch_size: int,
                 max_seq_len: int, max_num_batched_tokens: int, eos_token_id: int | None, max_queued: int = 1 << 30,
                 vocab_size: int | None = None, prefix_caching: bool = True, spec_tokens: int = 0):
        self.executor = executor
        self.world = executor.world
        self.num_blocks = num_blocks
        self.block_size, self.max_seq_len = block_size, max_seq_len
        self.max_batch_size = max_batch_size
        self.per_worker_batch = -(-max_batch_size // self.world)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.token_budget = max(max_num_batched_tokens, self.per_worker_batch + block_size)
        self.eos = eos_token_id
        self.vocab_size = vocab_size
        self.max_queued = max_queued
        if num_blocks * block_size < max_seq_len:
            raise ValueError(f"KV cache of {num_blocks} blocks x {block_size} tokens cannot hold one sequence of "
                             f"max_seq_len={max_seq_len}; raise serving.kv_cache or lower max_seq_len")
        self.allocators = [BlockPool(num_blocks, prefix_caching) for _ in range(self.world)]
        self.spec_tokens = spec_tokens  # draft tokens per decode step (MTP speculative decoding; 0 = off)
        self.spec_drafts = 0       # decode steps that verified a draft
        self.spec_drafted = 0      # draft tokens verified
        self.spec_accepted = 0     # of which accepted
        self.spec_accepted_per_pos = [0] * spec_tokens
        self.prefix_queries = 0    # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0       # of which found cached
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.steps = 0
        self.aborted = 0
        self.preempted = 0
        self.replayed_tokens = 0
        self.max_batch_seen = 0
        self.finished_ids: list[tuple[int, str]] = []

    # ---- requests
    @staticmethod
    def completion_ids(request_id: str, n: int) -> list[str]:
        """Sequence ids of a request's n completions (the request id itself when n == 1)."""
        return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]

    def add_request(self, seq_id: str, prompt: list[int], params: SamplingParams, variant: int = 0) -> Sequence:
        """Queue a request; returns its first sequence. With ``params.n > 1`` it has n sequences
        (``completion_ids``) on one worker: the first prefills the prompt's whole blocks, which the
        others then share (block refcounts), each recomputing only the tail past the last whole block
        (< block_size tokens) so no block is ever written by two sequences. Completion i samples with
        seed + i, so the n completions differ (unless greedy)."""
        if seq_id in self.seqs:
            raise ValueError(f"duplicate request id {seq_id}")
        if not prompt:
            raise RequestTooLong("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise RequestTooLong(f"the prompt has {len(prompt)} tokens; the maximum sequence length is "
                                 f"{self.max_seq_len}, leaving room for at least one new token")
        if self.vocab_size is not None:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:  # caught here: inside a worker step it would fail the whole batch
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(self.waiting) >= self.max_queued:
            raise EngineOverloaded(f"{len(self.waiting)} requests are already waiting; retry later")
        if params.n > self.per_worker_batch:
            raise ValueError(f"n={params.n} completions exceed the {self.per_worker_batch} sequences one expert "
                             "actor batches (serving.max_batch_size / pool.actors_per_replica); lower n")
        if params.seed is None and params.temperature > 0:
            params = replace(params, seed=secrets.randbits(63))  # the draw survives a recompute (see model.sampling)
        ids = self.completion_ids(seq_id, params.n)
        if any(i in self.seqs for i in ids):
            raise ValueError(f"duplicate request id {seq_id}")
        seqs = []
        for i, sid in enumerate(ids):
            p = params if params.n == 1 else replace(
                params, n=1, seed=None if params.seed is None else (params.seed + i) % (1 << 64))
            seqs.append(Sequence(sid, list(prompt), p, variant=variant, index=i))
            self.seqs[sid] = seqs[-1]
        share = (len(prompt) - 1) // self.block_size * self.block_size
        if len(seqs) > 1 and share > 0:
            seqs[0].forks, seqs[0].share_len = seqs[1:], share
            self.waiting.append(seqs[0])
        else:
            self.waiting.extend(seqs)
        return seqs[0]

    def abort(self, seq_id: str) -> None:
        seq = self.seqs.get(seq_id)
        if seq is not None and seq.finish_reason is None:
            seq.aborted = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- blocks
    def _blocks_needed(self, seq: Sequence, upto: int) -> int:
        return max(0, -(-upto // self.block_size) - len(seq.blocks))

    def _free_seq(self, seq: Sequence) -> None:
        if seq.worker >= 0:
            self.allocators[seq.worker].release(seq.blocks)  # indexed blocks stay cached for reuse
            self.finished_ids.append((seq.worker, seq.seq_id))
        seq.blocks, seq.num_cached, seq.num_registered, seq.draft = [], 0, 0, []

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._free_seq(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:  # preempted while its last token was in flight
            self.waiting.remove(seq)
        self.seqs.pop(seq.seq_id, None)

    def kv_blocks_used(self) -> int:
        return sum(a.num_used() for a in self.allocators)

    def kv_blocks_total(self) -> int:
        return sum(a.num_blocks for a in self.allocators)

    # ---- scheduling
    def _drop_aborted(self, events: dict) -> None:
        """Aborts end the sequence and its forks-to-be (the API closes a request's n completions together)."""
        for seq in [s for s in itertools.chain(self.running, self.waiting)
                    if s.aborted or any(f.aborted for f in s.forks)]:
            for f in seq.forks if seq.aborted else [f for f in seq.forks if f.aborted]:
                seq.forks.remove(f)
                self._finish(f, "abort")
                events[f.seq_id] = TokenEvent([], "abort", len(f.prompt), 0, f.index)
            if not seq.aborted:
                continue
            if seq in self.waiting:
                self.waiting.remove(seq)
            self._finish(seq, "abort")
            self.aborted += 1
            events[seq.seq_id] = TokenEvent([], "abort", len(seq.prompt), len(seq.output), seq.index)

    def _fork(self, plans) -> None:
        """Sequences whose shared prompt blocks a just-completed step finished writing hand them to their
        forks, which join the batch on the same worker at position ``share_len``."""
        for w, plan in enumerate(plans):
            for seq, item in plan:
                nb = seq.share_len // self.block_size
                if (not seq.forks or seq.worker != w or item.start_pos + len(item.tokens) < seq.share_len
                        or seq.blocks[:nb] != item.block_table[:nb]):  # preempted since: forks wait for the replay
                    continue
                for f in seq.forks:
                    self.allocators[w].share(seq.blocks[:nb])
                    f.worker, f.blocks, f.num_cached = w, list(seq.blocks[:nb]), seq.share_len
                    f.arrival, f.first_scheduled = seq.arrival, seq.first_scheduled
                    self.running.append(f)
                seq.forks = []

    def _preempt(self, seq: Sequence) -> None:
        log.info("KV cache full on worker %d: preempting %s (%d tokens) for recompute", seq.worker, seq.seq_id,
                 len(seq.tokens))
        self.preempted += 1
        self._free_seq(seq)
        seq.worker = -1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _make_room(self, seq: Sequence, need: int) -> bool:
        """Free blocks on seq's worker by preempting sequences younger than seq (not yet planned this
        step, since planning goes oldest first); if none is younger, seq itself waits."""
        alloc = self.allocators[seq.worker]
        while need > alloc.num_available():
            younger = [s for s in self.running if s.worker == seq.worker and s.arrival > seq.arrival]
            if not younger:
                self._preempt(seq)
                return False
            self._preempt(max(younger, key=lambda s: s.arrival))
        return True

    def _owed(self, seq: Sequence) -> int:
        """Blocks ``seq`` (and its forks) still need to cache the prompt and sample once."""
        upto = min(len(seq.tokens) + 1, self.max_seq_len)
        per_fork = -(-upto // self.block_size) - seq.share_len // self.block_size
        return self._blocks_needed(seq, upto) + len(seq.forks) * per_fork

    def _cacheable(self, seq: Sequence) -> list[bytes]:
        """Hashes of the blocks a cache hit may cover: full blocks before the last known token (that one
        is always computed: its logits give the next token). A grammar matcher on the worker consumes
        output tokens from prefill chunks, so a sequence with a grammar reuses prompt blocks only."""
        bs = self.block_size
        limit = (len(seq.tokens) - 1) // bs
        if seq.params.grammar is not None:
            limit = min(limit, len(seq.prompt) // bs)
        if len(seq.hashes) < limit:
            seq.hashes += block_hashes(seq.tokens, bs, seq.variant, seq.hashes[-1] if seq.hashes else None,
                                       len(seq.hashes))[:limit - len(seq.hashes)]
        return seq.hashes[:limit]

    def _admit(self) -> None:
        while self.waiting and sum(s.slots for s in self.running) + self.waiting[0].slots <= self.max_batch_size:
            seq = self.waiting[0]
            if seq.pending:  # preempted with a token in flight: re-admit once its tokens are all known
                return
            per_worker = [sum(s.slots for s in self.running if s.worker == w) for w in range(self.world)]
            cands = [w for w in range(self.world) if per_worker[w] + seq.slots <= self.per_worker_batch]
            need = self._owed(seq)
            # blocks still owed to admitted sequences whose prompt is not fully cached yet
            owed = [sum(self._owed(s) for s in self.running if s.worker == w) for w in range(self.world)]
            room = [self.allocators[w].num_available() - owed[w] for w in range(self.world)]
            hashes = self._cacheable(seq)
            hits = {w: self.allocators[w].lookup(hashes) for w in cands}
            # a hit saves its blocks; taking a cached (unheld) one still uses up an available block
            cost = {w: need - sum(1 for b in hits[w] if self.allocators[w].refs[b] > 0) for w in cands}
            cands = [w for w in cands if room[w] >= cost[w]]
            if not cands:
                return
            # data-parallel placement: the worker holding the longest cached prefix, then the most room
            w = max(cands, key=lambda w: (len(hits[w]), room[w] - cost[w], -per_worker[w]))
            self.waiting.popleft()
            seq.worker = w
            if hits[w]:
                self.allocators[w].acquire(hits[w])
                seq.blocks, seq.num_registered = list(hits[w]), len(hits[w])
                seq.num_cached = len(hits[w]) * self.block_size
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
                seq.cached_tokens = seq.num_cached
                self.prefix_queries += len(seq.prompt)
                self.prefix_hits += seq.num_cached
            self.running.append(seq)

    def _register(self, plans) -> None:
        """Index the full blocks a just-completed step finished writing (prefix caching). Runs before
        ``process``, which may finish a sequence and release its blocks."""
        bs = self.block_size
        for w, plan in enumerate(plans):
            pool = self.allocators[w]
            for seq, item in plan:
                full = (item.start_pos + len(item.tokens)) // bs
                if (not pool.caching or full <= seq.num_registered or seq.worker != w
                        or seq.blocks[:full] != item.block_table[:full]):  # ended or preempted since
                    continue
                if len(seq.hashes) < full:
                    seq.hashes += block_hashes(seq.tokens, bs, seq.variant, seq.hashes[-1] if seq.hashes else None,
                                               len(seq.hashes))[:full - len(seq.hashes)]
                for i in range(seq.num_registered, full):
                    pool.register(seq.hashes[i], seq.blocks[i])
                seq.num_registered = full

    def _draft_for(self, seq: Sequence, n_known: int) -> list[int]:
        """The draft tokens a decode of ``seq`` verifies this step: none without a draft, under a grammar
        (its matcher takes one token per step), or with a token still in flight; never past max_tokens
        or max_seq_len (the step emits up to len(draft) + 1 tokens)."""
        if not seq.draft or seq.pending or seq.params.grammar is not None:
            return []
        room = min(seq.params.max_tokens - len(seq.output), self.max_seq_len - n_known) - 1
        return seq.draft[:max(0, room)]

    def _spec_room(self, n_draft: int) -> int:
        """Cache positions past the verified ones that the draft module writes while it chains its
        drafts (each depth caches one position ahead); 0 without speculation."""
        return n_draft + self.spec_tokens - 1 if self.spec_tokens else 0

    def _chunk(self, seq: Sequence, room: int) -> int:
        """The next prefill chunk of ``seq`` in ``room`` tokens. A prompt is prefilled up to its end and
        no further, in chunks that end on block boundaries (or at the prompt's end); the output tokens
        of a recomputed sequence (a replay after a worker failure, a preempted one) follow in chunks of
        their own and run as decode rows, as they did when they were generated (``ModelRunner.step``).
        Every position's cache entry and logits are then computed by the same function however the
        steps were packed: the fused CPU attention gives each query row the same result for any
        block-aligned chunking (measured bit for bit), and the decode rows are independent of their
        batch. So a replay continues exactly, in bfloat16 too (tested)."""
        start, P = seq.num_cached, len(seq.prompt)
        if start >= P:
            return min(len(seq.tokens) - start, room)
        chunk = min(P - start, room)
        if start + chunk < P:  # not the prompt's last chunk: end on a block boundary
            chunk = (start + chunk) // self.block_size * self.block_size - start
        return chunk

    def schedule(self) -> list[list[tuple[Sequence, StepItem]]]:
        self._admit()
        plans: list[list[tuple[Sequence, StepItem]]] = [[] for _ in range(self.world)]
        budget = [self.token_budget] * self.world
        # decodes first: one token each, growing the block table when a block fills
        # (with a step in flight, a sequence's newest token is not known yet: the item carries
        # PLACEHOLDER and the worker feeds it the token it sampled for that sequence last step)
        for seq in sorted(self.running, key=lambda s: s.arrival):
            n_known = len(seq.tokens) + seq.pending
            if seq.worker < 0 or seq.num_cached != n_known - 1:
                continue
            if len(seq.output) + seq.pending >= seq.params.max_tokens or n_known >= self.max_seq_len:
                continue  # the in-flight token ends it ("length"): nothing more to compute
            draft = self._draft_for(seq, n_known)
            need = self._blocks_needed(seq, seq.num_cached + 1 + self._spec_room(len(draft)))
            if not self._make_room(seq, need):
                continue
            seq.blocks += self.allocators[seq.worker].allocate(need)
            tok = PLACEHOLDER if seq.pending else seq.tokens[-1]
            plans[seq.worker].append((seq, StepItem(seq.seq_id, [tok], seq.num_cached, list(seq.blocks), True,
                                                    seq.params, seq.variant, len(seq.prompt), draft)))
            seq.num_cached += 1 + len(draft)
            seq.pending += 1
            budget[seq.worker] -= 1 + len(draft)
        # prefill chunks with the remaining per-worker budget
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.worker < 0 or seq.num_cached >= len(seq.tokens) - 1:
                continue
            w = seq.worker
            chunk = self._chunk(seq, budget[w])
            if chunk <= 0:
                continue
            alloc = self.allocators[w]
            extra = self._spec_room(0) if seq.num_cached + chunk == len(seq.tokens) else 0
            need = self._blocks_needed(seq, seq.num_cached + chunk + extra)
            if need > alloc.num_available():
                chunk = self._chunk(seq, len(seq.blocks) * self.block_size + alloc.num_available() * self.block_size
                                    - seq.num_cached - self._spec_room(0))
                need = self._blocks_needed(seq, seq.num_cached + chunk + self._spec_room(0))
                if chunk <= 0:
                    continue
            seq.blocks += alloc.allocate(need)
            done = seq.num_cached + chunk == len(seq.tokens)
            end = seq.num_cached + chunk
            plans[w].append((seq, StepItem(seq.seq_id, seq.tokens[seq.num_cached:end], seq.num_cached,
                                           list(seq.blocks), done, seq.params, seq.variant, len(seq.prompt),
                                           lookahead=None if done else seq.tokens[end])))
            seq.num_cached += chunk
            seq.pending += int(done)
            budget[w] -= chunk
        return plans

    def process(self, plans, results) -> dict[str, TokenEvent]:
        events: dict[str, TokenEvent] = {}
        for plan, res in zip(plans, results):
            for (seq, item), tok in zip(plan, res):
                if tok is None:
                    continue
                seq.pending -= 1
                if seq.aborted or seq.finish_reason is not None:
                    continue  # computed ahead for a sequence that has ended since: dropped
                if isinstance(tok, SpecOut):
                    toks, lps, seq.draft = tok.tokens, tok.logprobs, list(tok.draft)
                    if item.draft:
                        self._count_spec(item, len(toks) - 1)
                        seq.num_cached = item.start_pos + len(toks)  # the accepted drafts' cache entries stay
                elif isinstance(tok, Sampled):
                    toks, lps = [tok.token], [tok]
                else:
                    toks, lps = [tok], None
                reason, emitted = None, []
                p = seq.params
                for t in toks:  # stop as soon as one token ends the sequence: nothing past it is emitted
                    seq.output.append(t)
                    emitted.append(t)
                    if not p.ignore_eos and t == self.eos:
                        reason = "stop"
                    elif t in p.stop_token_ids:
                        reason = "stop"
                    elif len(seq.output) >= p.max_tokens or len(seq.tokens) >= self.max_seq_len:
                        reason = "length"
                    if reason:
                        break
                queued = seq.first_scheduled - seq.arrival if reason and seq.first_scheduled is not None else None
                events[seq.seq_id] = TokenEvent(emitted, reason, len(seq.prompt), len(seq.output), seq.index,
                                                None if lps is None else lps[:len(emitted)], queued,
                                                seq.cached_tokens)
                if reason:
                    self._finish(seq, reason)
        return events

    def _count_spec(self, item: StepItem, accepted: int) -> None:
        self.spec_drafts += 1
        self.spec_drafted += len(item.draft)
        self.spec_accepted += accepted
        for i in range(accepted):
            self.spec_accepted_per_pos[i] += 1

    def pop_finished(self) -> list[tuple[int, str]]:
        out, self.finished_ids = self.finished_ids, []
        return out

    def begin_step(self, events: dict[str, TokenEvent]):
        """Settle aborts (their final events go into ``events``), free finished sequences on the
        workers, and plan the next step: per worker, the StepItems to run (all empty = nothing to do)."""
        self._drop_aborted(events)
        self.executor.release(self.pop_finished())
        plans = self.schedule()
        return plans, [[it for _, it in p] for p in plans]

    def end_step(self, plans, results, events: dict[str, TokenEvent]) -> None:
        """Apply one step's sampled tokens (``results`` per worker) and release what finished."""
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, sum(len(p) for p in plans))
        self._register(plans)
        self._fork(plans)  # before process(): a sequence its first token finishes still hands its blocks over
        events.update(self.process(plans, results))
        self.executor.release(self.pop_finished())

    def step(self) -> dict[str, TokenEvent]:
        """Synchronous step (in-process generation)."""
        events: dict[str, TokenEvent] = {}
        plans, items = self.begin_step(events)
        if any(items):
            self.end_step(plans, self.executor.run(items), events)
        return events

    # ---- recovery
    def rollback(self, inflight_plans: list) -> None:
        """Forget steps that were submitted but whose results will never be applied (their group
        failed): each sequence's cache position goes back to where its oldest lost item started,
        and no token is in flight any more. Call once, with every lost step, before the next plan."""
        for plans in inflight_plans:
            for plan in plans:
                for seq, item in plan:
                    seq.num_cached = min(seq.num_cached, item.start_pos)
        for seq in itertools.chain(self.running, self.waiting):
            seq.pending = 0
            if seq.worker < 0:
                seq.num_cached = 0

    def fail_workers(self, dead: set[int]) -> list[Sequence]:
        """Workers ``dead`` lost their caches (they are replaced by fresh ones): their sequences go back
        to the front of the queue, in arrival order, to be re-prefilled from prompt + output; their
        block pools start empty. Returns the sequences to replay."""
        lost = [s for s in self.running if s.worker in dead]
        for seq in lost:
            self.running.remove(seq)
            seq.worker, seq.blocks, seq.num_cached, seq.pending, seq.num_registered = -1, [], 0, 0, 0
            seq.draft = []
            self.replayed_tokens += len(seq.tokens)
        for w in dead:
            self.allocators[w].reset()
        self.finished_ids = [(w, s) for w, s in self.finished_ids if w not in dead]
        self.waiting = deque(sorted(itertools.chain(lost, self.waiting), key=lambda s: s.arrival))
        return lost

    def resize(self, keep: list[int | None]) -> list[Sequence]:
        """The group's width changes (elastic expert parallelism): new worker i takes over old worker
        ``keep[i]``'s cache (its sequences and block pool), or starts empty when ``keep[i]`` is None.
        Sequences of old workers not kept go back to the front of the queue to be re-prefilled, as
        after a failure. Call between steps, with nothing in flight. Returns those sequences."""
        assert not any(s.pending for s in self.running), "resize with a step in flight"
        dropped = {w for w in range(self.world)} - {k for k in keep if k is not None}
        lost = self.fail_workers(dropped) if dropped else []
        new_index = {old: new for new, old in enumerate(keep) if old is not None}
        num_blocks = self.allocators[0].num_blocks
        caching = self.allocators[0].caching
        self.allocators = [self.allocators[k] if k is not None else BlockPool(num_blocks, caching) for k in keep]
        for seq in self.running:
            seq.worker = new_index[seq.worker]
        self.finished_ids = [(new_index[w], s) for w, s in self.finished_ids if w in new_index]
        self.world = len(keep)
        self.per_worker_batch = -(-self.max_batch_size // self.world)
        self.token_budget = max(self.max_num_batched_tokens, self.per_worker_batch + self.block_size)
        return lost

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "sequences": len(self.seqs),
                "kv_blocks_used": self.kv_blocks_used(), "kv_blocks_total": self.kv_blocks_total(),
                "kv_blocks_used_per_worker": [a.num_used() for a in self.allocators],
                "prefix_cache_queries": self.prefix_queries, "prefix_cache_hits": self.prefix_hits,
                "prefix_cache_evictions": sum(a.evictions for a in self.allocators),
                "spec_decode_num_drafts": self.spec_drafts, "spec_decode_num_draft_tokens": self.spec_drafted,
                "spec_decode_num_accepted_tokens": self.spec_accepted,
                "spec_decode_num_accepted_tokens_per_pos": list(self.spec_accepted_per_pos),
                "kv_usage": self.kv_blocks_used() / max(1, self.kv_blocks_total()),
                "steps": self.steps, "max_batch_seen": self.max_batch_seen, "aborted": self.aborted,
                "preempted": self.preempted, "replayed_tokens": self.replayed_tokens}
