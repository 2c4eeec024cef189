"""Model runner and the expert-parallel worker actor.

``ModelRunner`` (plain class, no Ray): owns a model and its paged MLA latent cache and runs one
engine step: a flat batch of sequences, each with new tokens at a known cache position, through
``Transformer.forward_batch``; samples the next token for sequences whose new tokens reach their
end. Sampling is stateless (a function of seed and position, ``model.sampling``): the only
per-sequence state kept here is the last sampled token, which feeds ``PLACEHOLDER`` items under
async scheduling and is never needed after a recovery (the engine sends explicit tokens then).

``ExpertWorker`` (Ray actor): one member of a replica's expert-parallel group. Three phases:
``load`` (dense weights plus only its routed experts, and its KV cache; no collectives), ``join``
(torch.distributed group: gloo on CPU, NCCL on GPU, collectives bounded by a timeout; tearing down
any earlier group first, so a group is re-formed by calling ``join`` on every rank again) and
``step``. Steps and releases normally come over the replica's step channel
(``platform.step_channel``: one TCP connection, served on one thread of the actor) rather than as Ray
actor tasks; every method that touches the runner or the group, and every channel frame, runs on one
compute thread of the actor, one at a time.
Attention is data-parallel: each worker holds the latent cache of the sequences the engine
assigned to it. All workers of a group run every step (with an empty batch if need be) because MoE
layers are collectives. ``ping`` and ``abort_group`` run in their own concurrency group, so a
liveness check is answered even while a step runs, and a step stuck in an NCCL collective can be
released.

The executors that drive a runner or a group of these actors are in ``platform.executor``.
"""

import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch

from expertpool import kernels
from expertpool.model.attention import AttnBatch, PagedLatentCache
from expertpool.model.checkpoint import DTYPES, load_checkpoint
from expertpool.model.decode_graphs import DecodeGraphs, graph_safe
from expertpool.model.grammar import Constrainer
from expertpool.model.moe import ExpertIds, all_expert_ids
from expertpool.model.sampling import greedy, sample, verify
from expertpool.model.transformer import Transformer
from expertpool.platform.scheduler import Sampled, SpecOut, StepItem

log = logging.getLogger(__name__)

CONTROL = "control"  # the actor concurrency group of ping/abort_group: never queued behind a step
PREPARE = "prepare"  # loading a new expert placement beside the one in use, while steps go on


class ModelRunner:
    """``tokenizer``: a ``model.tokenizer.Tokenizer``, needed only for requests with a grammar (its
    llguidance vocabulary is built on the first such request). ``spec_tokens``: MTP speculative
    decoding, drafts per step (0 = off); the model must have its MTP module, whose latent cache is one
    more layer of the paged cache. ``scratch_blocks`` cache blocks past ``num_blocks`` belong to the
    runner, never to a sequence: warm-up steps and the padding rows of graphed decode steps write there."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, device="cpu", tokenizer=None,
                 spec_tokens: int = 0, scratch_blocks: int = 0):
        self.model = model
        args = model.args
        n_mtp = len(model.model.mtp)
        if spec_tokens and not n_mtp:
            raise ValueError("serving.speculative (method mtp) needs the checkpoint's multi-token-prediction layer, "
                             "and this model has none (num_nextn_predict_layers = 0 or no model.layers."
                             f"{args.num_hidden_layers}.* tensors); turn speculative decoding off")
        self.spec_tokens = spec_tokens
        self.cache = PagedLatentCache(args.num_hidden_layers + (n_mtp if spec_tokens else 0),
                                      num_blocks + scratch_blocks, block_size, args.kv_cache_dim,
                                      dtype=model.compute_dtype, device=device)
        self.num_blocks = num_blocks
        self.scratch = list(range(num_blocks, num_blocks + scratch_blocks))
        self.device = device
        self.tokenizer = tokenizer
        self._constrainer: Constrainer | None = None
        self._last: dict[str, int] = {}  # last sampled token per sequence (feeds PLACEHOLDER items)
        self.graphs: DecodeGraphs | None = None
        model.prepare_for_inference()

    def enable_decode_graphs(self, buckets: list[int], max_seq_len: int, capture: bool | None = None) -> str:
        """Run decode steps of up to ``max(buckets)`` sequences from static buffers, captured as CUDA
        graphs per bucket (``capture``: default, when on CUDA). Needs a scratch block. Returns what was
        decided and why (logged by the caller)."""
        ok, why = graph_safe(self.model)
        if capture is None:
            capture = torch.device(self.device).type == "cuda"
        if not self.scratch or not (ok or not capture):
            return f"eager decode ({why if not ok else 'no scratch block'})"
        self.graphs = DecodeGraphs(self.model, self.cache, -(-max_seq_len // self.cache.block_size), buckets,
                                   self.scratch[0], capture)
        with torch.inference_mode():
            n = self.graphs.capture_all()
        return f"decode from static buffers, buckets {buckets}" + (f", {n} CUDA graphs captured" if capture else "")

    @property
    def constrainer(self) -> Constrainer:
        if self._constrainer is None:
            assert self.tokenizer is not None, "a request with a grammar reached a ModelRunner without a tokenizer"
            t0 = time.time()
            vocab = self.model.args.vocab_size
            self._constrainer = Constrainer(self.tokenizer.llguidance_tokenizer(vocab), vocab)
            log.info("grammar vocabulary of %d tokens built in %.1fs", vocab, time.time() - t0)
        return self._constrainer

    @torch.inference_mode()
    def step(self, items: list[StepItem]) -> list[int | Sampled | SpecOut | None]:
        """One engine step. Each item's tokens, then its draft tokens (speculative decoding), run
        through the model at start_pos.... A sampling item without a draft samples after its last
        token; with a draft, each row from its first token on samples its position as plain decoding
        would (``model.sampling.verify``): drafts are accepted while they equal those samples, the
        first sample that differs is emitted instead, and if all are accepted the last row's sample
        follows. With speculation on, the MTP module then runs over every row whose
        next token is now known (filling its own cache) and chains ``spec_tokens`` drafts per sampling
        item from its last row."""
        last = self._last
        resolved = [[last[it.seq_id] if t < 0 else t for t in it.tokens] for it in items]
        inputs = [r + list(it.draft) for r, it in zip(resolved, items)]
        q_lens = [len(x) for x in inputs]
        rows, offsets, ends = [], [], 0
        for it, n in zip(items, q_lens):
            offsets.append(ends)
            ends += n
            if it.sample:  # a draft item: the rows of its first token and of every draft token
                rows.extend(range(ends - 1 - len(it.draft), ends))
        hidden_ND = None
        g = self.graphs
        if (g is not None and items and not self.spec_tokens and all(n == 1 for n in q_lens)
                and g.bucket(len(items)) is not None and not any(it.variant for it in items)):
            # a decode step that fits a bucket: static buffers (a CUDA graph on GPUs)
            logits = g.run([x[0] for x in inputs], [it.start_pos for it in items], [it.block_table for it in items])
            if not all(it.sample for it in items):
                logits = logits[[i for i, it in enumerate(items) if it.sample]]
        else:
            batch = AttnBatch.build(self.cache, [it.block_table for it in items], [it.start_pos for it in items],
                                    q_lens, device=self.device, variants=[it.variant for it in items],
                                    as_decode=[_fed_back(it) for it in items])
            tokens_N = torch.tensor([t for x in inputs for t in x], dtype=torch.long, device=self.device)
            rows_R = torch.tensor(rows, dtype=torch.long, device=self.device)
            if self.spec_tokens:
                logits, hidden_ND = self.model.forward_batch(tokens_N, batch, rows_R, return_hidden=True)
            else:
                logits = self.model.forward_batch(tokens_N, batch, rows_R)
        sampled = [it for it in items if it.sample]
        row0, r = [], 0  # each sampling item's first logits row
        for it in sampled:
            row0.append(r)
            r += 1 + len(it.draft)
        raw = logits
        if not sampled or (len(sampled) == logits.shape[0] and not any(it.draft for it in sampled)):
            last_logits = logits  # every row is a sampling item's last row: no copy
        else:
            last_R = torch.tensor([a + len(it.draft) for a, it in zip(row0, sampled)], dtype=torch.long,
                                  device=self.device)
            last_logits = logits.index_select(0, last_R)
        if any(it.params.grammar is not None for it in items):
            last_logits = self._apply_grammars(items, resolved, last_logits)
        ends_at = [it.start_pos + len(it.tokens) + len(it.draft) for it in sampled]
        plain = sample(last_logits, [it.params for it in sampled], ends_at).tolist() if sampled else []
        emitted = self._verify(logits, sampled, row0, plain)
        lps = self._logprobs(raw, sampled, row0, emitted)
        drafts = self._draft(items, inputs, hidden_ND, offsets, emitted) if self.spec_tokens else None
        out, j = [], 0
        for it in items:
            if not it.sample:
                out.append(None)
                continue
            last[it.seq_id] = emitted[j][-1]
            if drafts is not None:
                out.append(SpecOut(emitted[j], drafts[j], lps[j]))
            else:
                out.append(emitted[j][0] if lps[j] is None else lps[j][0])
            j += 1
        return out

    def _verify(self, logits_RV, sampled: list[StepItem], row0: list[int], plain: list[int]) -> list[list[int]]:
        """The tokens each sampling item emits: its sampled token, or for a draft the accepted draft
        tokens and then the replacement of the first rejected one (or the last row's sample)."""
        emitted = [[tok] for tok in plain]
        spec = [j for j, it in enumerate(sampled) if it.draft]
        if not spec:
            return emitted
        vrows = [row0[j] + i for j in spec for i in range(len(sampled[j].draft))]
        params = [sampled[j].params for j in spec for _ in sampled[j].draft]
        positions = [sampled[j].start_pos + 1 + i for j in spec for i in range(len(sampled[j].draft))]
        drafts = [d for j in spec for d in sampled[j].draft]
        acc, alt = verify(logits_RV.index_select(0, torch.tensor(vrows, device=logits_RV.device)), params,
                          positions, drafts)
        acc, alt, base = acc.tolist(), alt.tolist(), 0
        for j in spec:
            out = []
            for i, d in enumerate(sampled[j].draft):
                if not acc[base + i]:
                    out.append(alt[base + i])
                    break
                out.append(d)
            else:
                out.append(plain[j])
            base += len(sampled[j].draft)
            emitted[j] = out
        return emitted

    def _draft(self, items: list[StepItem], inputs: list[list[int]], hidden_ND, offsets: list[int],
               emitted: list[list[int]]) -> list[list[int]]:
        """The MTP module's rows of this step and the next drafts (greedy: the module's argmax). A row
        is a position whose next token is known now: every input row of a prefill chunk (the last one
        with its look-ahead or sampled token), the verified rows of a decode. Then depth by depth each
        sampling item's newest row proposes one more token, one position further on. Every rank runs
        all ``spec_tokens`` depths, with no rows if need be: the module's MoE layer is a collective."""
        dev = self.device
        tables, starts, q_lens, hid, nxt, as_decode = [], [], [], [], [], []
        newest: list[tuple[int, int, list[int]]] = []  # per sampling item: (its newest row, position, table)
        j = 0
        for it, x, off in zip(items, inputs, offsets):
            if it.sample:
                follow = emitted[j] if it.draft else x[1:] + emitted[j][:1]
                j += 1
            else:
                follow = x[1:] + ([] if it.lookahead is None else [it.lookahead])
            if not follow:
                continue
            tables.append(it.block_table)
            starts.append(it.start_pos)
            q_lens.append(len(follow))
            as_decode.append(_fed_back(it))  # as in the main model's step
            hid.extend(range(off, off + len(follow)))
            nxt.extend(follow)
            if it.sample:
                newest.append((len(hid) - 1, it.start_pos + len(follow) - 1, it.block_table))
        h_MD = hidden_ND.index_select(0, torch.tensor(hid, dtype=torch.long, device=dev))
        tok_M = torch.tensor(nxt, dtype=torch.long, device=dev)
        batch = AttnBatch.build(self.cache, tables, starts, q_lens, device=dev, as_decode=as_decode)
        sel = torch.tensor([r for r, _, _ in newest], dtype=torch.long, device=dev)
        drafts: list[list[int]] = [[] for _ in newest]
        n_mtp = len(self.model.model.mtp)
        for depth in range(self.spec_tokens):
            x_MD, logits = self.model.mtp_forward_batch(h_MD, tok_M, batch, min(depth, n_mtp - 1), sel)
            proposed = greedy(logits).tolist()
            for d, t in zip(drafts, proposed):
                d.append(t)
            if depth + 1 < self.spec_tokens:  # chain: the newest row's output and its proposal, one position on
                h_MD, tok_M = x_MD.index_select(0, sel), torch.tensor(proposed, dtype=torch.long, device=dev)
                batch = AttnBatch.build(self.cache, [t for _, _, t in newest], [p + depth + 1 for _, p, _ in newest],
                                        [1] * len(newest), device=dev)
                sel = torch.arange(len(newest), dtype=torch.long, device=dev)
        return drafts

    def _apply_grammars(self, items: list[StepItem], resolved: list[list[int]], logits_BV: torch.Tensor):
        """Feed every constrained item's output tokens to its matcher and mask the rows it samples."""
        c = self.constrainer
        rows = [j for j, it in enumerate(it for it in items if it.sample) if it.params.grammar is not None]
        bitmask = c.bitmask(len(rows)) if rows else None
        r = 0
        for it, toks in zip(items, resolved):
            if it.params.grammar is None:
                continue
            c.advance(it.seq_id, it.params.grammar, it.prompt_len, it.start_pos, toks)
            if it.sample:
                c.fill(it.seq_id, bitmask, r)
                r += 1
        if not rows:
            return logits_BV
        logits_BV = logits_BV.float()  # a copy: the logprobs stay those of the model
        idx = torch.tensor(rows, device=logits_BV.device)
        masked = logits_BV.index_select(0, idx)
        c.apply(masked, bitmask)
        return logits_BV.index_copy(0, idx, masked)

    @staticmethod
    def _logprobs(logits_RV: torch.Tensor, sampled: list[StepItem], row0: list[int],
                  emitted: list[list[int]]) -> list[list[Sampled] | None]:
        """The model's logprobs (before temperature, top-k/p and grammar, as vLLM's default) of each
        emitted token (the i-th comes from the item's i-th logits row) and the requested top-k; only
        those numbers leave the worker."""
        out: list[list[Sampled] | None] = [None] * len(sampled)
        want = [(j, i) for j, it in enumerate(sampled) if it.params.logprobs is not None
                for i in range(len(emitted[j]))]
        if not want:
            return out
        idx = torch.tensor([row0[j] + i for j, i in want], device=logits_RV.device)
        lp_BV = torch.log_softmax(logits_RV.index_select(0, idx).float(), dim=-1)
        k = max(sampled[j].params.logprobs for j, _ in want)
        top_v, top_i = lp_BV.topk(k, dim=-1) if k else (lp_BV[:, :0], lp_BV[:, :0].long())
        toks = [emitted[j][i] for j, i in want]
        chosen = lp_BV.gather(1, torch.tensor([[t] for t in toks], device=lp_BV.device)).squeeze(1).tolist()
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for r, (j, i) in enumerate(want):
            kj = sampled[j].params.logprobs
            out[j] = (out[j] or []) + [Sampled(toks[r], chosen[r], list(zip(top_i[r][:kj], top_v[r][:kj])))]
        return out

    def release(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self._last.pop(s, None)
        if self._constrainer is not None:
            self._constrainer.release(seq_ids)

    def load_patch(self, patch_dir: str, base_model_dir: str | None = None) -> int:
        """Add an ESFT expert patch as a served variant; only the experts this model holds are kept.
        An MTP patch (kind ``mtp``) instead overwrites the MTP module in place (its experts this model
        holds, and its other tensors) and returns 0, the base: the drafts use it from the next step.
        With base_model_dir, the patch must have been trained from that checkpoint."""
        from expertpool.model.patch import read_patch
        return self.use_patch(read_patch(patch_dir, base_model_dir=base_model_dir), patch_dir)

    def use_patch(self, patch, patch_dir: str = "") -> int:
        """``load_patch`` of a patch already read (``model.patch.Patch``)."""
        from expertpool.model.patch import PatchError, add_variant, apply_patch
        if patch.kind == "mtp":
            if not len(self.model.model.mtp):
                raise PatchError(f"{patch_dir}: an MTP patch, but this model has no MTP module loaded (serving."
                                 "speculative is off); turn speculative decoding on to use it")
            apply_patch(self.model, patch)
            self.model.prepare_for_inference()  # re-pack the rewritten linears (a stale packing is never used)
            return 0
        return add_variant(self.model, patch.experts)

    def expert_load(self) -> dict[int, list[int]]:
        """Cumulative tokens this process routed to each logical expert, per MoE layer id."""
        return {m.layer_id: m.expert_load.tolist() for m in self.model.moe_layers()}

    @torch.inference_mode()
    def expert_cost(self, rows: int = 64, repeats: int = 5) -> float:
        """The rows one weight read of a routed expert costs as much as, on this device and in the
        resident format (EPLB's load model, ``placement.LoadModel``): one expert of the first MoE
        layer timed at 1 and at ``rows`` rows (best of ``repeats``), fitted as read + rows x row."""
        layers = self.model.moe_layers()
        if not layers:
            return 0.0
        experts = layers[0].experts
        x = torch.randn(rows, self.model.args.hidden_size, dtype=self.model.compute_dtype, device=self.device)
        ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        weights = torch.ones(rows, 1, dtype=torch.float32, device=self.device)
        sync = torch.cuda.synchronize if torch.device(self.device).type == "cuda" else (lambda: None)

        def best(n: int) -> float:
            times = []
            for _ in range(repeats + 1):  # the first run is a warm-up
                sync()
                t0 = time.perf_counter()
                experts(x[:n], ids[:n], weights[:n])
                sync()
                times.append(time.perf_counter() - t0)
            return min(times[1:])

        one, many = best(1), best(rows)
        per_row = max(many - one, 1e-9) / (rows - 1)
        return max(0.0, one - per_row) / per_row


def _fed_back(it: StepItem) -> bool:
    """Whether an item's tokens are output tokens fed back (a decode, a speculative verification, the
    output part of a replay): they run as decode rows, one query per token over its own context, the
    function that computed them when they were generated; a prompt's chunks run as prefill, a last
    chunk of one token too. Items that do not say where their prompt ends (``prompt_len`` 0: direct
    runner users) decode exactly their single-token items."""
    if it.prompt_len:
        return it.prompt_len <= it.start_pos
    return len(it.tokens) + len(it.draft) == 1


def keep_bf16_experts(dtype: str, device) -> bool:
    """Whether a serving process keeps bf16-stored routed experts in bf16 under fp32 compute (weights
    as stored): on a CPU where the grouped expert kernel runs, which widens them in registers; decode
    then reads half the expert bytes, with the checkpoint's exact values."""
    from expertpool.kernels import cpu_experts
    return dtype == "float32" and torch.device(device).type == "cpu" and cpu_experts.library() is not None


def load_model(model_dir: str, dtype: str, weight_dtype: str | None, experts=None, device="cpu",
               with_mtp: bool = False, keep_bf16: bool | None = None) -> Transformer:
    """The model as a serving process loads it; ``keep_bf16``: ``keep_bf16_experts``, decided here
    unless the caller already did."""
    if torch.device(device).type == "cpu":
        from expertpool.kernels import cpu_experts
        cpu_experts.library()  # built (about a second) or found before the first step, not during it
    if keep_bf16 is None:
        keep_bf16 = keep_bf16_experts(dtype, device)
    return load_checkpoint(model_dir, dtype=DTYPES[dtype], weight_dtype=weight_dtype, experts=experts,
                           device=device, with_mtp=with_mtp, keep_bf16_experts=keep_bf16)


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a group loads; the same for a replacement as for the original."""
    model_dir: str
    dtype: str                       # auto | float32 | bfloat16: each worker resolves auto on its device
    weight_dtype: str | None
    num_blocks: int | None           # KV blocks per worker; None: sized by the engine after the load
    block_size: int
    backend: str = "auto"            # auto | gloo | nccl
    threads: int = 1
    collective_timeout_s: float = 60.0
    tokenizer_dir: str | None = None  # None = model_dir; the grammar mask's vocabulary
    spec_tokens: int = 0             # MTP speculative decoding: drafts per step (0 = off)
    scratch_blocks: int = 1          # runner-owned blocks past num_blocks (warm-up, graph padding)
    max_seq_len: int = 512
    max_num_batched_tokens: int = 256
    max_batch_size: int = 32         # the replica's; a worker decodes at most ceil(max_batch_size / world)
    cuda_graphs: bool = True
    triton_cache_dir: str | None = None
    batch_invariant: bool = False    # serving.batch_invariant (kernels.set_batch_invariant)
    shared_memory: bool = True       # pool.shared_memory: MoE exchanges through /dev/shm when co-located (gloo)

    def plan_inputs(self, dtype: str) -> dict[str, Any]:
        return {"weight_dtype": self.weight_dtype, "dtype": DTYPES[dtype], "max_seq_len": self.max_seq_len,
                "max_num_batched_tokens": self.max_num_batched_tokens, "max_batch_size": self.max_batch_size}


def _cuda_device_index() -> int:
    """The CUDA device Ray gave this actor. Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs, so it
    is device 0; with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES every GPU stays visible and the id
    Ray assigned is the index."""
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
        ids = ray.get_gpu_ids()
        assert ids, "a GPU actor without GPU ids: reserve pool.actor_resources.gpu >= 1"
        return int(ids[0])
    return 0


def _one_at_a_time(method):
    """Run the actor method on the worker's compute thread, one at a time (the worker's lock): every
    torch op of the actor runs on that one thread, whether Ray or the step channel asked for it. Two
    threads running OpenMP regions would give the process two OpenMP teams, and with more libgomp
    threads than CPUs libgomp stops spin-waiting between regions (each of a step's ~1,000 regions then
    wakes a sleeping thread). Called on the compute thread itself (one method calling another), it runs
    directly."""
    @functools.wraps(method)
    def on_compute(self, *args, **kwargs):
        return self._on_compute(method, self, *args, **kwargs)
    return on_compute


class ExpertWorker:
    """Ray actor body (wrapped with ray.remote by ``executor.RayExecutor``)."""

    def __init__(self, rank: int, world: int):
        from expertpool.platform.logs import show_info_logs
        show_info_logs()
        self.rank, self.world = rank, world
        self.runner: ModelRunner | None = None
        # per expert, the ranks with a copy: the base layout's table and those of the layers with their own
        # (``Placement.copies``); None: contiguous ranges
        self.replicas: tuple[list[list[int]], dict[int, list[list[int]]]] | None = None
        # the patches loaded, in order: (directory, kind), read again for a new expert placement (the tensors
        # are not kept: a served variant's experts already live in the model, a second copy would double them)
        self._patches: list[tuple[str, str]] = []
        self._prepared: tuple[ExpertIds, dict, list] | None = None  # experts, their modules, MTP patches
        self.device = "cpu"
        self.backend = "gloo"
        self.generation = -1
        self.exchange = None  # model.shm_exchange.ShmExchange of the current group, or None (the group's gloo)
        self._lock = threading.RLock()  # held while a Ray method or a channel frame waits for the compute thread
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="expertpool-compute")  # ``_one_at_a_time``
        self._compute_thread = self._compute.submit(threading.current_thread).result()
        self._channel = None  # step_channel.ChannelServer, once the replica asks for it

    def _on_compute(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the compute thread (directly when already on it), one caller at a time."""
        if threading.current_thread() is self._compute_thread:
            return fn(*args, **kwargs)
        with self._lock:
            return self._compute.submit(fn, *args, **kwargs).result()

    @_one_at_a_time
    def load(self, spec: WorkerSpec, experts: ExpertIds = None) -> dict[str, Any]:
        """Load the dense weights and this rank's experts (``experts``: the rank's slots of the group's
        placement, per layer where layers differ; default: its contiguous range) (and the KV cache when
        ``spec.num_blocks`` is known; else ``allocate_cache`` follows); returns where it runs and what
        it holds (rank, pid, node, device, expert ids, the compute dtype and why, device memory free
        after the load).
        ``spec.model_dir`` is any checkpoint location (``model.storage``): a remote one is fetched here,
        only the dense shards and this rank's."""
        from expertpool.model.args import ModelArgs
        from expertpool.model.dispatch import owned_experts
        from expertpool.model.dtype import log_choice, resolve_dtype
        from expertpool.model.storage import resolve_model
        from expertpool.model.tokenizer import Tokenizer
        from expertpool.platform import actor_memory as memory_plan

        if spec.triton_cache_dir:  # before anything compiles: Triton reads it when it writes a kernel
            os.environ["TRITON_CACHE_DIR"] = spec.triton_cache_dir
        torch.set_num_threads(max(1, spec.threads))
        kernels.set_batch_invariant(spec.batch_invariant)
        use_cuda = torch.cuda.is_available() and spec.backend != "gloo"
        if use_cuda:
            index = _cuda_device_index()
            torch.cuda.set_device(index)
            self.device = f"cuda:{index}"
        self.backend = ("nccl" if use_cuda else "gloo") if spec.backend == "auto" else spec.backend
        self.spec = spec
        t0 = time.time()
        args = ModelArgs.from_dir(resolve_model(spec.model_dir, weights=False))
        choice = resolve_dtype(spec.dtype, self.device)
        log_choice(spec.dtype, choice, f"worker {self.rank} ({self.device})")
        if use_cuda:  # refuse before loading what cannot fit, with what to change
            props = torch.cuda.get_device_properties(self.device)
            memory_plan.check(args, self.world, props.total_memory, where=f"the GPU of rank {self.rank} ({props.name})",
                              **spec.plan_inputs(choice.dtype))
        self.n_experts = args.n_routed_experts
        self.experts = experts if experts is not None else owned_experts(self.rank, self.world, self.n_experts)
        with_mtp = spec.spec_tokens > 0  # the MTP module drafts for speculative decoding
        self.model_dir = str(resolve_model(spec.model_dir, experts=all_expert_ids(self.experts), with_mtp=with_mtp))
        self.keep_bf16_experts = keep_bf16_experts(choice.dtype, self.device)  # a new placement loads the same way
        self.model = load_model(self.model_dir, choice.dtype, spec.weight_dtype, self.experts, self.device,
                                with_mtp=with_mtp, keep_bf16=self.keep_bf16_experts)
        self.model.prepare_for_inference()
        # the tokenizer files came with the fetched checkpoint; a separate location: its small files only
        self.tokenizer = Tokenizer.from_dir(resolve_model(spec.tokenizer_dir, weights=False) if spec.tokenizer_dir
                                            else self.model_dir)
        free = torch.cuda.mem_get_info(self.device)[0] if use_cuda else None
        if spec.num_blocks is not None:
            self.allocate_cache(spec.num_blocks)
        log.info("worker %d/%d loaded experts %s on %s (%s) in %.1fs", self.rank, self.world, expert_span(self.experts),
                 self.device, choice.dtype, time.time() - t0)
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "device": self.device, "experts": self.experts, "dtype": choice.dtype, "dtype_reason": choice.reason,
                "free_bytes": free}

    @_one_at_a_time
    def allocate_cache(self, num_blocks: int) -> None:
        self.runner = ModelRunner(self.model, num_blocks, self.spec.block_size, self.device, self.tokenizer,
                                  self.spec.spec_tokens, self.spec.scratch_blocks)

    @_one_at_a_time
    def enable_decode_graphs(self) -> str:
        """After the warm-up: capture decode steps per batch bucket where the forward allows it."""
        from expertpool.model.decode_graphs import decode_buckets

        per_worker = -(-self.spec.max_batch_size // self.world)
        if not self.spec.cuda_graphs or torch.device(self.device).type != "cuda":
            return "eager decode (no CUDA, or serving.cuda_graphs is off)"
        how = self.runner.enable_decode_graphs(decode_buckets(per_worker), self.spec.max_seq_len)
        log.info("worker %d: %s", self.rank, how)
        return how

    def rendezvous_address(self) -> tuple[str, int]:
        import socket
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    @_one_at_a_time
    def join(self, master_addr: str, master_port: int, generation: int) -> int:
        """(Re-)form the group: leave any earlier one, then rendezvous with every rank at the address.
        Collectives wait at most ``collective_timeout_s`` for a peer, so a dead peer is detected."""
        import torch.distributed as dist

        t0 = time.time()
        if self.exchange is not None:
            self.exchange.close()
            self.exchange = None
        if dist.is_initialized():
            dist.destroy_process_group()
        kwargs: dict[str, Any] = {}
        if self.backend == "nccl":
            kwargs["device_id"] = torch.device(self.device)
        dist.init_process_group(self.backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world, timeout=timedelta(seconds=self.spec.collective_timeout_s),
                                **kwargs)
        how = self.backend
        if self.backend == "gloo" and self.world > 1 and self.spec.shared_memory:
            from expertpool.model.shm_exchange import join_group, slot_bytes_for

            slot = slot_bytes_for(self.world)
            self.exchange = join_group(slot_bytes=slot, timeout_s=self.spec.collective_timeout_s,
                                       tag=f"g{generation}")
            how = (f"gloo, MoE exchanges through /dev/shm ({self.world ** 2 * 2 * slot >> 20} MiB, "
                   f"{self.exchange.describe_wait()})"
                   if self.exchange is not None else "gloo; /dev/shm not shared by every rank, exchanges on gloo")
        if self.exchange is not None:
            how += f"; output head split by vocabulary, this rank's slice 1/{self.world}"
        self._set_dispatchers()
        self.generation = generation
        log.info("worker %d/%d joined group generation %d (%s) in %.1fs", self.rank, self.world, generation,
                 how, time.time() - t0)
        return generation

    @_one_at_a_time
    def step(self, items: list[StepItem]) -> list[int | None]:
        return self.runner.step(items)

    @_one_at_a_time
    def release(self, seq_ids: list[str]) -> None:
        self.runner.release(seq_ids)

    @_one_at_a_time
    def expert_load(self) -> dict[int, list[int]]:
        return self.runner.expert_load()

    @_one_at_a_time
    def expert_cost(self) -> float:
        """``ModelRunner.expert_cost``, measured once the group is warm; logged."""
        cost = self.runner.expert_cost()
        log.info("worker %d: one expert weight read costs as much as %.1f rows (EPLB load model)", self.rank, cost)
        return cost

    @_one_at_a_time
    def load_patch(self, patch_dir: str) -> int:
        from expertpool.model.patch import read_patch

        patch = read_patch(patch_dir, base_model_dir=self.model_dir)  # this actor's copy of the base
        idx = self.runner.use_patch(patch, patch_dir)
        self._patches.append((patch_dir, patch.kind))  # re-applied to the experts of a new placement
        return idx

    # ---- elastic expert parallelism: a new placement is loaded beside the old one, then swapped in
    @ray.method(concurrency_group=PREPARE)
    def prepare_experts(self, experts: ExpertIds) -> float:
        """Load the routed experts this rank holds under a new placement (every MoE layer, with the
        served variants re-added in their order) while steps go on; ``commit_placement`` swaps them
        in at a step boundary. Experts it already holds are read again from the local checkpoint
        (simple, and the reads stay on this node). Returns the seconds it took."""
        from expertpool.model.checkpoint import load_experts
        from expertpool.model.patch import add_layer_variant, read_patch

        t0 = time.time()
        fresh = load_experts(self.model_dir, self.model, experts, weight_dtype=self.spec.weight_dtype,
                             device=self.device, keep_bf16_experts=self.keep_bf16_experts)
        main_layers = self.model.args.num_hidden_layers
        mtp = []
        for patch_dir, kind in self._patches:
            patch = read_patch(patch_dir, base_model_dir=self.model_dir)  # a remote one: from the local cache
            if kind == "mtp":
                mtp.append(patch)  # the MTP module's experts: rewritten in place at the switch
                continue
            for name, mod in fresh.items():
                layer = int(name.split(".")[2])  # model.layers.N.mlp.experts / model.mtp.K...: MTP has none
                if name.startswith("model.layers.") and layer < main_layers:
                    add_layer_variant(mod, patch.experts.get(layer, {}))
        self._prepared = (experts, fresh, mtp)
        dt = time.time() - t0
        log.info("worker %d: prepared experts %s in %.1fs", self.rank, expert_span(experts), dt)
        return dt

    @_one_at_a_time
    def commit_placement(self, rank: int, world: int, replicas, regroup: bool = True) -> dict[str, Any]:
        """At a step boundary (nothing in flight): take rank ``rank`` of ``world``, swap in the prepared
        experts if any, and take the copies table: at the next ``join`` (``regroup``), or at once when
        the group stays as it is (same ranks: an EPLB rebalance). The KV cache stays: the sequences on
        this actor keep it."""
        if self._prepared is not None:
            self.experts, fresh, mtp = self._prepared
            for name, mod in fresh.items():
                parent, attr = name.rsplit(".", 1)
                setattr(self.model.get_submodule(parent), attr, mod)
            self._prepared = None
            if self.runner is not None:
                self.runner.graphs = None  # captured over the old expert tensors
                for patch in mtp:  # the MTP module's new experts
                    self.runner.use_patch(patch)
        self.rank, self.world, self.replicas = rank, world, replicas
        if not regroup:
            self._set_dispatchers()
        return {"rank": rank, "experts": self.experts}

    def _set_dispatchers(self) -> None:
        """Each MoE layer's dispatcher under the copies tables in use: one for the layers of the base
        layout, one per layer with a placement of its own; a single worker needs no collective."""
        from expertpool.model.dispatch import AllToAllDispatcher, LocalDispatcher

        if self.world == 1:
            self.model.set_dispatcher(LocalDispatcher())
            self.model.vocab_parallel = None
            return
        if self.exchange is None:
            self.model.vocab_parallel = None
        else:  # each rank reads 1/world of the output head (model.vocab_parallel): only where exchanges are
            # cheap; over gloo its three more exchanges cost what it saves (bench/ep_step.py). An EPLB
            # rebalance keeps the group, and so the slice already packed.
            from expertpool.model.vocab_parallel import VocabParallelHead
            vp = self.model.vocab_parallel
            if not (vp is not None and vp.head is self.model.lm_head and vp.exchange is self.exchange
                    and (vp.rank, vp.world) == (self.rank, self.world)):
                self.model.vocab_parallel = VocabParallelHead(self.model.lm_head, self.rank, self.world,
                                                              self.exchange, w8a8=self.model.w8a8)
        rest, per_layer = self.replicas if self.replicas is not None else (None, {})
        self.model.set_dispatcher(AllToAllDispatcher(self.n_experts, replicas=rest, exchange=self.exchange))
        for moe in self.model.moe_layers():
            if moe.layer_id in per_layer:
                moe.dispatcher = AllToAllDispatcher(self.n_experts, replicas=per_layer[moe.layer_id],
                                                    exchange=self.exchange)

    def open_step_channel(self) -> tuple[tuple[str, int], bytes]:
        """Start (once) the step channel's listener on this node's address; returns its address and the
        token a connection must send first (``step_channel``)."""
        from expertpool.platform.step_channel import ChannelServer

        if self._channel is None:
            # frames are read on the channel's thread; step and release run on the compute thread
            self._channel = ChannelServer(self.step, self.release, self._lock, ray.util.get_node_ip_address(),
                                          name=f"step-channel-{self.rank}")
            log.info("worker %d: step channel listening on %s:%d", self.rank, *self._channel.address)
        return self._channel.address, self._channel.token

    @ray.method(concurrency_group=CONTROL)
    def drop_steps(self, conn_id: bytes) -> None:
        """The steps still queued on the step channel connection ``conn_id`` are answered without running
        (a step of the group failed; they would run against a broken group)."""
        if self._channel is not None:
            self._channel.drop(conn_id)

    @ray.method(concurrency_group=CONTROL)
    def ping(self) -> int:
        return self.rank

    @ray.method(concurrency_group=CONTROL)
    def abort_group(self) -> bool:
        """Release a step stuck in a collective (NCCL: abort the communicator, so the blocked op returns
        with an error; the shared-memory exchange: raise in the waiting rank). Gloo needs nothing: its ops
        fail when a peer's socket closes, or time out."""
        import torch.distributed as dist

        if self.exchange is not None:
            self.exchange.abort()
            log.warning("worker %d aborted its shared-memory exchange", self.rank)
            return True
        if self.backend != "nccl" or not dist.is_initialized():
            return False
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is None:
            return False
        abort()
        log.warning("worker %d aborted its NCCL communicator", self.rank)
        return True


def expert_span(experts: ExpertIds) -> str:
    """Expert ids for logs: a contiguous range as ``a..b``, else ``a..b (+k more)``; per layer: the
    base layout's and the number of layers with their own."""
    if isinstance(experts, tuple):
        rest, per_layer = experts
        return expert_span(rest) + (f" ({len(per_layer)} layers placed on their own)" if per_layer else "")
    if not experts:
        return "none"
    e = sorted(experts)
    if e[-1] - e[0] + 1 == len(e):
        return f"{e[0]}..{e[-1]}"
    run = next((i for i in range(1, len(e)) if e[i] != e[i - 1] + 1), len(e))
    return f"{e[0]}..{e[run - 1]} (+{len(e) - run} more)"
