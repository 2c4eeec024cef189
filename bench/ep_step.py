"""Where the expert-parallel layout's decode step goes (issue 14): 2 workers x 1 CPU against 1 x 2 CPUs.

Three ways to run the same bench-mini decode step of 16 sequences, each for ``--steps`` steps after
the prefill, interleaved ``--rounds`` times, medians reported:

- ``single``: one process, all experts, 2 torch threads (the 1-actor layout);
- ``gloo``: two processes of 1 thread each, each with 8 sequences and half the experts, the MoE
  all-to-all over gloo (the 2-actor layout without Ray); the time inside the collectives is
  measured separately (``all_to_all_single`` wrapped with a timer);
- ``shm``: as ``gloo``, the exchanges through shared memory (``model.shm_exchange``, what the actors
  of one host use by default); both split the output head by vocabulary (``model.vocab_parallel``), and
  ``gloo-whole-head`` / ``shm-whole-head`` give every rank the whole head. The actors run ``shm``, or
  ``gloo-whole-head`` where the ranks do not share memory;
- ``ray``: the 2-actor layout through ``RayExecutor`` (the serving path minus HTTP, shared-memory
  exchanges), its steps over the step channels one at a time as the served engine drives them: what
  the serving path adds per step is ``ray`` minus ``shm``; ``ray-single``: the 1-actor layout the same
  way (against ``single``). The KV cache is sized for the run (no timed step waits for blocks).

    python bench/ep_step.py [--dtype bfloat16] [--weight-dtype int8] [--steps 30] [--rounds 3]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import expertpool  # noqa: E402,F401  (expertpool before torch, per house style)

PROMPT, BATCH = 32, 16


def _prompts(n, rank: int = 0):
    """Rank ``rank``'s ``n`` of the run's ``BATCH`` prompts: the ranks of a layout hold different
    sequences, as the actors do (with the same ones, every rank's tokens would route alike and the
    layer would touch fewer experts than a real batch)."""
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, 2000, (BATCH, PROMPT), generator=g).tolist()[rank * n:(rank + 1) * n]


def _core(runner, world, batch, steps):
    from expertpool.platform.scheduler import EngineCore

    class OneRank:  # drives one rank's runner as if it were the whole group (the other rank mirrors it)
        def __init__(self):
            self.world = 1

        def run(self, items):
            return [runner.step(items[0])]

        def release(self, finished):
            runner.release([s for _, s in finished])
    return EngineCore(OneRank(), num_blocks=runner.num_blocks, block_size=16, max_batch_size=batch,
                      max_seq_len=PROMPT + steps + 24, max_num_batched_tokens=batch * PROMPT, eos_token_id=None)


def _time_steps(core, steps, rank: int = 0):
    from expertpool.model.sampling import SamplingParams
    for i, p in enumerate(_prompts(core.max_batch_size, rank)):
        core.add_request(f"s{i}", p, SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
    while any(s.num_cached < len(s.tokens) - 1 for s in core.running) or core.waiting:
        core.step()
    core.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def child(a) -> dict:
    """One process of the ``single`` or ``gloo`` layout; prints its step time (and collective time)."""
    import torch
    import torch.distributed as dist

    from expertpool.model.checkpoint import DTYPES, load_checkpoint
    from expertpool.model.dispatch import AllToAllDispatcher, GroupExchange, owned_experts
    from expertpool.platform.worker import ModelRunner

    torch.set_num_threads(a.threads)
    experts = None
    if a.world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world)
        experts = owned_experts(a.rank, a.world, 64)
    model = load_checkpoint(a.model, dtype=DTYPES[a.dtype], weight_dtype=a.weight_dtype, experts=experts,
                            with_mtp=False)
    in_collectives = [0.0]
    if a.world > 1:
        if a.exchange == "shm":
            from expertpool.model.shm_exchange import join_group, slot_bytes_for
            exchange = join_group(slot_bytes=slot_bytes_for(a.world))
            assert exchange is not None, "no shared-memory exchange on this machine"
        else:
            exchange = GroupExchange()
        real = exchange.all_to_all_single

        def timed(*args, **kw):  # every exchange of an inference step goes through this one object
            t = time.perf_counter()
            try:
                return real(*args, **kw)
            finally:
                in_collectives[0] += time.perf_counter() - t
        exchange.all_to_all_single = timed
        model.set_dispatcher(AllToAllDispatcher(model.args.n_routed_experts, exchange=exchange))
        if not a.whole_head:  # as the serving actors do (model.vocab_parallel)
            from expertpool.model.vocab_parallel import VocabParallelHead
            model.vocab_parallel = VocabParallelHead(model.lm_head, a.rank, a.world, exchange)
    runner = ModelRunner(model, num_blocks=_blocks(a.steps, BATCH // a.world), block_size=16)
    batch = BATCH // a.world
    t_step = _time_steps(_core(runner, a.world, batch, a.steps), a.steps, a.rank)
    in_collectives[0] = 0.0
    core = _core(runner, a.world, batch, a.steps)
    t0 = time.perf_counter()
    _time_steps(core, a.steps, a.rank)
    total = time.perf_counter() - t0
    out = {"step_ms": t_step, "collective_share": in_collectives[0] / total if a.world > 1 else 0.0}
    if a.world > 1:
        dist.destroy_process_group()
    return out


def run_processes(a, world, exchange="gloo", whole_head=False):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, __file__, "--child", "--model", a.model, "--dtype", a.dtype, "--steps", str(a.steps),
            "--world", str(world), "--port", str(port), "--threads", str(2 // world), "--exchange", exchange]
    if whole_head:
        base.append("--whole-head")
    if a.weight_dtype:
        base += ["--weight-dtype", a.weight_dtype]
    procs = [subprocess.Popen(base + ["--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(e[-3000:])
        outs.append(json.loads(o.strip().splitlines()[-1]))
    return {"step_ms": max(o["step_ms"] for o in outs),
            "collective_share": statistics.mean(o["collective_share"] for o in outs)}


def _blocks(steps: int, seqs: int) -> int:
    """KV blocks for ``seqs`` sequences of the prompt plus ``steps`` + 8 tokens (16-token blocks), one
    block of slack each: no timed step waits for cache."""
    return seqs * (-(-(PROMPT + steps + 8) // 16) + 1)


async def _time_steps_served(core, steps):
    """``_time_steps`` as the served engine drives a step (``platform.engine``): plan, submit over the
    step channels (``executor.run_async``), finish, one step at a time (depth 1)."""
    from expertpool.model.sampling import SamplingParams
    for i, p in enumerate(_prompts(core.max_batch_size)):
        core.add_request(f"s{i}", p, SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))

    async def one():
        events = {}
        plans, items = core.begin_step(events)
        core.end_step(plans, await core.executor.run_async(items), events)
    while any(s.num_cached < len(s.tokens) - 1 for s in core.running) or core.waiting:
        await one()
    await one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        await one()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def run_ray(a, actors: int = 2):
    """The layout through ``RayExecutor`` (no Serve, no HTTP): ``actors`` of 2 // actors CPUs, the steps
    over the step channels as served."""
    import asyncio

    import ray

    from expertpool.platform.executor import RayExecutor
    from expertpool.platform.scheduler import EngineCore
    from expertpool.platform.worker import WorkerSpec

    cpus, max_len = 2 // actors, PROMPT + a.steps + 24
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    try:
        spec = WorkerSpec(a.model, a.dtype, a.weight_dtype, _blocks(a.steps, BATCH // actors), 16, "gloo", cpus, 60.0,
                          max_seq_len=max_len, max_num_batched_tokens=BATCH * PROMPT, max_batch_size=BATCH)
        ex = RayExecutor(spec, [{"num_cpus": cpus}] * actors)
        ex.start()
        core = EngineCore(ex, num_blocks=spec.num_blocks, block_size=16, max_batch_size=BATCH, max_seq_len=max_len,
                          max_num_batched_tokens=BATCH * PROMPT, eos_token_id=None)
        ms = asyncio.run(_time_steps_served(core, a.steps))
        channels = ex._channels is not None
        ex.shutdown()
        return {"step_ms": ms, "steps_over": "step channels" if channels else "Ray actor tasks"}
    finally:
        ray.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: bench-mini random weights in a temp dir)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--weight-dtype", default=None, help="routed experts' storage (e.g. int8); default: as stored")
    ap.add_argument("--steps", type=int, default=30, help="decode steps timed per layout and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all layouts, interleaved (medians reported)")
    ap.add_argument("--layouts", default="single,gloo,shm,ray",
                    help="comma-separated: single (1 process, 2 threads), gloo / shm (2 processes of 1 thread, the "
                         "MoE exchanges over gloo / through shared memory; with the suffix -whole-head each rank "
                         "computes its rows' logits over the whole lm_head instead of the vocabulary-parallel "
                         "head the actors use), ray (2 actors via RayExecutor, steps over the step channels as "
                         "served), ray-single (1 actor of 2 CPUs, the same way)")
    ap.add_argument("--whole-head", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--exchange", default="gloo", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    import common
    print(f"CPU: {common.cpu_flags_line()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    if a.model is None:
        from expertpool.model.embedded import init_model
        a.model = common.scratch_dir()
        init_model("bench-mini", a.model, seed=0)
    layouts = a.layouts.split(",")
    res: dict[str, list[dict]] = {k: [] for k in layouts}
    for r in range(a.rounds):
        for k in layouts:
            exchange, _, whole = k.partition("-")
            out = (run_processes(a, 1) if k == "single" else run_ray(a) if k == "ray"
                   else run_ray(a, actors=1) if k == "ray-single"
                   else run_processes(a, 2, exchange, whole_head=whole == "whole-head"))
            res[k].append(out)
            print(f"round {r + 1} {k}: {out}", flush=True)
    print(f"\nbench-mini decode step, 16 sequences, {a.dtype}, weights {a.weight_dtype or 'as stored'}; "
          f"median (min..max) of {a.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    single = statistics.median(o["step_ms"] for o in res.get("single", [{"step_ms": float("nan")}]))
    for k, outs in res.items():
        ms = [o["step_ms"] for o in outs]
        share = statistics.median(o.get("collective_share", 0.0) for o in outs)
        med = statistics.median(ms)
        print(f"  {k:16s} {med:6.1f} ms ({min(ms):.1f}..{max(ms):.1f}), {BATCH / med * 1e3:5.0f} tok/s, "
              f"{single / med:.2f}x single" + (f", {share:.0%} in all_to_all" if share else ""))


if __name__ == "__main__":
    main()
