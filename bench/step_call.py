"""What one step costs to send to an actor and get back: a Ray actor task against the step channel.

A local Ray cluster with one actor whose ``step`` returns at once (or after ``--step-ms``); the caller
sends a decode step's items (``--items`` ``StepItem``s, as the replica does) from an asyncio loop,
one step at a time, through each transport in turn (``--rounds`` alternations). It prints, per step:
the round trip, the CPU the caller's process used, and the CPU the actor's process used (its own
``getrusage``, so Ray's threads in it count too). On a machine with few cores the CPU columns are what
the transports take from the actors' compute.

    python bench/step_call.py [--steps 300] [--step-ms 0] [--items 16] [--rounds 2]
"""

import argparse
import asyncio
import resource
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="steps timed per transport and round (default 300)")
    ap.add_argument("--step-ms", type=float, default=0.0, help="how long the actor's step sleeps (default 0)")
    ap.add_argument("--items", type=int, default=16, help="StepItems per step, as a decode step of that batch (16)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two transports (default 2)")
    args = ap.parse_args()

    import threading

    import ray

    from expertpool.model.sampling import SamplingParams
    from expertpool.platform.scheduler import StepItem
    from expertpool.platform.step_channel import ChannelClient, ChannelServer

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Actor:
        def __init__(self, step_s: float):
            self.step_s = step_s
            self.lock = threading.RLock()
            self.server = None

        def step(self, items):
            with self.lock:
                if self.step_s:
                    time.sleep(self.step_s)
                return [1] * len(items)

        def release(self, ids):
            pass

        def open_channel(self):
            self.server = ChannelServer(self.step, self.release, self.lock, "127.0.0.1")
            return self.server.address, self.server.token

        def cpu(self) -> float:
            return _cpu()

    greedy = SamplingParams(max_tokens=64, temperature=0)
    items = [StepItem(f"cmpl-{i:032x}", [7], 40 + i, list(range(4 * i, 4 * i + 4)), True, greedy)
             for i in range(args.items)]
    actor = Actor.remote(args.step_ms / 1000)

    async def timed(name: str, one) -> None:
        for _ in range(20):
            await one()
        c0, a0, t0 = _cpu(), await actor.cpu.remote(), time.perf_counter()
        for _ in range(args.steps):
            await one()
        dt, c1, a1 = time.perf_counter() - t0, _cpu(), await actor.cpu.remote()
        n = args.steps
        print(f"| {name} | {dt / n * 1e3:.3f} | {(c1 - c0) / n * 1e3:.3f} | {(a1 - a0) / n * 1e3:.3f} |", flush=True)

    async def run() -> None:
        address, token = await actor.open_channel.remote()
        chan = ChannelClient(address, token, rank=0)
        print(f"{args.items} items per step, actor step {args.step_ms:g} ms, {args.steps} steps per row\n")
        print("| transport | round trip (ms) | caller CPU (ms) | actor CPU (ms) |\n|---|---:|---:|---:|")
        for _ in range(args.rounds):
            await timed("Ray actor task", lambda: actor.step.remote(items))
            await timed("step channel", lambda: chan.submit(items))
        chan.close()

    asyncio.run(run())
    ray.shutdown()


if __name__ == "__main__":
    main()
