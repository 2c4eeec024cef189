"""What the serving path costs per token, without a model (issue 14): detokenizing, SSE framing, the
replica's event loop, Ray Serve's per-chunk streaming to the proxy, and the proxy.

A paced engine (``PacedEngine``: every open stream gets one token per step, a step every
``--step-ms``, like the real engine's step loop but with no compute) serves bench-mini's tokenizer
behind the real OpenAI layer and Serve app. N clients stream completions over HTTP; reported: the
tokens/s the path delivers, and the CPU time the replica, the proxy and the client spent per
streamed token (``/proc`` accounting of each process over the run). Variants (``--variants``):

- ``default``: Serve as deployed (user code on its own thread in the replica, proxy in front);
- ``same-loop``: ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`` (the replica's user code on Serve's
  main event loop: one thread hop less per chunk);
- ``direct``: ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, clients connect to the replica's own HTTP port
  (no proxy hop and no Ray object per chunk; in production this needs a load balancer in front:
  ``serving.ingress: haproxy`` puts HAProxy there).

Variants combine with ``+`` (``direct+same-loop``).

    python bench/serve_path.py [--streams 16] [--tokens 64] [--step-ms 0] [--variants default,same-loop,direct]
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import expertpool  # noqa: E402,F401  (expertpool before torch, per house style)
from common import stream  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class PacedEngine:
    """The ``Engine`` protocol with no model: one step every ``step_s`` gives every open stream its next
    token (ids cycling through the vocabulary's printable range), like the engine's step loop."""

    max_seq_len = 4096

    def __init__(self, step_s: float, model_id: str = "paced"):
        from expertpool.platform.scheduler import TokenEvent
        self.TokenEvent = TokenEvent
        self.step_s, self.model_id = step_s, model_id
        self.queues: dict[str, asyncio.Queue] = {}
        self.state: dict[str, list] = {}
        self.steps = 0
        self._task = None

    def model_ids(self):
        return [self.model_id]

    async def _loop(self):
        while True:
            await asyncio.sleep(self.step_s)
            self.steps += 1
            for rid, (n, params, prompt_len) in list(self.state.items()):
                n += 1
                tok = 300 + (n * 7 + len(rid)) % 1500
                done = n >= params.max_tokens
                self.queues[rid].put_nowait(self.TokenEvent([tok], "length" if done else None, prompt_len, n))
                if done:
                    del self.state[rid]
                else:
                    self.state[rid] = (n, params, prompt_len)

    async def generate(self, request_id, prompt_token_ids, params, model=None):
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = q
        self.state[request_id] = (0, params, len(prompt_token_ids))
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.queues.pop(request_id, None)
            self.state.pop(request_id, None)

    async def abort(self, request_id):
        self.state.pop(request_id, None)

    def stats(self):
        return {"steps": self.steps}

    async def check_health(self):
        return None

    async def load_patch(self, domain, patch_dir):
        raise NotImplementedError


def paced_engine(cfg):
    """``engine_factory`` target (``serve_path:paced_engine``)."""
    return PacedEngine(float(os.environ.get("PACED_STEP_S", "0")))


def _cpu_s(pid: int) -> float:
    parts = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


async def _drive(url: str, model: str, streams: int, tokens: int) -> dict:
    import httpx

    async def one(client, i):
        out = await stream(client, url, {"model": model, "prompt": f"stream {i}", "max_tokens": tokens,
                                         "temperature": 0})
        assert out["error"] is None, out["error"]
        return out["usage"]

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=streams + 4)) as client:
        await one(client, -1)
        t = time.perf_counter()
        counts = await asyncio.gather(*[one(client, i) for i in range(streams)])
        return {"tokens": sum(counts), "seconds": time.perf_counter() - t}


def run_variant(variant: str, streams: int, tokens: int, step_ms: float, rounds: int) -> dict:
    import ray
    from ray import serve

    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.platform.app import build_app_from_config
    from expertpool.platform.config import parse_config
    from common import free_port

    env = {"PACED_STEP_S": str(step_ms / 1000), "PYTHONPATH": f"{REPO}:{HERE}"}
    parts = variant.split("+")  # variants combine: direct+same-loop
    unknown = set(parts) - {"default", "same-loop", "direct"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)}: use default, same-loop, direct, joined by +")
    if "same-loop" in parts:
        env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
    if "direct" in parts:
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ.update(env)  # the controller and proxy are started by this process
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = parse_config({"serving": {"host": "127.0.0.1", "port": port, "max_ongoing_requests": 256,
                                        "autoscaling": {"target_ongoing_requests": 16}},
                            "model": {"tokenizer": str(ensure_embedded_model())}})
        serve.run(build_app_from_config(cfg, engine_factory="serve_path:paced_engine"), name="paced",
                  route_prefix="/", blocking=False)
        while serve.status().applications["paced"].status != "RUNNING":
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        if "direct" in parts:
            url = _direct_url()
        replica = _pids("ServeReplica:paced")
        proxy = _pids("ProxyActor")
        me = os.getpid()
        out = []
        for _ in range(rounds):
            c0 = {p: _cpu_s(p) for p in replica + proxy + [me]}
            res = asyncio.run(_drive(url, "paced", streams, tokens))  # PacedEngine.model_id
            c1 = {p: _cpu_s(p) for p in c0}
            n = res["tokens"]
            out.append({"tok_s": n / res["seconds"],
                        "replica_us_per_token": sum(c1[p] - c0[p] for p in replica) / n * 1e6,
                        "proxy_us_per_token": sum(c1[p] - c0[p] for p in proxy) / n * 1e6,
                        "client_us_per_token": (c1[me] - c0[me]) / n * 1e6})
        return {k: sorted(o[k] for o in out)[len(out) // 2] for k in out[0]}
    finally:
        serve.shutdown()
        ray.shutdown()
        for k in env:
            os.environ.pop(k, None)


def _direct_url() -> str:
    """The replica's own HTTP port under direct ingress (read from the replica's listening socket)."""
    pids = _pids("ServeReplica:paced")
    for pid in pids:
        out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if f"pid={pid}," in line and "127.0.0.1:" in line:
                return "http://" + line.split()[3]
    raise RuntimeError("direct ingress: the replica's HTTP port was not found")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=16, help="concurrent streaming clients (default 16)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each request streams (default 64)")
    ap.add_argument("--step-ms", type=float, default=0.0, help="engine step period (0: as fast as the path goes)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per variant, the median reported (default 3)")
    ap.add_argument("--variants", default="default,same-loop,direct",
                    help="comma-separated variants, each default, same-loop, direct or a +-joined combination "
                         "(default: default,same-loop,direct)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:  # one variant per process: Serve reads its env at import
        print(json.dumps(run_variant(a.variant, a.streams, a.tokens, a.step_ms, a.rounds)))
        return
    import common
    print(f"CPU: {common.cpu_flags_line()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for v in a.variants.split(","):
        p = subprocess.run([sys.executable, __file__, "--variant", v, "--streams", str(a.streams), "--tokens",
                            str(a.tokens), "--step-ms", str(a.step_ms), "--rounds", str(a.rounds)],
                           capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=f"{REPO}:{HERE}"))
        if p.returncode:
            print(f"{v}: failed\n{p.stderr[-3000:]}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append((v, r))
        print(f"{v}: {r}", flush=True)
    print("\n| variant | tok/s | replica CPU us/token | proxy CPU us/token | client CPU us/token |")
    print("|---|---|---|---|---|")
    for v, r in rows:
        print(f"| {v} | {r['tok_s']:.0f} | {r['replica_us_per_token']:.0f} | {r['proxy_us_per_token']:.0f} | "
              f"{r['client_us_per_token']:.0f} |")


if __name__ == "__main__":
    main()
