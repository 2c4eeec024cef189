"""One MoE layer's routed experts on CPU, by resident weight format and path (issue 14).

bench-mini's experts (64 x [2 x 256, 1024] and [1024, 256]), ``--tokens`` tokens routed top-6 at
random, through ``reference.moe_experts_inference`` (what a decode step calls): the grouped C kernel
(``kernels.cpu_experts``) for bf16 weights (bf16 dot product where the CPU has it), weight-only int8
(codes widened in registers, rows scaled once) and fp32, and the per-expert torch loop the kernel
replaced for int8 (``torch._weight_int8pack_mm``). Each variant reads its own copy of the weights,
rotated so that no variant finds the previous one's in cache (weights from DRAM, as in a decode step
of a model larger than the caches). Medians over ``--reps`` calls, the first three dropped.

    python bench/moe_layer.py [--threads 2] [--tokens 16] [--reps 15] [--dtype bfloat16]
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import expertpool  # noqa: E402,F401  (expertpool before torch, per house style)
import torch  # noqa: E402

from common import cpu_flags_line  # noqa: E402

E, D, F, TOP_K = 64, 1024, 256, 6
COPIES = 4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens routed through the layer (default 16: a "
                    "decode step of 16 sequences)")
    ap.add_argument("--reps", type=int, default=15, help="calls per variant (default 15; first 3 dropped)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype of "
                    "the activations (default bfloat16)")
    a = ap.parse_args()
    from expertpool.kernels import cpu_experts
    from expertpool.kernels import reference as ref

    torch.set_num_threads(a.threads)
    xdt = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    print(f"CPU: {cpu_flags_line()}; {a.threads} threads, {a.tokens} tokens, {a.dtype} activations", flush=True)
    print(f"making {COPIES} copies of the layer's weights in each format ...", flush=True)
    copies = []
    for _ in range(COPIES):
        w13 = torch.randn(E, 2 * F, D, generator=g) * 0.02
        w2 = torch.randn(E, D, F, generator=g) * 0.02
        (q13, s13), (q2, s2) = ref.int8_weight_quant(w13), ref.int8_weight_quant(w2)
        copies.append({"bf16": (w13.bfloat16(), None, w2.bfloat16(), None), "int8": (q13, s13, q2, s2),
                       "fp32": (w13, None, w2, None)})
    x = torch.randn(a.tokens, D, generator=g).to(xdt)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(a.tokens)])
    wts = torch.rand(a.tokens, TOP_K, generator=g)
    variants = [("bf16, kernel", "bf16", False), ("int8, kernel", "int8", False),
                ("int8, torch loop", "int8", True), ("fp32, kernel", "fp32", False)]
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    active = int((torch.bincount(ids.flatten(), minlength=E) > 0).sum())
    with torch.no_grad():
        for rep in range(a.reps):
            for vi, (name, fmt, loop) in enumerate(variants):
                w13, s13, w2, s2 = copies[(rep + vi) % COPIES][fmt]
                t = time.perf_counter()
                if loop:
                    with cpu_experts.switched_off():
                        ref.moe_experts_inference(x, ids, wts, w13, s13, w2, s2)
                else:
                    ref.moe_experts_inference(x, ids, wts, w13, s13, w2, s2)
                times[name].append(time.perf_counter() - t)
    per_expert = {"bf16": 2, "int8": 1, "fp32": 4}
    print(f"\n{active} of {E} experts active\n")
    print("| variant | median ms | min ms | GB/s of weights read (median) |")
    print("|---|---:|---:|---:|")
    for name, fmt, _ in variants:
        v = times[name][3:] or times[name]
        med = statistics.median(v)
        gb = active * 3 * D * F * per_expert[fmt] / 1e9
        print(f"| {name} | {med * 1e3:.2f} | {min(v) * 1e3:.2f} | {gb / med:.1f} |")


if __name__ == "__main__":
    main()
