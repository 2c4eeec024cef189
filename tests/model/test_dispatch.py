"""The all-to-all dispatcher at inference, two gloo ranks on CPU: each rank's output equals the local
dispatcher's over all experts (rows and ids exchanged in one collective; the combine in fp32, in a
fixed order), and through the shared-memory exchange it is the gloo output, bit for bit, as it is
with its pack and combine as torch ops instead of the C calls."""

import socket

import torch
import torch.multiprocessing as mp

from expertpool.kernels import cpu_experts
from expertpool.model.dispatch import AllToAllDispatcher, owned_experts
from expertpool.platform.placement import Placement
from tests.model.helpers import random_model


def _rank(rank: int, world: int, port: int, dtype, results, redundant: int = 0) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        full = random_model("tiny").to(dtype)
        mine = random_model("tiny").to(dtype)
        E = full.args.n_routed_experts
        placement = Placement.default(E, world, redundant)
        ids = list(placement.slots[rank]) if redundant else owned_experts(rank, world, E)
        for moe in mine.moe_layers():  # this rank answers only for its experts (all are stored, for the test)
            moe.experts.global_to_local.fill_(-1)
            moe.experts.global_to_local[ids] = torch.tensor(ids)
        mine.set_dispatcher(AllToAllDispatcher(E, replicas=placement.replicas()) if redundant
                            else AllToAllDispatcher(E))
        x = torch.randint(0, full.args.vocab_size, (2, 9 + rank), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            results[rank] = (mine(x).float(), full(x).float())
            with cpu_experts.EP_OPS.off():  # the pack and combine as torch ops: the same bits
                results[f"ops{rank}"] = mine(x).float()
            # a step where this rank has no tokens at all (its sequences finished) while the other has some:
            # it must still take part in every exchange, with empty sends
            x_idle = x[:, :0] if rank == 1 else x
            results[f"idle{rank}"] = (mine(x_idle).float(), full(x_idle).float())
            if not redundant:  # the same exchanges through shared memory: the same bytes move
                from expertpool.model.shm_exchange import join_group, supported
                ex = join_group(slot_bytes=4096)  # small slots: a layer's rows go in several pieces
                assert (ex is not None) == supported()
                if ex is not None:
                    mine.set_dispatcher(AllToAllDispatcher(E, exchange=ex))
                    results[f"shm{rank}"] = (mine(x).float(), mine(x_idle).float())
                # the output head split by vocabulary (gloo, then shared memory): each rank gets its own
                # rows' logits over the whole vocabulary, also when it has no rows
                from expertpool.model.vocab_parallel import VocabParallelHead
                full.prepare_for_inference()  # packed for oneDNN, as served
                h = torch.randn(3 + 2 * rank, full.args.hidden_size, generator=torch.Generator().manual_seed(rank))
                h = h.to(dtype)
                for name, exchange in (("gloo", None), ("shm", ex)):
                    if name == "shm" and ex is None:
                        continue
                    vp = VocabParallelHead(full.lm_head, rank, world, exchange)
                    results[f"head-{name}{rank}"] = (vp(h).float(), full.lm_head(h).float(),
                                                     vp(h[:0] if rank == 0 else h).shape)
                if ex is not None:
                    ex.close()
    finally:
        dist.destroy_process_group()


def test_all_to_all_equals_local_dispatch_at_inference():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        ctx = mp.get_context("spawn")
        results = ctx.Manager().dict()
        procs = [ctx.Process(target=_rank, args=(r, 2, port + (dtype == torch.bfloat16), dtype, results))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        for r in (0, 1, "idle0", "idle1"):
            got, want = results[r]
            if not want.numel():
                assert got.shape == want.shape
                continue
            # fp32: an expert's rows are grouped with the other rank's (another GEMM blocking), ~1e-7;
            # bf16: the same products rounded to bf16 in other groupings, ~2**-8 per element
            assert ((got - want).norm() / want.norm()).item() < bound, (dtype, r)
        for r in (0, 1):
            assert torch.equal(results[f"ops{r}"], results[r][0]), (dtype, r)
            for name in ("gloo", "shm"):
                if f"head-{name}{r}" not in results:
                    continue
                got, want, idle_shape = results[f"head-{name}{r}"]
                assert got.shape == want.shape and idle_shape == ((0 if r == 0 else 5), want.shape[1])
                assert ((got - want).norm() / want.norm()).item() < 1e-6, (dtype, name, r)
                assert torch.equal(got.argmax(-1), want.argmax(-1)), (dtype, name, r)
            if f"shm{r}" in results:
                got, got_idle = results[f"shm{r}"]
                assert torch.equal(got, results[r][0]) and torch.equal(got_idle, results[f"idle{r}"][0]), (dtype, r)


def test_replicated_experts_spread_pairs_over_copies_and_equal_local_dispatch():
    """Pairs alternate between an expert's copies; with R = 0, W and E redundant slots at widths 2
    and 4 every rank's logits equal the single-process model's, and so do its greedy tokens."""
    from unittest import mock

    with mock.patch("torch.distributed.get_world_size", return_value=2), \
            mock.patch("torch.distributed.get_rank", return_value=0):
        d = AllToAllDispatcher(4, replicas=[[0, 1], [1], [0], [0, 1]])
    dest = d.destinations(torch.tensor([0, 0, 1, 2, 3, 3, 4, 5]))  # 4, 5: variant-offset ids of experts 0, 1
    assert dest.tolist() == [0, 1, 1, 0, 0, 1, 0, 1]  # pair p takes copy p mod copies
    E = random_model("tiny").args.n_routed_experts
    for world in (2, 4):  # R = 0, W and E at each width, in one process group per width
        results = _spawn(_rank_matrix, world, E)
        for redundant in (0, world, E):
            for r in range(world):
                got, want = results[(redundant, r)]
                assert ((got - want).norm() / want.norm()).item() < 1e-5, (world, redundant, r)
                assert torch.equal(got.argmax(-1), want.argmax(-1)), (world, redundant, r)  # greedy: same tokens
                assert torch.equal(results[("ops", redundant, r)], got), (world, redundant, r)


def _rank_matrix(rank: int, world: int, port: int, results, n_experts: int) -> None:
    """Replicated placements at one width: each rank's logits with R = 0, W and E redundant slots
    (every expert stored on every rank for the test; a rank answers only for its slots)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        full, mine = random_model("tiny"), random_model("tiny")
        x = torch.randint(0, full.args.vocab_size, (2, 7 + rank), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            want = full(x).float()
            for redundant in (0, world, n_experts):
                placement = Placement.default(n_experts, world, redundant)
                ids = list(placement.slots[rank])
                for moe in mine.moe_layers():
                    moe.experts.global_to_local.fill_(-1)
                    moe.experts.global_to_local[ids] = torch.tensor(ids)
                mine.set_dispatcher(AllToAllDispatcher(n_experts, replicas=placement.replicas()))
                results[(redundant, rank)] = (mine(x).float(), want)
                with cpu_experts.EP_OPS.off():  # the pack and combine as torch ops: the same bits
                    results[("ops", redundant, rank)] = mine(x).float()
    finally:
        dist.destroy_process_group()


def _spawn(target, world: int, *args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=target, args=(r, world, port, results, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    return dict(results)
