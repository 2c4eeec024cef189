"""Tune block sizes on this GPU and write them to ``expertpool/kernels/configs/*.json``.

Usage: ``python -m expertpool.kernels.tune [--kernel fp8_gemm|fused_moe|all] [--m 1 16 64 ...]``

For each DeepSeek-V3 shape and each M bucket it times every candidate config with
``triton.testing.do_bench`` (compile excluded), keeps the fastest and merges it into the JSON
under ``devices[<torch.cuda.get_device_name()>][<shape key>][<M bucket>]``. Other devices'
entries and the ``default`` table are kept. Needs CUDA (compute capability >= 8.9).

Trade-off: an exhaustive sweep over a small grid (BLOCK_K is fixed at 128, the scale block), run
offline, instead of ``@triton.autotune`` at serving time (no first-request stalls, reviewable data).
"""

import argparse
import itertools
import json
import logging
import sys

import torch

from expertpool.kernels import tuned

logger = logging.getLogger(__name__)

# DeepSeek-V3 (N, K) of every FP8 linear: q_a, q_b, kv_a, kv_b, o, shared/dense gate+up, down.
GEMM_SHAPES = [(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384),
               (4096, 7168), (7168, 2048), (36864, 7168), (7168, 18432)]
# (local experts, F, D): 256 on one GPU, 32 per rank at EP=8.
MOE_SHAPES = [(256, 2048, 7168), (32, 2048, 7168)]
MOE_TOP_K = 8
DEFAULT_M = [1, 16, 64, 256, 1024, 4096]
BLOCK_M = [16, 32, 64, 128]
BLOCK_N = [32, 64, 128]
NUM_WARPS = [4, 8]
NUM_STAGES = [3, 4, 5]


def candidates():
    for bm, bn, warps, stages in itertools.product(BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES):
        yield {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def bench_ms(fn, warmup_ms: int = 10, rep_ms: int = 50) -> float:
    """Median milliseconds of ``fn()`` on the GPU (``triton.testing.do_bench``: L2 flushed)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms)


def _best(fn_for_cfg, label):
    from triton.runtime.errors import OutOfResources

    best, best_ms = None, float("inf")
    for cfg in candidates():
        try:
            ms = bench_ms(lambda: fn_for_cfg(cfg), warmup_ms=5, rep_ms=20)
        except OutOfResources as exc:  # too much shared memory for this GPU: skip the config
            logger.debug("%s %s: %s", label, cfg, exc)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    logger.info("%s: best %s (%.4f ms)", label, best, best_ms)
    return best


def tune_fp8_gemm(ms: list[int], device) -> dict:
    from expertpool.kernels.fp8_gemm import fp8_gemm
    from expertpool.kernels.quant import act_quant, weight_quant

    out = {}
    for n, k in GEMM_SHAPES:
        b, b_s = weight_quant(torch.randn(n, k, device=device) * 0.02)
        entry = out.setdefault(tuned.gemm_shape_key(n, k), {})
        for m in ms:
            a, a_s = act_quant(torch.randn(m, k, device=device))
            entry[str(m)] = _best(lambda cfg: fp8_gemm(a, a_s, b, b_s, config=cfg),
                                  f"fp8_gemm M={m} N={n} K={k}")
    return out


def _random_fp8(shape, device) -> torch.Tensor:
    """Per expert, so 256 experts never need a full-size fp32 temporary (~30 GB)."""
    w = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
    for e in range(shape[0]):
        w[e] = torch.randn(shape[1:], device=device, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
    return w


def tune_fused_moe(ms: list[int], device) -> dict:
    from expertpool.kernels.fused_moe import fused_moe

    out = {}
    for e, f, d in MOE_SHAPES:
        w13, w2 = _random_fp8((e, 2 * f, d), device), _random_fp8((e, d, f), device)
        w13_s = torch.full((e, 2 * f // 128, d // 128), 1e-3, device=device)
        w2_s = torch.full((e, d // 128, f // 128), 1e-3, device=device)
        entry = out.setdefault(tuned.moe_shape_key(e, f, d), {})
        for t in ms:
            x = torch.randn(t, d, device=device, dtype=torch.bfloat16)
            topk_w, ids = torch.rand(t, e, device=device).topk(min(MOE_TOP_K, e))
            # the weights are bound as defaults: the names are deleted below to free them before the next shape
            entry[str(t)] = _best(lambda cfg, w13=w13, w2=w2: fused_moe(x, ids, topk_w, w13, w13_s, w2, w2_s,
                                                                        config=cfg),
                                  f"fused_moe T={t} E={e} F={f} D={d}")
        del w13, w2
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=[*tuned.KERNELS, "all"], default="all",
                        help="which kernel's table to tune (default: all)")
    parser.add_argument("--m", type=int, nargs="+", default=DEFAULT_M,
                        help="M buckets: rows for fp8_gemm, routed tokens for fused_moe")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resulting JSON instead of writing the config files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not torch.cuda.is_available():
        print("expertpool.kernels.tune needs a CUDA GPU (none visible); nothing written.",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < (8, 9):
        print(f"{torch.cuda.get_device_name(device)} has compute capability "
              f"{torch.cuda.get_device_capability(device)}; FP8 kernels need >= 8.9.",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device)
    tuners = {"fp8_gemm": tune_fp8_gemm, "fused_moe": tune_fused_moe}
    for kernel in tuned.KERNELS if args.kernel == "all" else [args.kernel]:
        path = tuned.CONFIG_DIR / f"{kernel}.json"
        table = json.loads(path.read_text())
        table.setdefault("devices", {}).setdefault(name, {}).update(tuners[kernel](args.m, device))
        text = json.dumps(table, indent=2) + "\n"
        if args.dry_run:
            print(text)
        else:
            path.write_text(text)
            logger.info("wrote %s (%s)", path, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
