"""Serving benchmark: bench-mini behind the expert-parallel Serve app, over HTTP, each engine in its fastest dtype.

Drives 1, 4, 16 and 32 concurrent streaming clients (completions, 32-token prompts, 64 new tokens,
EOS ignored) and reports output tokens/s, TTFT p50/p99 and inter-token latency p50/p99. In the same
run it measures transformers' generate() on the same model and prompts (batch = 16, the compared
concurrency) in each dtype and quotes the ratio against its fastest. ``--dtype fastest`` (default)
picks expertpool's compute dtype by timing a few in-process decode steps of each (bench/decode_step.py)
with the actor's threads, instead of assuming; the CPU model and flags are printed and recorded.

On a shared machine one reading of each engine minutes apart says little (transformers' own rate
moved 186-317 tok/s within an hour on one VM), so after the sweep the transformers child keeps its
model loaded and the two engines are measured back to back ``--pairs`` times, each alone on the
machine (our 16 streams, then transformers' generate() with our cluster shut down; redeployed for the
next pair); the record gives each pair and the median ratio. The load generator runs on the same
CPUs as the server, so it uses aiohttp (about a third of httpx's CPU per streamed token; ``--client
httpx`` for the old one).

    python bench/serve.py [--actors 2] [--actor-cpus 1] [--dtype fastest|auto|float32|bfloat16]
                          [--weight-dtype bf16|int8|...] [--rounds 3] [--pairs 3] [--no-append]

Two more rows, each its own run (``--speculative`` / ``--prefix``; they skip the sweep above):

- ``--speculative``: bench-mini with one MTP module, calibrated first by the ``mode: mtp`` job in this
  process (``--mtp-steps`` steps of self-distillation on other random-token prompts; its patch is
  declared in ``serving.patches`` and applied in place), then served without and with MTP speculative
  decoding (k = 1) in the same run: draft acceptance from the replica's counters and tok/s at 1 and
  16 streams. Goals: acceptance >= 0.7 and >= 1.5x the non-speculative tok/s at 1 stream.
- ``--prefix``: multi-turn chats sharing one 1,000-token system prompt (each turn's prompt is the
  system prompt, the earlier turns and a new 32-token user message; earlier assistant turns are fixed
  random tokens, not the model's outputs), 32 new tokens per turn, with serving.prefix_caching off and
  on: TTFT p50/p99 and tok/s. Goal: TTFT p50 at least 3x lower with caching.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

PROMPT, NEW = 32, 64
LEVELS = (1, 4, 16, 32)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def drive(base: str, model: str, n: int, prompts, rounds: int = 1, client_lib: str = "aiohttp") -> dict:
    """n concurrent clients, each sending ``rounds`` requests back to back (closed loop), through aiohttp
    (default: less of the shared CPUs per token) or httpx (what runs before 2026-12-02 session 13 used)."""
    ttft, itl, tokens = [], [], 0

    async def client_loop(client, i):
        for r in range(rounds):
            await one(client, i + r * n)

    async def one(client, i):
        nonlocal tokens
        body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": NEW, "temperature": 0,
                "ignore_eos": True}
        out = await (common.stream_aiohttp if client_lib == "aiohttp" else common.stream)(client, base, body)
        assert out["error"] is None, out["error"]
        tokens += out["usage"]  # counted by the server, not by chunks
        times = out["times"]
        if times:
            ttft.append(times[0] - out["t0"])
            itl.extend(b - a for a, b in zip(times, times[1:]))

    if client_lib == "aiohttp":
        import aiohttp
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                        connector=aiohttp.TCPConnector(limit=64))
    else:
        import httpx
        session = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64))
    async with session as client:
        await one(client, 0)  # warm-up
        ttft.clear(), itl.clear()
        tokens = 0
        t = time.perf_counter()
        await asyncio.gather(*[client_loop(client, i) for i in range(n)])
        dt = time.perf_counter() - t
    return {"streams": n, "tok_s": tokens / dt, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50) if itl else 0.0, "itl_p99": pct(itl, 99) if itl else 0.0}


SPEC_LEVELS = (1, 16)
SYSTEM, USER, TURNS, CHATS, CHAT_NEW = 1000, 32, 4, 4, 32


def calibrate_mtp(model_dir: str, steps: int, threads: int) -> dict:
    """The ``mode: mtp`` job in this process on 256 random-token texts (other draws than the measured
    prompts): prompts of PROMPT tokens, continued by the base to PROMPT + NEW. Returns its summary."""
    import torch

    from expertpool.jobs import finetune
    from expertpool.model.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(model_dir)
    g = torch.Generator().manual_seed(1)
    data = os.path.join(model_dir, "mtp_texts.jsonl")
    with open(data, "w") as f:
        for row in torch.randint(5, 2000, (256, PROMPT + NEW), generator=g).tolist():
            f.write(json.dumps({"text": tok.decode(row)}) + "\n")
    cfg = os.path.join(model_dir, "mtp_job.yaml")
    with open(cfg, "w") as f:
        f.write(f"train:\n  jobs:\n    draft:\n      base_model: {model_dir}\n"
                f"      dataset: {{path: {data}, eval_fraction: 0.05}}\n"
                f"      output_dir: {os.path.join(model_dir, 'mtp_out')}\n      mode: mtp\n"
                f"      mtp: {{prompt_tokens: {PROMPT}}}\n      workers: 1\n      batch_size: 8\n"
                f"      seq_len: {PROMPT + NEW}\n      lr: 3.0e-3\n      steps: {steps}\n"
                f"      worker_resources: {{cpu: {threads}}}\n")
    return finetune.run_local(finetune.prepare(cfg, "draft"))


def serve_levels(data: dict, levels, prompts, rounds: int, num_cpus: int) -> tuple[list[dict], dict]:
    """Deploy ``data`` on a private Ray, drive each level, return (rows, the replica's stats)."""
    base, app = common.start(data, num_cpus=num_cpus)
    rows = []
    for n in levels:
        rows.append(asyncio.run(drive(base, data["model"]["name"], n, prompts, rounds)))
        r = rows[-1]
        print(f"  {n} streams: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.3f}s", flush=True)
    stats = asyncio.run(_stats(app))
    common.stop()
    return rows, stats


async def _stats(app: str) -> dict:
    return await common.stats(app)


async def drive_chats(base: str, model: str, system: list[int], chats: int, turns: int) -> dict:
    """``chats`` concurrent multi-turn chats; each turn's prompt = system + history + a new user turn."""
    import httpx
    import random
    ttft, tokens = [], 0

    async def chat(client, c):
        nonlocal tokens
        rng = random.Random(c)
        history: list[int] = []
        for _ in range(turns):
            history += [rng.randint(5, 2000) for _ in range(USER)]
            body = {"model": model, "prompt": system + history, "max_tokens": CHAT_NEW, "temperature": 0,
                    "ignore_eos": True}
            out = await common.stream(client, base, body)
            assert out["error"] is None and out["times"], out["error"]
            tokens += out["usage"]
            ttft.append(out["times"][0] - out["t0"])
            history += [rng.randint(5, 2000) for _ in range(CHAT_NEW)]  # the assistant turn, as fixed tokens

    async with httpx.AsyncClient(timeout=1200) as client:
        t = time.perf_counter()
        await asyncio.gather(*[chat(client, c) for c in range(chats)])
        dt = time.perf_counter() - t
    return {"tok_s": tokens / dt, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "requests": len(ttft)}


def bench_data(model_dir: str, a, max_seq_len: int) -> dict:
    from expertpool.cli import resolve_config
    cfg = resolve_config(a.config, model=model_dir, actors=a.actors)
    data = cfg.model_dump(mode="json")
    data["model"]["dtype"] = a.dtype if a.dtype != "fastest" else "auto"
    data["model"]["weight_dtype"] = a.weight_dtype
    data["pool"]["actor_resources"]["cpu"] = a.actor_cpus
    data["serving"]["autoscaling"].update(min_replicas=a.replicas, max_replicas=a.replicas,
                                          initial_replicas=a.replicas)
    data["serving"].update(max_batch_size=32, max_num_batched_tokens=512, max_seq_len=max_seq_len,
                           async_scheduling=False)
    return data


def run_speculative(a, flags: str) -> None:
    import torch

    from expertpool.model.embedded import init_model
    model_dir = os.path.join(common.scratch_dir(), "bench-mini-mtp")
    print(f"creating bench-mini with one MTP module (random weights) in {model_dir} ...", flush=True)
    init_model("bench-mini", model_dir, seed=0, mtp_layers=1)
    print(f"calibrating its MTP module: mode mtp, {a.mtp_steps} steps ...", flush=True)
    t0 = time.perf_counter()
    job = calibrate_mtp(model_dir, a.mtp_steps, os.cpu_count() or 1)
    job_s = time.perf_counter() - t0
    print(f"  agreement on held-out rows {job['mtp_agreement_initial']:.3f} -> {job['mtp_agreement_final']:.3f} "
          f"in {job_s:.0f}s", flush=True)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 2000, (32, PROMPT), generator=g).tolist()
    ncpu = a.actors * a.actor_cpus + 2
    results = {}
    for name, spec, patch in (("plain", None, None), ("random MTP", 1, None), ("calibrated MTP", 1, job["output"])):
        data = bench_data(model_dir, a, PROMPT + NEW + 8)
        if spec:
            data["serving"]["speculative"] = {"method": "mtp", "num_speculative_tokens": spec}
        if patch:
            data["serving"]["patches"] = {"draft": patch}
        print(f"{name} ...", flush=True)
        rows, stats = serve_levels(data, SPEC_LEVELS, prompts, a.rounds, ncpu)
        drafted = stats.get("spec_decode_num_draft_tokens", 0)
        results[name] = (rows, stats.get("spec_decode_num_accepted_tokens", 0) / drafted if drafted else None)
    plain1 = results["plain"][0][0]["tok_s"]
    lines = ["| decoding | acceptance | tok/s 1 stream | x plain | tok/s 16 streams | x plain |",
             "|---|---|---|---|---|---|"]
    for name, (rows, acc) in results.items():
        r1, r16 = rows
        lines.append(f"| {name} | {'-' if acc is None else f'{acc:.3f}'} | {r1['tok_s']:.1f} | "
                     f"{r1['tok_s'] / plain1:.2f} | {r16['tok_s']:.1f} | "
                     f"{r16['tok_s'] / results['plain'][0][1]['tok_s']:.2f} |")
    cal = results["calibrated MTP"]
    ok_acc, ok_speed = (cal[1] or 0) >= 0.7, cal[0][0]["tok_s"] >= 1.5 * plain1
    summary = (f"Calibration: `mode: mtp`, {a.mtp_steps} steps, {job_s:.0f} s, agreement on held-out rows "
               f"{job['mtp_agreement_initial']:.3f} -> {job['mtp_agreement_final']:.3f}. Goals: acceptance >= 0.7 "
               f"({'met' if ok_acc else 'missed'}), >= 1.5x plain tok/s at 1 stream "
               f"({'met' if ok_speed else 'missed'}).")
    _report(a, flags, "Serving: MTP speculative decoding (bench/serve.py --speculative)",
            f"bench-mini + 1 MTP module, {a.actors} expert actors ({a.actor_cpus} CPU each), {PROMPT}-token "
            f"prompts, {NEW} new tokens, greedy, each client {a.rounds} requests back to back", lines, summary)


def run_prefix(a, flags: str) -> None:
    import random

    from expertpool.model.embedded import init_model
    model_dir = os.path.join(common.scratch_dir(), "bench-mini")
    init_model("bench-mini", model_dir, seed=0)
    rng = random.Random(0)
    system = [rng.randint(5, 2000) for _ in range(SYSTEM)]
    max_len = SYSTEM + TURNS * (USER + CHAT_NEW) + 8
    ncpu = a.actors * a.actor_cpus + 2
    res = {}
    for caching in (False, True):
        data = bench_data(model_dir, a, max_len)
        data["serving"]["prefix_caching"] = caching
        print(f"prefix caching {'on' if caching else 'off'} ...", flush=True)
        base, app = common.start(data, num_cpus=ncpu)
        res[caching] = asyncio.run(drive_chats(base, data["model"]["name"], system, CHATS, TURNS))
        stats = asyncio.run(_stats(app))
        res[caching]["hits"] = stats.get("prefix_cache_hits")
        common.stop()
        r = res[caching]
        print(f"  TTFT p50 {r['ttft_p50']:.3f}s p99 {r['ttft_p99']:.3f}s, {r['tok_s']:.1f} tok/s", flush=True)
    lines = ["| prefix caching | TTFT p50 (s) | TTFT p99 (s) | output tok/s |", "|---|---|---|---|"]
    for caching, r in res.items():
        lines.append(f"| {'on' if caching else 'off'} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['tok_s']:.1f} |")
    ratio = res[False]["ttft_p50"] / res[True]["ttft_p50"]
    summary = f"TTFT p50 {ratio:.2f}x lower with caching (goal >= 3x: {'met' if ratio >= 3 else 'missed'})."
    _report(a, flags, "Serving: shared-prefix chats (bench/serve.py --prefix)",
            f"bench-mini, {a.actors} expert actors ({a.actor_cpus} CPU each), {CHATS} concurrent chats x {TURNS} "
            f"turns, {SYSTEM}-token shared system prompt, {USER}-token user turns, {CHAT_NEW} new tokens per turn",
            lines, summary)


def _report(a, flags: str, title: str, setup: str, lines: list[str], summary: str) -> None:
    """Print the table and summary; append them to docs/benchmarks.md under ``title`` unless --no-append."""
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + summary)
    if not a.no_append:
        common.append_to_benchmarks(title, f"{common.machine_line('bench/serve.py ' + ' '.join(sys.argv[1:]))}, "
                                    f"CPU: {flags} (shared; load average {os.getloadavg()[0]:.2f} at the end), "
                                    f"{a.dtype} compute. {setup}.\n\n{table}\n\n{summary}")


def hf_child(model_dir: str, dtype: str, batch: int, reps: int = 2) -> None:
    import torch
    from transformers import DeepseekV3ForCausalLM

    from expertpool.model.checkpoint import DTYPES
    tdt = DTYPES[dtype]
    model = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=tdt).eval()
    prompts = torch.tensor(json.load(open(os.path.join(model_dir, "bench_prompts.json")))[:batch])

    def gen():
        with torch.no_grad():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW,
                                 min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        return (out.shape[1] - PROMPT) * batch
    def best_of() -> float:  # best of reps: the baseline gets the benefit of the doubt
        best = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            n = gen()
            best = max(best, n / (time.perf_counter() - t))
        return best
    gen()
    print(json.dumps({"tok_s": best_of()}), flush=True)
    for _ in sys.stdin:  # the parent asks again (interleaved with its serving runs) until it closes stdin
        print(json.dumps({"tok_s": best_of()}), flush=True)


class HFChild:
    """transformers' generate() in a child process that keeps its model loaded: measured once when it
    starts, then again on each ``measure()``, so the baseline can be timed between our serving runs
    under the same conditions (this VM's speed drifts by tens of percent within minutes)."""

    def __init__(self, model_dir: str, dtype: str, batch: int):
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen([sys.executable, __file__, "--hf-child", model_dir, dtype, str(batch)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.first = self._read()

    def _read(self) -> float:
        for line in self.p.stdout:
            if line.startswith("{"):
                return json.loads(line)["tok_s"]
        self.p.wait()
        self.err.seek(0)
        raise SystemExit(f"transformers child exited {self.p.returncode}:\n{self.err.read()[-3000:].decode()}")

    def measure(self) -> float:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)
        self.err.close()


def interleave(hf: HFChild, up, down, model: str, prompts, rounds: int, n: int, client_lib: str,
               first: float) -> list[tuple[float, float]]:
    """``n`` pairs of (our tok/s at 16 streams, transformers' tok/s), the two measured back to back, each
    engine alone on the machine: transformers right after our cluster is shut down, our cluster
    (``up()``, warmed by one round of 16 streams) right after transformers. Pair 1 takes the sweep's
    16-stream row (``first``). A ratio from adjacent minutes, not from one reading of each engine
    several minutes apart."""
    pairs = []
    for i in range(n):
        if i:
            base = up()
            asyncio.run(drive(base, model, 16, prompts, 1, client_lib))  # warm-up: the batch shapes of 16
            ours = asyncio.run(drive(base, model, 16, prompts, rounds, client_lib))["tok_s"]
            down()
        else:
            ours = first
        theirs = hf.measure()
        pairs.append((ours, theirs))
        print(f"pair {i + 1}/{n}: ours {ours:.1f} tok/s, transformers {theirs:.1f} tok/s -> {ours / theirs:.2f}x",
              flush=True)
    return pairs


def fastest_dtype(model_dir: str, weight_dtype: str | None, threads: int) -> str:
    """float32 or bfloat16, whichever runs bench-mini's decode step faster here (median of 12 steps at
    batch 16, each dtype twice, interleaved), with the actor's thread count."""
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(2):
        for dt in times:
            cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "decode_step.py"), "--model", model_dir,
                   "--dtype", dt, "--threads", str(threads), "--steps", "12", "--json"]
            if weight_dtype:
                cmd += ["--weight-dtype", weight_dtype]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            times[dt].append(json.loads(out.stdout.strip().splitlines()[-1])["step_ms_median"])
    med = {dt: statistics.median(v) for dt, v in times.items()}
    best = min(med, key=med.get)
    print(f"decode step in process: float32 {med['float32']:.1f} ms, bfloat16 {med['bfloat16']:.1f} ms -> {best}",
          flush=True)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, default=2, help="expert actors per replica (default 2)")
    ap.add_argument("--actor-cpus", type=int, default=1, help="CPUs (= torch threads) per expert actor (default 1)")
    ap.add_argument("--replicas", type=int, default=1, help="Serve replicas, each its own group of --actors actors "
                    "(data parallel; default 1)")
    ap.add_argument("--dtype", default="fastest", choices=["fastest", "auto", "float32", "bfloat16"],
                    help="serving compute dtype; fastest = time both in process first (default)")
    ap.add_argument("--weight-dtype", default=None, choices=["fp8", "bf16", "fp32", "int8", "w8a8"],
                    help="resident weight format (default: as stored)")
    ap.add_argument("--config", default=None, help="cluster.yaml to start from (default: ./cluster.yaml if present)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)),
                    help="comma-separated concurrency levels (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="requests each client sends back to back per level "
                    "(default %(default)s; more = steadier numbers on a noisy machine)")
    ap.add_argument("--async-scheduling", action="store_true", help="serve with serving.async_scheduling on")
    ap.add_argument("--scheduler-steps", type=int, default=1, help="serving.num_scheduler_steps: engine steps "
                    "planned and submitted to the actors together (default %(default)s = off)")
    ap.add_argument("--ingress", default="proxy", choices=["proxy", "haproxy"],
                    help="serving.ingress: Serve's Python proxy (default) or HAProxy to the replica's own server")
    ap.add_argument("--no-shared-memory", action="store_true", help="pool.shared_memory false: the actors' MoE "
                    "exchanges over gloo even on one host (to compare with the default, through /dev/shm)")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs per expert actor (default 0: CPU actors)")
    ap.add_argument("--fp8", action="store_true", help="an FP8 bench-mini checkpoint (the GPU path)")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline (quick iteration; "
                    "implies --no-append)")
    ap.add_argument("--client", default="aiohttp", choices=["aiohttp", "httpx"],
                    help="the load generator's HTTP client (it shares the CPUs with the server): aiohttp "
                    "(default, ~3x less CPU per token) or httpx (what runs before 2026-12-02 session 13 used)")
    ap.add_argument("--pairs", type=int, default=3, help="measure our 16 streams and transformers (fastest dtype) "
                    "back to back, each alone on the machine, this many times (the first pair uses the sweep's "
                    "16-stream row; each further pair redeploys the cluster) and report the median ratio (default "
                    "%(default)s; 0 = off; needs the transformers baseline and 16 in --levels)")
    ap.add_argument("--speculative", action="store_true", help="the MTP speculative-decoding row instead of the "
                    "sweep: calibrate bench-mini's MTP module (mode: mtp), then plain vs speculative at 1 and 16 "
                    "streams")
    ap.add_argument("--mtp-steps", type=int, default=100, help="--speculative: steps of the mode mtp job "
                    "(default %(default)s)")
    ap.add_argument("--prefix", action="store_true", help="the shared-prefix chat row instead of the sweep: "
                    "prefix caching off vs on")
    ap.add_argument("--hf-child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hf_child:
        hf_child(a.hf_child[0], a.hf_child[1], int(a.hf_child[2]))
        return
    import torch

    flags = common.cpu_flags_line()
    print(f"CPU: {flags}; load average {os.getloadavg()[0]:.2f}", flush=True)
    if a.speculative or a.prefix:
        if a.dtype == "fastest":
            a.dtype = "float32"  # no timing pass for these rows: the CPU default, recorded with the row
        (run_speculative if a.speculative else run_prefix)(a, flags)
        return

    from expertpool.model.embedded import init_model
    tmp = common.scratch_dir()
    model_dir = os.path.join(tmp, "bench-mini")
    print(f"creating bench-mini (random weights) in {model_dir} ...", flush=True)
    init_model("bench-mini", model_dir, seed=0, fp8=a.fp8)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 2000, (32, PROMPT), generator=g).tolist()
    json.dump(prompts, open(os.path.join(model_dir, "bench_prompts.json"), "w"))

    if a.dtype == "fastest":
        a.dtype = fastest_dtype(model_dir, a.weight_dtype, a.actor_cpus)
    levels = [int(x) for x in a.levels.split(",")]
    hf, hf_child_ = {}, None
    for dt in () if a.skip_hf else ("float32", "bfloat16"):
        print(f"transformers generate() {dt}, batch 16 ...", flush=True)
        child = HFChild(model_dir, dt, 16)
        hf[dt] = child.first
        print(f"  {hf[dt]:.1f} tok/s", flush=True)
        if hf_child_ is None or hf[dt] > hf_child_.first:  # keep the fastest dtype's child for the pairs
            (child, hf_child_) = (hf_child_, child)
        if child is not None:
            child.close()

    data = bench_data(model_dir, a, PROMPT + NEW + 8)
    data["pool"]["actor_resources"]["gpu"] = a.gpus
    data["pool"]["shared_memory"] = not a.no_shared_memory
    data["serving"].update(async_scheduling=a.async_scheduling, ingress=a.ingress,
                           num_scheduler_steps=a.scheduler_steps)
    model = data["model"]["name"]
    ncpu = a.replicas * a.actors * a.actor_cpus + 2

    def up() -> str:
        return common.start(data, num_cpus=ncpu)[0]

    base = up()
    rows = []
    for n in levels:
        print(f"{n} concurrent streams ...", flush=True)
        rows.append(asyncio.run(drive(base, model, n, prompts, a.rounds, a.client)))
        r = rows[-1]
        print(f"  {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.3f}s, ITL p50 {r['itl_p50'] * 1000:.0f}ms",
              flush=True)
    common.stop()
    pairs = []
    if hf_child_ is not None and a.pairs and 16 in levels:
        pairs = interleave(hf_child_, up, common.stop, model, prompts, a.rounds, a.pairs, a.client,
                           first=next(r["tok_s"] for r in rows if r["streams"] == 16))
    if hf_child_ is not None:
        hf_child_.close()
    if a.skip_hf or 16 not in levels or 1 not in levels:
        return
    best_hf = max(hf.values())
    best_dt = max(hf, key=hf.get)
    lines = ["| streams | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['streams']} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | "
                     f"{r['itl_p50'] * 1000:.0f} | {r['itl_p99'] * 1000:.0f} |")
    r16 = next(r for r in rows if r["streams"] == 16)
    r1 = rows[0]
    summary = (f"transformers generate() batch 16: fp32 {hf['float32']:.1f} tok/s, bf16 {hf['bfloat16']:.1f} tok/s "
               f"(fastest: {best_dt}). At 16 streams over HTTP: **{r16['tok_s'] / hf['float32']:.2f}x** transformers "
               f"fp32 (goal >= 2x), {r16['tok_s'] / best_hf:.2f}x its fastest dtype. TTFT p50 at 1 stream: "
               f"**{r1['ttft_p50']:.3f} s** (goal <= 0.5 s).")
    if pairs:
        ratios = sorted(o / t for o, t in pairs)
        summary += (f"\n\nInterleaved with transformers {best_dt}, each engine alone on the machine ({len(pairs)} "
                    "pairs; ours at 16 streams, then transformers' best of two generate() calls with its model kept "
                    "loaded; our cluster shut down while it runs and redeployed for the next pair): "
                    + ", ".join(f"{o:.1f} / {t:.1f}" for o, t in pairs)
                    + f" tok/s; ratio min {ratios[0]:.2f}x, **median {statistics.median(ratios):.2f}x**, "
                    f"max {ratios[-1]:.2f}x (goal >= 2.2x).")
    _report(a, flags, "Serving (bench/serve.py)",
            f"Weights {a.weight_dtype or 'as stored'}; bench-mini random weights, {a.actors} expert actors "
            f"({a.actor_cpus} CPU each) in {'one replica' if a.replicas == 1 else f'each of {a.replicas} replicas'}, "
            f"{PROMPT}-token prompts, {NEW} new tokens, streaming "
            f"completions over HTTP ({a.ingress} ingress, {a.client} client), each client {a.rounds} requests back "
            f"to back"
            f"{'; MoE exchanges over gloo (--no-shared-memory)' if a.no_shared_memory and a.actors > 1 else ''}"
            f"{', async scheduling' if a.async_scheduling else ''}"
            f"{f', {a.scheduler_steps}-step scheduler chains' if a.scheduler_steps > 1 else ''}", lines, summary)

if __name__ == "__main__":
    main()
