"""The pieces of a CPU expert-parallel step that the group adds (issue 14), on this host:

- one ``all_to_all_single`` between two 1-thread processes, over gloo and through shared memory
  (``model.shm_exchange``: its C loop, and the Python loop it falls back to), at the sizes a
  bench-mini decode step exchanges: the split counts, and rows of 1024 bf16 + 8 id bytes for 1, 24
  and 48 (token, expert) pairs per peer;
- the output head on one thread: the whole lm_head for a rank's 8 rows, against the vocabulary slice
  of a 2-rank group for all 16 rows (``model.vocab_parallel``), bf16 and fp32.

    python bench/ep_exchange.py [--iters 1000]

Medians of five batches of ``--iters`` calls (the head: of ``--iters // 5``), after a warm-up.
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


def _median_us(f, n: int, barrier=None) -> float:
    for _ in range(20):
        f()
    out = []
    for _ in range(5):
        if barrier:
            barrier()
        t = time.perf_counter()
        for _ in range(n // 5):
            f()
        out.append((time.perf_counter() - t) / (n // 5) * 1e6)
    return statistics.median(out)


def child(rank: int, port: int, iters: int) -> dict:
    import torch
    import torch.distributed as dist

    from expertpool.model.shm_exchange import join_group, slot_bytes_for

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ex = join_group(slot_bytes=slot_bytes_for(2))
    res = {}
    cases = [("counts", torch.zeros(2, dtype=torch.long), None)]
    cases += [(f"{n} rows/peer", torch.zeros(2 * n, 1028, dtype=torch.bfloat16), [n, n]) for n in (1, 24, 48)]
    for name, x, splits in cases:
        out = torch.empty_like(x)
        res[name] = {"gloo": _median_us(lambda: dist.all_to_all_single(out, x, splits, splits), iters, dist.barrier)}
        if ex is not None:
            lib = ex._lib
            res[name]["shm"] = _median_us(lambda: ex.all_to_all_single(out, x, splits, splits), iters, dist.barrier)
            ex._lib = None  # the Python loop (no C compiler, or EXPERTPOOL_SHM_C_LOOP=0)
            res[name]["shm-python"] = _median_us(lambda: ex.all_to_all_single(out, x, splits, splits), iters,
                                                 dist.barrier)
            ex._lib = lib
    dist.destroy_process_group()
    return res


def head(iters: int) -> dict:
    import torch

    from expertpool import kernels

    torch.set_num_threads(1)
    out = {}
    for dt in (torch.bfloat16, torch.float32):
        w = (torch.randn(32000, 1024) * 0.02).to(dt)
        whole, half = kernels.pack_weight(w), kernels.pack_weight(w[:16000])
        x8, x16 = torch.randn(8, 1024).to(dt), torch.randn(16, 1024).to(dt)
        out[str(dt).split(".")[1]] = {
            "whole head, 8 rows": _median_us(lambda: kernels.packed_linear(x8, whole), max(10, iters // 5)) / 1e3,
            "half head, 16 rows": _median_us(lambda: kernels.packed_linear(x16, half), max(10, iters // 5)) / 1e3}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=1000, help="calls timed per case (five batches)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.child, a.port, a.iters)))
        return
    import common
    print(f"CPU: {common.cpu_flags_line()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(r), "--port", str(port), "--iters",
                               str(a.iters)], stdout=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "a child failed"
    res = json.loads(outs[0].strip().splitlines()[-1])
    print("\none all_to_all_single between two 1-thread processes (median us):")
    print("| message | gloo | shared memory, Python loop | shared memory, C loop |\n|---|---:|---:|---:|")
    for name, r in res.items():
        print(f"| {name} | {r['gloo']:.0f} | {r.get('shm-python', float('nan')):.0f} | "
              f"{r.get('shm', float('nan')):.0f} |")
    print("\nthe output head on one thread (median ms):")
    print("| dtype | whole head, a rank's 8 rows | half head, the group's 16 rows |\n|---|---:|---:|")
    for dt, r in head(a.iters).items():
        print(f"| {dt} | {r['whole head, 8 rows']:.2f} | {r['half head, 16 rows']:.2f} |")


if __name__ == "__main__":
    main()
