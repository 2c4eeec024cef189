"""EPLB benchmark: a skewed prompt set on bench-mini, expert-parallel load balancing off, then on.

Builds bench-mini (random weights) in a temp dir and skews its router the way a trained one is: a
random router spreads tokens evenly, so in each MoE layer ``--hot`` experts get ``--hot-bias`` added
to their selection bias (``e_score_correction_bias``, which only affects which experts are picked):
a different random set per layer, as in trained models (``--same-hot``: experts 8.. of the first
actor's range in every layer). Starts one replica's engine in process on a
private local Ray (``--actors`` expert actors, ``--redundant`` redundant expert slots, no Serve), and
runs the same skewed workload three times: ``--streams`` greedy streams of ``--tokens`` tokens whose
prompts repeat a few token ids, so the router sends most pairs to few experts. Between the runs the
engine rebalances from the load the first run measured (``AsyncEngine.rebalance``: the code the EPLB
loop runs every ``pool.eplb.rebalance_every_steps``): first to one layout for all layers (planned
for the load summed over layers), then to a placement per layer (planned for each layer's load;
what the EPLB loop does). Reported: decode tokens/s, mean step time,
balancedness (mean / max actor load) of each run's measured load under the placement in use, and
each rebalance: time to prepare the new placement while serving, and the stall (steps paused for
the switch) against the mean decode step.

Balancedness is reported twice: under the load model EPLB plans with (tokens plus each expert's
weight reads, ``pool.eplb.expert_cost``) and in plain tokens (DeepSeek's measure).

Issue 13's goal (>= 1.2x decode throughput) needs a workload whose imbalance costs that much:
``--same-hot --hot 24 --hot-bias 1.0`` leaves one actor with most of the routed-expert reads. At the
default skew (a random hot set per layer) the default placement is already near even (balancedness
~0.93), so no placement can gain much there.

    python bench/eplb.py [--actors 2] [--redundant 16] [--streams 16] [--tokens 64] [--expert-cost X] [--same-hot]
                         [--no-append]
"""

import argparse
import asyncio
import sys
import time

import common


def skew_router(model_dir: str, hot: dict[int, list[int]], bias: float) -> None:
    """Add ``bias`` to the selection bias of the ``hot[layer]`` experts of each MoE layer of the checkpoint."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(path)
    for layer, experts in hot.items():
        tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"][experts] += bias
    save_file(tensors, path, metadata={"format": "pt"})


def hot_experts(moe_layers: list[int], n_experts: int, hot: int, same: bool, seed: int = 0) -> dict[int, list[int]]:
    """The experts made hot in each MoE layer: ``hot`` random ones per layer, or 8.. in every layer."""
    import random

    rng = random.Random(seed)
    return {layer: list(range(8, 8 + hot)) if same else sorted(rng.sample(range(n_experts), hot))
            for layer in moe_layers}


def skewed_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of a handful of token ids each, repeated (their routing concentrates on few experts)."""
    import random

    rng = random.Random(seed)
    hot = [rng.randrange(100, vocab) for _ in range(3)]
    return [[hot[i % 3]] * 24 + [hot[(i + 1) % 3]] * 8 for i in range(n)]


async def run(engine, prompts: list[list[int]], tokens: int, tag: str) -> dict:
    from expertpool.model.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    before = await engine.core.executor.expert_load_async()
    steps0, busy0 = engine.steps, engine.step_seconds
    first: dict[str, float] = {}
    t0 = time.monotonic()

    async def one(i, p):
        out = []
        async for ev in engine.generate(f"{tag}-{i}", p, params):
            first.setdefault(i, time.monotonic())
            out.extend(ev.token_ids)
        return out

    outs = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    t1 = time.monotonic()
    decode_start = max(first.values())  # every stream past its prefill
    after = await engine.core.executor.expert_load_async()
    n = engine.elastic.n_experts
    load = {layer: [b - a for a, b in zip(before[layer][:n], after[layer][:n])] for layer in after}
    steps = engine.steps - steps0
    placement = engine.core.executor.placement
    return {"outs": outs, "tok_s": sum(map(len, outs)) / (t1 - t0),
            "decode_tok_s": len(prompts) * (tokens - 1) / max(1e-9, t1 - decode_start) if tokens > 1 else 0.0,
            "step_ms": 1000 * (engine.step_seconds - busy0) / max(1, steps), "load": load, "steps": steps,
            "balancedness": placement.balancedness(load, await engine.elastic_group.load_model(steps, load)),
            "token_balancedness": placement.balancedness(load)}



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, default=2, help="expert actors (default %(default)s)")
    ap.add_argument("--redundant", type=int, default=16, help="pool.redundant_experts (default %(default)s)")
    ap.add_argument("--streams", type=int, default=16, help="concurrent greedy streams (default %(default)s)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream (default %(default)s)")
    ap.add_argument("--hot", type=int, default=8, help="experts made hot per MoE layer (default %(default)s)")
    ap.add_argument("--same-hot", action="store_true", help="the same hot experts (8..) in every MoE layer, "
                    "instead of a random set per layer")
    ap.add_argument("--hot-bias", type=float, default=0.3, help="selection bias added to them (default "
                    "%(default)s; 0 = the random router as initialised)")
    ap.add_argument("--expert-cost", type=float, default=None, help="pool.eplb.expert_cost: rows one expert weight "
                    "read costs as much as (default: measured by actor 0; 0 = balance token counts, DeepSeek's EPLB)")
    ap.add_argument("--dtype", default="auto", help="compute dtype (default auto: bf16 where the CPU has it)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    a = ap.parse_args()

    import ray

    from expertpool.model.embedded import init_model
    from expertpool.platform.config import parse_config
    from expertpool.platform.engine import build_engine

    model_dir = common.scratch_dir("bench-mini-")
    print(f"building bench-mini in {model_dir} ...", flush=True)
    init_model("bench-mini", model_dir, seed=0)
    from expertpool.model.args import ModelArgs
    args = ModelArgs.from_dir(model_dir)
    hot = hot_experts(list(args.moe_layers), args.n_routed_experts, a.hot, a.same_hot)
    if a.hot_bias:
        skew_router(model_dir, hot, a.hot_bias)
    cfg = parse_config({
        "model": {"path": model_dir, "dtype": a.dtype},
        "pool": {"actors_per_replica": a.actors, "redundant_experts": a.redundant,
                 "actor_resources": {"cpu": 1}, "eplb": {"expert_cost": a.expert_cost}},
        "serving": {"max_seq_len": 256, "max_batch_size": max(16, a.streams), "max_num_batched_tokens": 256,
                    "kv_cache": {"block_size": 16, "num_blocks": 512}}})
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    engine = build_engine(cfg)
    prompts = skewed_prompts(a.streams, 32000)

    def describe(placement, load) -> str:
        """Per MoE layer: how many of its hot experts (by measured load) each rank holds a copy of."""
        parts = []
        for layer, counts in sorted(load.items()):
            top = sorted(range(len(counts)), key=lambda e: -counts[e])[:a.hot]
            parts.append(f"layer {layer}: {[sum(e in top for e in s) for s in placement.layer(layer).slots]}")
        return "; ".join(parts)

    async def rebalanced(load, steps, tag: str) -> tuple[dict, float, float | None]:
        t0 = time.monotonic()
        stall = await engine.rebalance(load, steps)
        prepare = time.monotonic() - t0
        placement = engine.core.executor.placement
        print(f"{tag}: hot experts per rank, {describe(placement, off_load)}", flush=True)
        r = await run(engine, prompts, a.tokens, tag)
        print(f"{tag}: {r['decode_tok_s']:.0f} decode tok/s, step {r['step_ms']:.1f} ms, balancedness "
              f"{r['balancedness']:.3f}; rebalance {prepare:.2f}s, stall {stall}", flush=True)
        return r, prepare, stall

    async def scenario():
        nonlocal off_load
        try:
            await run(engine, prompts, a.tokens, "warm")  # every batch shape compiled before the timed runs
            off = await run(engine, prompts, a.tokens, "off")
            off_load = off["load"]
            cost = (await engine.elastic_group.load_model(1)).expert_cost
            print(f"EPLB off: {off['decode_tok_s']:.0f} decode tok/s, step {off['step_ms']:.1f} ms, balancedness "
                  f"{off['balancedness']:.3f}; hot experts per rank, "
                  f"{describe(engine.core.executor.placement, off_load)}", flush=True)
            from expertpool.platform.placement import summed
            shared = await rebalanced(summed(off_load), off["steps"], "one layout for all layers")
            per_layer = await rebalanced(off_load, off["steps"], "a placement per layer")
            return off, shared, per_layer, cost
        finally:
            await engine.shutdown()

    off_load: dict = {}
    off, shared, per_layer, cost = asyncio.run(scenario())
    ray.shutdown()
    same = off["outs"] == shared[0]["outs"] == per_layer[0]["outs"]
    lines = ["| EPLB | decode tok/s | x off | tok/s (whole run) | mean step (ms) | balancedness, load model | "
             "balancedness, tokens | rebalance: plan to switch (s) | stall (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (r, prepare, stall) in (("off (default placement)", (off, None, None)),
                                      ("one layout for all layers (summed load)", shared),
                                      ("a placement per layer (EPLB's default)", per_layer)):
        switch = ("-" if prepare is None else "kept (gain < min_gain)" if stall is None else f"{1000 * stall:.0f}")
        lines.append(f"| {name} | {r['decode_tok_s']:.0f} | {r['decode_tok_s'] / off['decode_tok_s']:.2f} | "
                     f"{r['tok_s']:.0f} | {r['step_ms']:.1f} | {r['balancedness']:.3f} | "
                     f"{r['token_balancedness']:.3f} | {'-' if prepare is None else f'{prepare:.2f}'} | {switch} |")
    r, prepare, stall = per_layer
    summary = (f"A placement per layer: {r['decode_tok_s'] / off['decode_tok_s']:.2f}x decode throughput against "
               f"EPLB off (goal >= 1.2x)")
    if stall is not None:
        summary += (f"; its switch stalled {1000 * stall:.0f} ms = {stall * 1000 / off['step_ms']:.1f} mean decode "
                    "steps (goal: under one)")
    summary += f"; greedy outputs {'identical' if same else 'DIFFERENT'} in all three runs."
    summary += (f" Load model: an expert's weight read = {cost:.1f} rows ("
                f"{'pool.eplb.expert_cost' if a.expert_cost is not None else 'measured by actor 0'}).")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + summary)
    if not a.no_append:
        skew = ("experts 8..{} in every MoE layer".format(7 + a.hot) if a.same_hot
                else f"{a.hot} random experts per MoE layer")
        common.append_to_benchmarks(
            "EPLB on a skewed prompt set (bench/eplb.py)",
            f"{common.machine_line(' '.join(sys.argv))}. bench-mini (random weights, 64 experts, 6 per token; "
            f"{skew} given +{a.hot_bias} selection bias), "
            f"{a.actors} expert actors x 1 CPU, {a.redundant} redundant slots, {a.streams} greedy streams of "
            f"{a.tokens} tokens whose prompts repeat 2 of 3 token ids; engine in process (no HTTP).\n\n"
            f"{table}\n\n{summary}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
