"""Benchmark the FP8 Triton kernels against ceilings measured in the same run (GPU only).

Usage: ``python bench/kernels.py [--no-append] [--quick]`` from the repository root.

Prints, and appends to ``docs/benchmarks.md`` under "## FP8 kernels" (machine, date, command):
1. ceilings: device copy bandwidth (1 GiB copy) and bf16 matmul TFLOP/s (8192^3);
2. ``fp8_gemm`` on DeepSeek-V3 linear shapes, decode (M = 1..64) and prefill (M = 4096): kernel
   alone and with ``act_quant`` (the ``linear`` path), against torch bf16 ``F.linear`` and
   ``torch._scaled_mm`` (per-tensor scales: the FP8 tensor-core rate without block scales),
   where this torch build supports it for the shape;
3. the grouped MoE (``fused_moe``) against a per-expert loop of the same kernels, 32 local
   experts (EP = 8 of 256), D 7168, F 2048, top-8, 1..4096 routed tokens.
Ratios are the point: absolute numbers only mean something next to the ceilings of the same run.
"""

import argparse
import datetime
import importlib.metadata
import platform
import sys
from pathlib import Path

import expertpool.kernels as K  # noqa: F401  (expertpool before torch, per house style)
import torch
import torch.nn.functional as F

from expertpool.kernels.tune import bench_ms  # Triton stays inside expertpool.kernels

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## FP8 kernels"

DIM, MOE_INTER, LOCAL_EXPERTS, TOP_K = 7168, 2048, 32, 8
LINEARS = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168),
           "kv_b": (32768, 512), "o": (7168, 16384), "mlp.gate_up": (36864, 7168),
           "mlp.down": (7168, 18432)}
DECODE_M = (1, 16, 64)
PREFILL_M = 4096
MOE_TOKENS = (1, 16, 128, 512, 1024, 4096)
COPY_BYTES = 1 << 30
CEILING_MATMUL = 8192


def tflops(flop: float, ms: float) -> float:
    return flop / ms / 1e9


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def ceilings(dev) -> tuple[float, float]:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbps = gbps(2 * COPY_BYTES, bench_ms(lambda: dst.copy_(src)))
    a = torch.randn(CEILING_MATMUL, CEILING_MATMUL, device=dev, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    mm_tflops = tflops(2 * CEILING_MATMUL ** 3, bench_ms(lambda: a @ b))
    return copy_gbps, mm_tflops


def scaled_mm_or_none(a8, b8, dev):
    """torch._scaled_mm with per-tensor scales, or None where unsupported (e.g. M = 1)."""
    if not hasattr(torch, "_scaled_mm"):
        return None
    one = torch.ones((), device=dev)

    def fn():
        return torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    try:
        fn()
    except (RuntimeError, ValueError):
        return None
    return fn


def gemm_rows(dev, ms_list, copy_gbps, mm_tflops):
    from expertpool.kernels.fp8_gemm import fp8_gemm
    from expertpool.kernels.quant import act_quant, weight_quant

    rows = []
    for name, (n, k) in LINEARS.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        b, b_s = weight_quant(w)
        for m in ms_list:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            a, a_s = act_quant(x)
            flop = 2 * m * n * k
            nbytes = m * k + n * k + 2 * m * n + 4 * (a_s.numel() + b_s.numel())
            t_fp8 = bench_ms(lambda: fp8_gemm(a, a_s, b, b_s))
            t_lin = bench_ms(lambda: fp8_gemm(*act_quant(x), b, b_s))
            t_bf16 = bench_ms(lambda: F.linear(x, w))
            smm = scaled_mm_or_none(a, b, dev)
            t_smm = bench_ms(smm) if smm else None
            rows.append([name, m, n, k, f"{t_fp8 * 1e3:.1f}", f"{tflops(flop, t_fp8):.0f}",
                         f"{100 * tflops(flop, t_fp8) / mm_tflops:.0f}%",
                         f"{gbps(nbytes, t_fp8):.0f}",
                         f"{100 * gbps(nbytes, t_fp8) / copy_gbps:.0f}%",
                         f"{t_lin * 1e3:.1f}", f"{t_bf16 * 1e3:.1f}", f"{t_bf16 / t_lin:.2f}x",
                         f"{t_smm * 1e3:.1f}" if t_smm else "n/a"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def per_expert_loop(x, ids, topk_w, w13, w13_s, w2, w2_s):
    """What the grouped kernel replaces: two fp8_gemm + two act_quant launches per active expert."""
    from expertpool.kernels.fp8_gemm import fp8_gemm
    from expertpool.kernels.quant import act_quant

    t, d = x.shape
    f = w13.shape[1] // 2
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    tok = order // ids.shape[1]
    out = torch.zeros(t, d, device=x.device, dtype=torch.float32)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = tok[start:start + c]
        gu = fp8_gemm(*act_quant(x[rows]), w13[e], w13_s[e])
        h = F.silu(gu[:, :f]) * gu[:, f:]
        y = fp8_gemm(*act_quant(h), w2[e], w2_s[e], out_dtype=torch.float32)
        out.index_add_(0, rows, y * topk_w.reshape(-1)[order[start:start + c], None])
        start += c
    return out.to(x.dtype)


def moe_rows(dev, tokens_list, copy_gbps, mm_tflops):
    from expertpool.kernels.fused_moe import fused_moe

    e, f, d = LOCAL_EXPERTS, MOE_INTER, DIM
    w13 = torch.empty(e, 2 * f, d, dtype=torch.float8_e4m3fn, device=dev)
    w2 = torch.empty(e, d, f, dtype=torch.float8_e4m3fn, device=dev)
    for i in range(e):
        w13[i] = (torch.randn(2 * f, d, device=dev) * 50).to(torch.float8_e4m3fn)
        w2[i] = (torch.randn(d, f, device=dev) * 50).to(torch.float8_e4m3fn)
    w13_s = torch.full((e, 2 * f // 128, d // 128), 4e-4, device=dev)
    w2_s = torch.full((e, d // 128, f // 128), 4e-4, device=dev)
    rows = []
    for t in tokens_list:
        x = torch.randn(t, d, device=dev, dtype=torch.bfloat16)
        topk_w, ids = torch.rand(t, e, device=dev).topk(TOP_K)
        pairs = t * TOP_K
        active = int((torch.bincount(ids.reshape(-1), minlength=e) > 0).sum())
        flop = 2 * pairs * 3 * f * d
        nbytes = active * 3 * f * d + 2 * t * d * 2  # active experts' fp8 weights + x in, y out
        t_grouped = bench_ms(lambda: fused_moe(x, ids, topk_w, w13, w13_s, w2, w2_s))
        t_loop = bench_ms(lambda: per_expert_loop(x, ids, topk_w, w13, w13_s, w2, w2_s))
        rows.append([t, active, f"{t_grouped * 1e3:.1f}", f"{tflops(flop, t_grouped):.0f}",
                     f"{100 * tflops(flop, t_grouped) / mm_tflops:.0f}%",
                     f"{gbps(nbytes, t_grouped):.0f}",
                     f"{100 * gbps(nbytes, t_grouped) / copy_gbps:.0f}%",
                     f"{t_loop * 1e3:.1f}", f"{t_loop / t_grouped:.2f}x"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def insert_in_section(doc: str, text: str) -> str:
    """Append ``text`` at the end of the FP8 section (created at the end if missing), leaving
    other engineers' sections untouched."""
    if SECTION not in doc:
        doc = doc.rstrip("\n") + f"\n\n{SECTION}\n"
    start = doc.index(SECTION)
    nxt = doc.find("\n## ", start + len(SECTION))
    end = len(doc) if nxt == -1 else nxt + 1
    return doc[:end].rstrip("\n") + "\n" + text + ("\n" + doc[end:] if nxt != -1 else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-append", action="store_true",
                        help="print only; do not append the tables to docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes (M in {1, 4096}; 1, 128, 4096 routed tokens)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing measured.", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 9):
        print(f"bench/kernels.py needs compute capability >= 8.9 for FP8, got {cap}.",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(dev)
    ms_list = (1, PREFILL_M) if args.quick else (*DECODE_M, PREFILL_M)
    tokens_list = (1, 128, 4096) if args.quick else MOE_TOKENS

    copy_gbps, mm_tflops = ceilings(dev)
    print(f"{gpu}: copy {copy_gbps:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s")
    g_header = ["layer", "M", "N", "K", "fp8_gemm us", "TFLOP/s", "% bf16 peak", "GB/s",
                "% copy BW", "act_quant+gemm us", "bf16 F.linear us", "speedup vs bf16",
                "_scaled_mm (tensorwise) us"]
    print(" | ".join(g_header))
    g_rows = gemm_rows(dev, ms_list, copy_gbps, mm_tflops)
    m_header = ["routed tokens", "active experts", "fused_moe us", "TFLOP/s", "% bf16 peak",
                "GB/s", "% copy BW", "per-expert loop us", "speedup"]
    print(" | ".join(m_header))
    m_rows = moe_rows(dev, tokens_list, copy_gbps, mm_tflops)

    if not args.no_append:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = (f"\n### {date}, {gpu}\n\n"
                f"Command: `python {' '.join(['bench/kernels.py', *sys.argv[1:]])}`; torch "
                f"{torch.__version__}, triton {importlib.metadata.version('triton')}, host "
                f"{platform.node()}. Ceilings this run: copy {copy_gbps:.0f} GB/s, bf16 matmul "
                f"{mm_tflops:.0f} TFLOP/s.\n\n"
                f"{table(g_header, g_rows)}\n\n"
                f"Grouped MoE, {LOCAL_EXPERTS} local experts, D {DIM}, F {MOE_INTER}, "
                f"top-{TOP_K}:\n\n{table(m_header, m_rows)}\n")
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(insert_in_section(DOC.read_text() if DOC.exists() else "# Benchmarks\n",
                                         text))
        print(f"appended to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
