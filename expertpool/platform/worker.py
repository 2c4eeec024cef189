"""Model runner and the expert-parallel worker actor.

``ModelRunner`` (plain class, no Ray): owns a model and its paged MLA latent cache and runs one
engine step: a flat batch of sequences, each with new tokens at a known cache position, through
``Transformer.forward_batch``; samples the next token for sequences whose new tokens reach their end.
It keeps a per-sequence RNG so seeded requests are reproducible. Logits never leave the worker.

``ExpertWorker`` (Ray actor): one member of a replica's expert-parallel group. It joins the group's
torch.distributed process group (gloo on CPU, NCCL on GPU), loads the dense weights plus only its
share of routed experts, and swaps in the all-to-all dispatcher. Attention is data-parallel: each
worker holds the latent cache of the sequences the engine assigned to it. All workers of a group
must run every step (with an empty batch if need be) because MoE layers are collectives.
"""

import logging
import time
from dataclasses import dataclass

import torch

from expertpool.model.attention import AttnBatch, PagedLatentCache
from expertpool.model.checkpoint import load_checkpoint
from expertpool.model.sampling import SamplingParams, make_generator, sample
from expertpool.model.transformer import Transformer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class StepItem:
    seq_id: str
    tokens: list[int]          # new tokens, written to the cache at start_pos... (-1: the token this
                               # worker sampled for seq_id in its previous step; see engine.PLACEHOLDER)
    start_pos: int
    block_table: list[int]
    sample: bool               # sample one token after the last new token
    params: SamplingParams
    variant: int = 0           # served variant (0 = base weights; see Transformer.add_variant)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, device="cpu"):
        self.model = model
        args = model.args
        self.cache = PagedLatentCache(args.num_hidden_layers, num_blocks, block_size, args.kv_cache_dim,
                                      dtype=model.compute_dtype, device=device)
        self.device = device
        self._generators: dict[str, torch.Generator] = {}
        self._last: dict[str, int] = {}  # last sampled token per sequence (feeds PLACEHOLDER items)

    @torch.inference_mode()
    def step(self, items: list[StepItem]) -> list[int | None]:
        last = self._last
        tokens = [last[it.seq_id] if t < 0 else t for it in items for t in it.tokens]
        batch = AttnBatch.build(self.cache, [it.block_table for it in items], [it.start_pos for it in items],
                                [len(it.tokens) for it in items], device=self.device,
                                variants=[it.variant for it in items])
        rows, ends = [], 0
        for it in items:
            ends += len(it.tokens)
            if it.sample:
                rows.append(ends - 1)
        tokens_N = torch.tensor(tokens, dtype=torch.long, device=self.device)
        logits = self.model.forward_batch(tokens_N, batch, torch.tensor(rows, dtype=torch.long, device=self.device))
        sampled_items = [it for it in items if it.sample]
        gens = [self._generators.setdefault(it.seq_id, make_generator(it.params.seed)) for it in sampled_items]
        toks = sample(logits, [it.params for it in sampled_items], gens) if sampled_items else []
        out, j = [], 0
        for it in items:
            if it.sample:
                out.append(toks[j])
                last[it.seq_id] = toks[j]
                j += 1
            else:
                out.append(None)
        return out

    def release(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self._generators.pop(s, None)
            self._last.pop(s, None)

    def load_patch(self, patch_dir: str, base_model_dir: str | None = None) -> int:
        """Add an ESFT expert patch as a served variant; only the experts this model holds are kept.
        With base_model_dir, the patch must have been trained from that checkpoint."""
        from expertpool.model.patch import read_patch
        patch = read_patch(patch_dir, base_model_dir=base_model_dir)
        return self.model.add_variant(patch.experts)

    def expert_load(self) -> list[int]:
        loads = [m.expert_load for m in self.model.moe_layers()]
        return torch.stack(loads).sum(0).tolist() if loads else []


def load_model(model_dir: str, dtype: str, weight_dtype: str | None, experts=None, device="cpu") -> Transformer:
    return load_checkpoint(model_dir, dtype=DTYPES[dtype], weight_dtype=weight_dtype, experts=experts,
                           device=device, with_mtp=False)


class ExpertWorker:
    """Ray actor body (wrapped with ray.remote by the engine builder). Two-phase start: the actor is
    created, rank 0 reports a free rendezvous address, then every rank runs ``setup`` concurrently."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.runner: ModelRunner | None = None

    def rendezvous_address(self) -> tuple[str, int]:
        import socket

        import ray
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, model_dir: str, master_addr: str, master_port: int, dtype: str, weight_dtype: str | None,
              num_blocks: int, block_size: int, backend: str = "auto", threads: int = 1) -> list[int]:
        import torch.distributed as dist

        from expertpool.model.args import ModelArgs
        from expertpool.platform.dispatch import AllToAllDispatcher, owned_experts

        torch.set_num_threads(max(1, threads))
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        self.device = f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu"
        backend = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
        t0 = time.time()
        self.model_dir = model_dir
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world)
        n_experts = ModelArgs.from_dir(model_dir).n_routed_experts
        self.experts = owned_experts(self.rank, self.world, n_experts)
        model = load_model(model_dir, dtype, weight_dtype, self.experts, self.device)
        model.set_dispatcher(AllToAllDispatcher(n_experts))
        self.runner = ModelRunner(model, num_blocks, block_size, self.device)
        log.info("worker %d/%d ready on %s (%s) with experts %d..%d in %.1fs", self.rank, self.world,
                 self.device, backend, self.experts[0], self.experts[-1], time.time() - t0)
        return self.experts

    def step(self, items: list[StepItem]) -> list[int | None]:
        return self.runner.step(items)

    def release(self, seq_ids: list[str]) -> None:
        self.runner.release(seq_ids)

    def expert_load(self) -> list[int]:
        return self.runner.expert_load()

    def load_patch(self, patch_dir: str) -> int:
        return self.runner.load_patch(patch_dir, self.model_dir)

    def ping(self) -> int:
        return self.rank
