"""Fault benchmark: kill one expert actor at a random point under load, several times.

Deploys the repository's cluster.yaml (the embedded tiny model, 2 expert actors per replica, as
`expertpool serve` does) on a private local Ray. Each run sends ``--streams`` concurrent streaming
completions (seeded sampling, ``--tokens`` each) and, at a random moment while they decode, sends
SIGKILL to a random expert actor. It reports per run: lost requests (any error or short stream),
outputs equal to the same requests without the fault, the longest client-visible stall (largest
gap between two tokens of one stream), and the recovery time as a client sees it: kill to the first
token after the pause (the end of the longest gap, earliest over the streams). Throughput (16
closed-loop streams) is measured before the first kill and after the last.

With ``--redundant 256`` (every expert of the tiny model twice) it measures degraded mode instead:
the survivor serves on at once and the group widens back once the replacement has loaded.

    python bench/faults.py [--runs 5] [--streams 16] [--redundant 256] [--no-append]
"""

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import time

import common


def body(i: int, tokens: int) -> dict:
    return {"model": "expertpool-tiny", "prompt": f"fault run stream {i}: tell me about expert parallelism",
            "max_tokens": tokens, "temperature": 0.8, "seed": 100 + i, "ignore_eos": True}


async def throughput(base: str, streams: int, seconds: float) -> float:
    import httpx
    tokens, deadline = 0, time.monotonic() + seconds

    async def loop(i, h):
        nonlocal tokens
        while time.monotonic() < deadline:
            r = await common.stream(h, base, body(i, 32))
            tokens += r["usage"] or 0
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=300) as h:
        await asyncio.gather(*[loop(i, h) for i in range(streams)])
    return tokens / (time.monotonic() - t0)


async def run_once(base: str, app: str, a, rng: random.Random, reference=None) -> dict:
    import httpx
    st0 = await common.stats(app)
    kill = {"t": None, "rank": None}

    async def killer():
        await asyncio.sleep(rng.uniform(1.0, 3.0))  # somewhere in the decode phase
        rank = rng.randrange(len(st0["actors"]))
        kill["rank"] = rank
        kill["t"] = time.monotonic()
        os.kill(st0["actors"][rank]["pid"], signal.SIGKILL)

    async with httpx.AsyncClient(timeout=600) as h:
        tasks = [asyncio.ensure_future(common.stream(h, base, body(i, a.tokens))) for i in range(a.streams)]
        if reference is not None:
            await killer()
        res = await asyncio.gather(*tasks)
    out = {"results": res}
    if reference is None:
        return out
    for _ in range(600):  # the engine's own record of the recovery
        st = await common.stats(app)
        if st["recoveries"] > st0["recoveries"] and not st["recovering"] and st.get("width", 2) == len(st0["actors"]):
            # (degraded mode: also wait until the group has widened back)
            break
        await asyncio.sleep(0.1)
    # tokens computed before the death was noticed can still arrive just after the kill; the group's
    # pause shows as each stream's longest gap, and the end of that gap is when it resumed
    resumed, stalls = [], []
    for r in res:
        gaps = [(b - a_, b) for a_, b in zip(r["times"], r["times"][1:]) if b > kill["t"]]
        if gaps:
            gap, end = max(gaps)
            stalls.append(gap)
            resumed.append(end)
    lost = [r for r in res if r["error"] or r["usage"] != a.tokens]
    out.update(rank=kill["rank"], lost=len(lost), equal=all(r["text"] == ref["text"] for r, ref in
                                                              zip(res, reference["results"])),
               stall=max(stalls), recovery=min(resumed) - kill["t"] if resumed else float("inf"),
               engine_s=st["recovery_seconds"][-1] if st["recovery_seconds"] else float("nan"),
               errors=[r["error"] for r in lost][:3])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="kills, one per run (default %(default)s)")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams per run (default %(default)s)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per stream (default %(default)s)")
    ap.add_argument("--tput-s", type=float, default=20, help="seconds of each throughput measurement")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times and victims")
    ap.add_argument("--redundant", type=int, default=0, help="pool.redundant_experts: 256 gives every expert of the "
                    "tiny model a second copy, so a kill is served on by the survivor (degraded mode)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    ap.add_argument("--batch-invariant", action="store_true", help="serving.batch_invariant: every row's result "
                    "the same in any batch, so replays continue bit for bit in bf16 too")
    a = ap.parse_args()

    import ray

    from expertpool.cli import resolve_config
    data = resolve_config(None).model_dump(mode="json")
    data.pop("train", None)
    data["pool"]["redundant_experts"] = a.redundant
    data["serving"]["batch_invariant"] = a.batch_invariant
    base, app = common.start(data)
    rng = random.Random(a.seed)
    print("throughput before ...", flush=True)
    before = asyncio.run(throughput(base, 16, a.tput_s))
    print(f"  {before:.0f} tok/s\nreference run (no fault) ...", flush=True)
    reference = asyncio.run(run_once(base, app, a, rng))
    runs = []
    for k in range(a.runs):
        r = asyncio.run(run_once(base, app, a, rng, reference))
        runs.append(r)
        print(f"  run {k + 1}: killed rank {r['rank']}, lost {r['lost']}, equal {r['equal']}, stall {r['stall']:.2f}s, "
              f"recovery {r['recovery']:.2f}s (engine {r['engine_s']:.2f}s) {r['errors'] or ''}", flush=True)
    print("throughput after ...", flush=True)
    after = asyncio.run(throughput(base, 16, a.tput_s))
    ray.shutdown()
    lines = ["| run | killed rank | lost requests | outputs equal to no-fault run | longest stall (s) | "
             "kill to resumed tokens (s) | engine recovery (s) |", "|---|---|---|---|---|---|---|"]
    for k, r in enumerate(runs):
        lines.append(f"| {k + 1} | {r['rank']} | {r['lost']} / {a.streams} | {'yes' if r['equal'] else 'NO'} | "
                     f"{r['stall']:.2f} | {r['recovery']:.2f} | {r['engine_s']:.2f} |")
    rec = [r["recovery"] for r in runs]
    summary = (f"{sum(r['lost'] for r in runs)} lost requests out of {a.runs * a.streams}; kill to resumed tokens: "
               f"median {statistics.median(rec):.2f} s, max {max(rec):.2f} s (goal < 10 s). Throughput at 16 streams "
               f"({a.tput_s:.0f} s, 32-token requests): {before:.0f} tok/s before the first kill, {after:.0f} tok/s "
               f"after the last.")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + summary)
    if not a.no_append:
        title = "Actor faults, degraded mode" if a.redundant else "Actor faults"
        common.append_to_benchmarks(f"{title} (bench/faults.py)", f"{common.machine_line(' '.join(sys.argv))}. "
                                    f"cluster.yaml (tiny model, 2 expert actors x 0.5 CPU, redundant_experts "
                                    f"{a.redundant}, serving.batch_invariant {a.batch_invariant}), {a.streams} "
                                    f"streams of "
                                    f"{a.tokens} seeded-sampling tokens per run, SIGKILL of a random actor 1-3 s "
                                    f"in.\n\n{table}\n\n{summary}")
    sys.exit(0 if all(r["lost"] == 0 and r["equal"] for r in runs) else 1)


if __name__ == "__main__":
    main()
