"""Soak benchmark: many concurrent streams against one replica for minutes, watching for leaks.

Deploys the repository's cluster.yaml (the embedded tiny model, as `expertpool serve` does) on a
private local Ray, then runs ``--streams`` closed-loop clients (streaming completions, random
max_tokens 8-64, seeded sampling) for ``--seconds`` or ``--max-requests``, whichever comes first.
Every ``--sample-s`` it records the resident memory of the replica and of each expert actor and the
engine's live state (sequences, open streams, KV blocks). At the end it checks: zero errors, every
stream complete with its requested length, nothing left allocated, and the memory slope after
warm-up (KB per request).

    python bench/soak.py [--seconds 180] [--streams 64] [--no-append]
"""

import argparse
import asyncio
import random
import sys
import time

import common

PROMPTS = [f"Request {k}: summarize the following notes about expert parallelism and routing, part {k % 7}."
           for k in range(50)]


async def soak(base: str, app: str, a) -> dict:
    import httpx
    import psutil

    st0 = await common.stats(app)
    pids = {"replica": st0["replica_pid"], **{f"actor{x['rank']}": x["pid"] for x in st0["actors"]}}
    procs = {k: psutil.Process(p) for k, p in pids.items()}
    done = {"requests": 0, "tokens": 0, "errors": [], "short": 0}
    samples = []
    t_start = time.monotonic()
    deadline = t_start + a.seconds
    rng = random.Random(0)

    async def client(i, h):
        while time.monotonic() < deadline and done["requests"] < a.max_requests:
            n = rng.randint(8, 64)
            prompt = PROMPTS[rng.randrange(len(PROMPTS))] if a.prompt_pool else f"soak {i} {rng.random()}"
            r = await common.stream(h, base, {"model": "expertpool-tiny", "prompt": prompt,
                                              "max_tokens": n, "temperature": 0.7, "seed": rng.randint(0, 1 << 30),
                                              "ignore_eos": True})
            done["requests"] += 1
            if r["error"]:
                done["errors"].append(r["error"])
            elif r["finish"] != "length" or r["usage"] != n:
                done["short"] += 1
            else:
                done["tokens"] += n

    async def sampler():
        while time.monotonic() < deadline and done["requests"] < a.max_requests:
            st = await common.stats(app)
            samples.append({"t": time.monotonic() - t_start, "requests": done["requests"],
                            **{k: p.memory_info().rss / 2**20 for k, p in procs.items()},
                            "sequences": st["sequences"], "open": st["open_streams"],
                            "kv": st["kv_blocks_used"]})
            print(f"  t={samples[-1]['t']:5.0f}s requests={done['requests']:5d} "
                  + " ".join(f"{k}={samples[-1][k]:.0f}MB" for k in procs)
                  + f" seqs={st['sequences']} kv={st['kv_blocks_used']}", flush=True)
            await asyncio.sleep(a.sample_s)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=a.streams + 8)) as h:
        await asyncio.gather(sampler(), *[client(i, h) for i in range(a.streams)])
    elapsed = time.monotonic() - t_start
    for _ in range(100):  # let the last aborts/finishes settle
        st = await common.stats(app)
        if st["sequences"] == 0 and st["open_streams"] == 0:
            break
        await asyncio.sleep(0.1)
    final = {k: p.memory_info().rss / 2**20 for k, p in procs.items()}
    return {"done": done, "samples": samples, "elapsed": elapsed, "final": final, "stats": st, "procs": list(procs)}


def slope_kb_per_request(pts, key):
    if len(pts) < 2 or pts[-1]["requests"] == pts[0]["requests"]:
        return float("nan")
    return (pts[-1][key] - pts[0][key]) * 1024 / (pts[-1]["requests"] - pts[0]["requests"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180, help="how long the load runs (default %(default)s)")
    ap.add_argument("--streams", type=int, default=64, help="concurrent closed-loop clients (default %(default)s)")
    ap.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests")
    ap.add_argument("--sample-s", type=float, default=10, help="seconds between memory samples")
    ap.add_argument("--warmup-s", type=float, default=30, help="seconds excluded from the memory slope")
    ap.add_argument("--prompt-pool", action="store_true", help="draw prompts from 50 fixed texts instead of unique "
                    "random ones (unique text grows the tokenizer's word cache until its 10,000-entry cap)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    a = ap.parse_args()

    import ray

    from expertpool.cli import resolve_config
    data = resolve_config(None).model_dump(mode="json")
    data.pop("train", None)
    base, app = common.start(data)
    print(f"soaking {base} with {a.streams} streams for {a.seconds:.0f} s ...", flush=True)
    res = asyncio.run(soak(base, app, a))
    ray.shutdown()
    d, st = res["done"], res["stats"]
    # a leak grows at the same rate in both halves of the run; warm-up growth (allocator high-water
    # marks, Serve's buffers, the tokenizer's bounded word cache) slows down and stops
    pts = [s for s in res["samples"] if s["t"] >= a.warmup_s]
    first, second = pts[:len(pts) // 2 + 1], pts[len(pts) // 2:]
    lines = ["| process | RSS after warm-up (MB) | RSS at end (MB) | growth, 1st half (KB/request) | "
             "growth, 2nd half (KB/request) |", "|---|---|---|---|---|"]
    for k in res["procs"]:
        lines.append(f"| {k} | {pts[0][k]:.0f} | {res['final'][k]:.0f} | {slope_kb_per_request(first, k):.2f} | "
                     f"{slope_kb_per_request(second, k):.2f} |")
    summary = (f"{d['requests']} requests in {res['elapsed']:.0f} s, {len(d['errors'])} errors, {d['short']} "
               f"incomplete, {d['tokens'] / res['elapsed']:.0f} tok/s. Left over after the load: "
               f"{st['sequences']} sequences, {st['open_streams']} open streams, {st['kv_blocks_used']} KV blocks.")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + summary)
    if d["errors"]:
        print("first errors:", d["errors"][:3])
    if not a.no_append:
        common.append_to_benchmarks("Soak (bench/soak.py)", f"{common.machine_line(' '.join(sys.argv))}. "
                                    f"cluster.yaml (tiny model, 2 expert actors), {a.streams} concurrent streaming "
                                    f"clients.\n\n{table}\n\n{summary}")
    ok = not d["errors"] and not d["short"] and st["sequences"] == 0 and st["kv_blocks_used"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
