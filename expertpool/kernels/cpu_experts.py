"""The routed experts' few-row products on CPU: ``csrc/expert_gemv.c``, built on first use.

A decode step gives most experts one to three rows. oneDNN and MKL spend more on packing and dispatch
than on reading weights at that size: on bench-mini (1024 x 512 weights) the per-expert bf16 products
read ~10 GB/s where the machine streams ~25-40. This kernel streams each weight row once, widens bf16
weights to fp32 in registers (bf16 storage with fp32 compute costs no extra pass) and accumulates in
fp32; one call covers every active expert of a layer and shares torch's OpenMP threads. Weight-only
int8 experts (``weight_dtype: int8``: codes and one bf16 scale per row) take the same fp32 path: the
codes are widened in registers (exactly) and each row's sum is scaled once, so they stream half of
bf16's bytes (bench-mini, one decode-like layer at 2 threads: 0.7-0.9x bf16's time through the dot
product below; the widening, not the memory, bounds it). Each output row is summed in one order
whatever else is in the batch. With bf16 activations and weights (bf16 compute) on a CPU with
AVX512_BF16, a second entry takes both as they are through the CPU's bf16 dot product (``vdpbf16ps``:
exact products, fp32 sums, pairs of k first), without the widening instructions: at one thread on Zen
5, 64 experts from DRAM, 29-33 against 26-29 GB/s at one row per expert, 20-28 against 13-19 at two
(``has_bf16_dot``; ``without_bf16_dot`` or ``EXPERTPOOL_CPU_BF16_DOT=0`` for the widening path). A
third entry takes int8 codes with bf16 activations (bf16 compute, ``weight_dtype: int8``) through the
same dot product where the CPU also has AVX512_VBMI: 64 codes become two bf16 vectors by a table
lookup (exact: a code has 7 significant bits), and two rows of an expert share one pass (one
decode-like bench-mini layer, alternated: 0.93-0.97x the widening path's time at 2 threads x 16
tokens, 0.83-0.88x at one thread; ``has_i8_dot``; ``without_i8_dot`` or ``EXPERTPOOL_CPU_I8_DOT=0``
for the widening path). ``group`` sorts a layer's (token, slot) pairs by expert in one C call.

The same library holds the decode attention (``csrc/mla_decode.c``, called through
``cpu_attention``); this module builds and loads it. Built with the machine's C compiler (``cc -O3
-march=native -fopenmp``; ``CC`` overrides) into ``$EXPERTPOOL_CACHE/kernels`` (default
``~/.cache/expertpool/kernels``), keyed by the sources, the compiler, its flags and the CPU's flags,
so a cluster of mixed CPUs builds one per kind. A cap on torch's vector ISA
(``ATEN_CPU_CAPABILITY=avx2`` or ``default``) caps the build the same way, so an AVX-512 machine can
run the code an AVX2-only one would (``isa_cap_flags``). Without a compiler, or with
``EXPERTPOOL_CPU_EXPERT_KERNEL=0``, every kernel of the library is off: the experts, the decode
attention, the per-head products, norms and router run through torch, the bf16 linears through oneDNN
(logged once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "expert_gemv.c"
# one library for the CPU kernels: the experts' products here, the decode attention (cpu_attention)
SOURCES = [SOURCE, CSRC / "mla_decode.c", CSRC / "mla_prep.c", CSRC / "small_gemm.c", CSRC / "rms_norm.c",
           CSRC / "router.c", CSRC / "moe_ops.c", CSRC / "shm_ring.c", CSRC / "w8a8_gemm.c"]
HEADERS = [CSRC / "vec.h"]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
ENV_SWITCH = "EXPERTPOOL_CPU_EXPERT_KERNEL"
DOT_SWITCH = "EXPERTPOOL_CPU_BF16_DOT"
I8_DOT_SWITCH = "EXPERTPOOL_CPU_I8_DOT"
# the widest vector of the source (L: 16 fp32 lanes with AVX-512): the packed-row scratch is sized for it
MAX_LANES = 16
# experts with more rows than this in a layer send the layer to oneDNN / MKL, whose GEMMs win once the
# weights are reused over many rows (long prefill chunks). Measured per layer on bench-mini's experts
# (64 x 1024 x 256, 2 threads, Zen 5): the kernel took 0.3-0.9x the per-expert oneDNN loop's time at
# 9-128 rows per expert, in bf16 (bf16 dot), fp32 on bf16 or fp32 weights, and the AVX2 build against
# oneDNN capped at AVX2; at 256 rows 0.7-1.1x (docs/benchmarks.md, session 18)
MAX_ROWS = 128

# ATen's ISA cap (ATEN_CPU_CAPABILITY) -> the compiler flags that keep the kernel within it
ISA_CAP_FLAGS = {"avx2": ["-mno-avx512f"], "default": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}

_lock = threading.Lock()
_state: dict = {}


class Switch:
    """A fast path's off switch: its environment variable set to 0 (read once per process, logged), or
    ``off()`` around a block (tests and A/B benchmarks)."""

    def __init__(self, env: str | None, off_means: str):
        self.env, self.off_means = env, off_means
        self._blocked = False
        self._env_on: bool | None = None

    def on(self) -> bool:
        return not self._blocked and self.env_on()

    def env_on(self) -> bool:
        """Whether the environment leaves the path on (a block's ``off()`` aside)."""
        if self._env_on is None:
            value = os.environ.get(self.env, "1") if self.env else "1"
            self._env_on = value.strip().lower() not in ("0", "false", "no", "off")
            if not self._env_on:
                log.info("%s=0: %s", self.env, self.off_means)
        return self._env_on

    def reread(self) -> None:
        """Read the environment variable again at the next ``on()`` (tests)."""
        self._env_on = None

    @contextmanager
    def off(self):
        before, self._blocked = self._blocked, True
        try:
            yield
        finally:
            self._blocked = before


# the experts' kernel inside a block (the library as a whole: ENV_SWITCH)
EXPERTS = Switch(None, "routed experts run through torch's GEMMs")
# bf16 activations through the bf16 dot product; off: widened as fp32 compute does (A/B, a suspect CPU)
BF16_DOT = Switch(DOT_SWITCH, "bf16 routed experts are widened to fp32 in the kernel")
# SwiGLU and the weighted combine around the kernel's two products in one C call each (moe_ops.c)
EPILOGUE = Switch(None, "the steps between and after the experts' products run as torch ops")
# expert parallelism's pack and combine around the all-to-all in one C call each (moe_ops.c)
EP_OPS = Switch("EXPERTPOOL_CPU_EP_OPS", "the expert-parallel pack and combine run as torch ops")
switched_off = EXPERTS.off  # run the experts through torch's GEMMs inside the block
without_fused_steps = EPILOGUE.off  # the kernel's products, the steps around them as torch ops
without_bf16_dot = BF16_DOT.off  # bf16 activations take the widening fp32 path inside the block
# int8 codes with bf16 activations through the bf16 dot product; off: widened to fp32 (A/B, a suspect CPU)
I8_DOT = Switch(I8_DOT_SWITCH, "int8 routed experts under bf16 compute are widened to fp32 in the kernel")
without_i8_dot = I8_DOT.off  # int8 codes with bf16 activations take the widening fp32 path inside the block

def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    """``kernels/`` in expertpool's local cache (``EXPERTPOOL_CACHE``, as ``model.storage.cache_dir``)."""
    return Path(os.environ.get("EXPERTPOOL_CACHE", Path.home() / ".cache" / "expertpool")) / "kernels"


def isa_cap_flags(env=os.environ) -> list[str]:
    """Compiler flags for an ISA cap set for torch (``ATEN_CPU_CAPABILITY``), none without one."""
    cap = env.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    return ISA_CAP_FLAGS.get(cap, [])


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _build(cc: str) -> Path:
    """The shared library for this source, compiler and CPU, built once (atomically: concurrent actors
    each build to a temporary name and the rename wins). A cache directory that cannot be written (a
    read-only home in a container) falls back to the temporary directory, logged."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = CFLAGS + isa_cap_flags()
    texts = [f.read_text() for f in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, cc, version, " ".join(flags), _cpu_flags()]).encode()).hexdigest()[:16]
    name = f"cpu_kernels-{key}.so"
    try:
        return _build_in(cc, flags, _cache_dir(), name)
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / "expertpool-kernels"
        log.warning("cannot build the CPU kernels in %s (%s); building it in %s", _cache_dir(), e, fallback)
        return _build_in(cc, flags, fallback, name)


def compile_command(cc: str, flags: list[str], out) -> list[str]:
    """The compiler's command line that builds the library (every source, the headers' directory)."""
    return [cc, *flags, "-I", str(CSRC), "-o", str(out), *map(str, SOURCES)]


def _build_in(cc: str, flags: list[str], where: Path, name: str) -> Path:
    out = where / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(compile_command(cc, flags, tmp), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit status {r.returncode}"
            raise RuntimeError(f"{cc} failed: {last}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the CPU kernels %s in %.1f s (%s %s)", out.name, time.perf_counter() - t0, cc,
             " ".join(flags))
    return out


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    fn = lib.grouped_gemv
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [P, I64, P, P, P, I64, P, ctypes.c_int, P, I64, P, P, ctypes.c_int]
    fn.restype = None
    lib.mla_decode.argtypes = [P, P, ctypes.c_int, P, ctypes.c_int, I64, P, I64, P, I64, I64, I64, I64, I64,
                               ctypes.c_float, P, ctypes.c_int]
    lib.mla_decode.restype = ctypes.c_int
    lib.mla_prep.argtypes = [P, I64, I64, I64, I64, P, I64, I64, I64, I64, ctypes.c_int, P, P, P, ctypes.c_float,
                             P, P, I64, P]
    lib.mla_prep.restype = ctypes.c_int
    lib.rms_norm.argtypes = [P, I64, ctypes.c_int, P, I64, I64, ctypes.c_float, P]
    lib.rms_norm.restype = None
    lib.moe_swiglu.argtypes, lib.moe_swiglu.restype = [P, I64, I64, ctypes.c_int, P], None
    lib.moe_combine.argtypes = [P, P, P, I64, I64, I64, I64, ctypes.c_int, P, P]
    lib.moe_combine.restype = None
    lib.moe_group.argtypes = [P, I64, I64, I64, P, I64, P, I64, P, P, P, P, P, P, P, P, P]
    lib.moe_group.restype = I64
    lib.ep_pack.argtypes = [P, I64, I64, I64, P, P, P, I64, I64, P, I64, P, I64, P, P, P, P]
    lib.ep_pack.restype = I64
    lib.ep_combine.argtypes = [P, I64, P, P, I64, I64, I64, ctypes.c_int, P, P]
    lib.ep_combine.restype = None
    lib.route_sigmoid.argtypes = [P, I64, ctypes.c_int, I64, I64, P, P, I64, I64, I64, I64, ctypes.c_int,
                                  ctypes.c_float, P, P, P, ctypes.c_int]
    lib.route_sigmoid.restype = ctypes.c_int
    gemm = [P, I64, I64, I64, I64, P, I64, I64, P, I64, I64, ctypes.c_int]
    lib.grouped_gemm_f32.argtypes, lib.grouped_gemm_f32.restype = gemm, None
    lib.grouped_gemm_lanes.argtypes, lib.grouped_gemm_lanes.restype = [], ctypes.c_int
    lib.shm_a2a.argtypes = [P, I64, I64, I64, ctypes.c_int, ctypes.c_int, P, P, P, P, P, P, I64, I64]
    lib.shm_a2a.restype = ctypes.c_int
    if hasattr(lib, "w8a8_gemm"):  # built where the compiler targets AVX512_VNNI (cpu_w8a8)
        lib.w8a8_quant_rows.argtypes = [P, ctypes.c_int, I64, I64, I64, P, P]
        lib.w8a8_quant_rows.restype = None
        lib.w8a8_gemm.argtypes = [P, P, I64, I64, P, P, P, I64, P, I64, ctypes.c_int, ctypes.c_int]
        lib.w8a8_gemm.restype = None
    if has_bf16_dot(lib):  # built where the compiler targets AVX512_BF16
        lib.grouped_gemm_bf16.argtypes, lib.grouped_gemm_bf16.restype = gemm, None
        lib.grouped_gemv_bf16.argtypes = [P, I64, P, P, P, I64, P, I64, P, P, ctypes.c_int]
        lib.grouped_gemv_bf16.restype = None
    if has_i8_dot(lib):  # and AVX512_VBMI (the codes' bf16 lookup)
        lib.grouped_gemv_i8bf16.argtypes = [P, I64, P, P, P, I64, P, P, I64, P, P, ctypes.c_int]
        lib.grouped_gemv_i8bf16.restype = None
    return lib


def has_bf16_dot(lib) -> bool:
    """Whether this build of the kernel has the bf16 dot-product entry (``grouped_gemv_bf16``: compiled
    only where the target CPU has AVX512_BF16, e.g. AMD Zen 4/5, Intel Cooper Lake and later)."""
    return hasattr(lib, "grouped_gemv_bf16")


def has_i8_dot(lib) -> bool:
    """Whether this build has the entry that takes int8 codes and bf16 activations through the bf16 dot
    product (``grouped_gemv_i8bf16``: compiled where the target CPU has AVX512_BF16 and AVX512_VBMI)."""
    return hasattr(lib, "grouped_gemv_i8bf16")


def library():
    """The loaded kernel (``ctypes``), or None where it is switched off or cannot be built (the reason
    logged once)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, None
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            why = f"{ENV_SWITCH}=0"
        elif (cc := _compiler()) is None:
            why = f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
        else:
            try:
                lib = _load(_build(cc))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                lib, why = None, str(e)
        if lib is None:
            log.warning("CPU kernels unavailable (%s): routed experts, decode attention, norms and router run "
                        "through torch, slower at decode batch sizes", why)
        _state["lib"] = lib
        return lib


def applies(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: list[int],
            w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> bool:
    """Whether ``grouped_gemv`` serves a layer's two products: CPU tensors, fp32 or bf16 activations,
    contiguous weights, either fp32 or bf16 without scales or weight-only int8 with one bf16 scale per
    output row (``reference.int8_weight_quant``), at most ``MAX_ROWS`` rows per expert, and the kernel
    available. Any other weight format with its scales (FP8 and its block scales) does not apply."""
    return max(counts) <= MAX_ROWS and applies_to_weights(x, w13, w2, w13_scale, w2_scale)


def applies_to_weights(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None = None,
                       w2_scale: torch.Tensor | None = None) -> bool:
    """``applies`` but for the rows per expert (``group`` gives them)."""
    dense = (torch.float32, torch.bfloat16)

    def fits(w, s):
        if w.device.type != "cpu" or not w.is_contiguous():
            return False
        if s is None:
            return w.dtype in dense
        return (w.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.device.type == "cpu"
                and s.shape == w.shape[:2] and s.is_contiguous())
    return (EXPERTS.on() and x.device.type == "cpu" and x.dtype in dense
            and fits(w13, w13_scale) and fits(w2, w2_scale) and library() is not None)


# the fp32 entry's weight formats (csrc/expert_gemv.c: W_F32, W_BF16, W_I8)
_W_FORMAT = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


class Groups:
    """The active experts of one layer as the kernel takes them: (start row, row count, weight slot)."""

    def __init__(self, counts: list[int]):
        act = [(e, n) for e, n in enumerate(counts) if n]
        self.experts = torch.tensor([e for e, _ in act], dtype=torch.int64)
        self.count = torch.tensor([n for _, n in act], dtype=torch.int64)
        self.start = torch.cumsum(self.count, 0) - self.count
        self.rows = int(sum(counts))
        self.max_count = max(counts, default=0)

    @classmethod
    def of(cls, experts: torch.Tensor, start: torch.Tensor, count: torch.Tensor, rows: int, max_count: int):
        g = cls.__new__(cls)
        g.experts, g.start, g.count, g.rows, g.max_count = experts, start, count, rows, max_count
        return g


def group(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, n_experts: int, lib=None):
    """``reference._pairs_by_expert`` for the kernel, in one C call (``csrc/moe_ops.c``): the valid
    (token, slot) pairs sorted by expert, stably, as (``Groups``, pair_idx, x_sorted, w_sorted in x's
    dtype); None if no slot is valid (-1: another rank's). The same pairs in the same order as the torch
    ops, without their ~9 dispatches and the Python loop over the experts."""
    lib = lib or library()
    T, K = topk_ids_TK.shape
    ids = topk_ids_TK.to(torch.int64).contiguous()
    x = x_TD.contiguous()
    w = topk_weights_TK.to(x.dtype).contiguous()
    E, TK, D = n_experts, T * K, x.shape[1]
    i64 = torch.empty(3 * E + E + TK + 2, dtype=torch.int64)  # expert, start, count, scratch, pair_idx, P / max
    x_sorted = torch.empty(TK, D, dtype=x.dtype)
    w_sorted = torch.empty(TK, dtype=x.dtype)
    base, es = i64.data_ptr(), 8
    n = lib.moe_group(ids.data_ptr(), T, K, E, x.data_ptr(), D * x.element_size(), w.data_ptr(), w.element_size(),
                      base + 3 * E * es, base, base + E * es, base + 2 * E * es, base + 4 * E * es,
                      x_sorted.data_ptr(), w_sorted.data_ptr(), base + (4 * E + TK) * es,
                      base + (4 * E + TK + 1) * es)
    if n < 0:
        raise ValueError(f"routed expert ids out of range: the layer has {E} experts, ids must be in [-1, {E})")
    P, mx = i64[4 * E + TK:].tolist()
    if P == 0:
        return None
    groups = Groups.of(i64[:n], i64[E:E + n], i64[2 * E:2 * E + n], P, mx)
    return groups, i64[4 * E:4 * E + P], x_sorted[:P], w_sorted[:P]


def grouped_gemv(x_PK: torch.Tensor, groups: Groups, w_ENK: torch.Tensor, lib=None,
                 scale_EN: torch.Tensor | None = None) -> torch.Tensor:
    """``out[p] = x[p] @ W[e(p)].T`` in fp32 for rows sorted by expert (``groups``); ``w_ENK`` fp32 or
    bf16, contiguous, or int8 with its bf16 row scales ``scale_EN`` (W = w * scale[:, None]: each row's
    sum over k is scaled once; activations in fp32, bf16 ones widened exactly). ``lib``: another build
    of the kernel (tests build the AVX2 code path)."""
    lib = lib or library()
    assert lib is not None and w_ENK.is_contiguous() and w_ENK.dim() == 3
    int8 = w_ENK.dtype == torch.int8
    assert int8 == (scale_EN is not None), "int8 weights take their row scales, other formats none"
    P, K = x_PK.shape
    assert P == groups.rows and w_ENK.shape[2] == K, (x_PK.shape, groups.rows, w_ENK.shape)
    N = w_ENK.shape[1]
    out = torch.empty(P, N, dtype=torch.float32)
    if x_PK.dtype == w_ENK.dtype == torch.bfloat16 and has_bf16_dot(lib) and BF16_DOT.on():
        # bf16 compute: the CPU's bf16 dot product takes both as they are (exact products, fp32 sums)
        x = x_PK.contiguous()
        scratch = torch.empty(P, -(-K // 32) * 32, dtype=torch.bfloat16)
        lib.grouped_gemv_bf16(x.data_ptr(), K, groups.start.data_ptr(), groups.count.data_ptr(),
                              groups.experts.data_ptr(), groups.experts.numel(), w_ENK.data_ptr(), N,
                              out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
        return out
    if (int8 and x_PK.dtype == torch.bfloat16 and K % 64 == 0 and has_i8_dot(lib) and BF16_DOT.on()
            and I8_DOT.on()):
        # int8 codes looked up as bf16 (exact) and through the bf16 dot product with the activations as
        # they are: exact products, fp32 sums, each row's sum scaled once
        x = x_PK.contiguous()
        scratch = torch.empty(P, K, dtype=torch.bfloat16)
        lib.grouped_gemv_i8bf16(x.data_ptr(), K, groups.start.data_ptr(), groups.count.data_ptr(),
                                groups.experts.data_ptr(), groups.experts.numel(), w_ENK.data_ptr(),
                                scale_EN.data_ptr(), N, out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
        return out
    x = x_PK.to(torch.float32).contiguous()
    scratch = torch.empty(P, -(-K // MAX_LANES) * MAX_LANES, dtype=torch.float32)
    lib.grouped_gemv(x.data_ptr(), K, groups.start.data_ptr(), groups.count.data_ptr(), groups.experts.data_ptr(),
                     groups.experts.numel(), w_ENK.data_ptr(), _W_FORMAT[w_ENK.dtype],
                     scale_EN.data_ptr() if int8 else None, N, out.data_ptr(), scratch.data_ptr(),
                     torch.get_num_threads())
    return out


def swiglu(h_P2F: torch.Tensor, dtype: torch.dtype, lib=None) -> torch.Tensor:
    """SwiGLU of the first product's fp32 output [P, 2F] (gate | up) in the compute dtype ``dtype``, with
    the roundings of ``reference.moe_experts_inference`` (``csrc/moe_ops.c``)."""
    lib = lib or library()
    P, F2 = h_P2F.shape
    h = h_P2F.contiguous()
    a = torch.empty(P, F2 // 2, dtype=dtype)
    lib.moe_swiglu(h.data_ptr(), P, F2 // 2, int(dtype == torch.bfloat16), a.data_ptr())
    return a


def combine(y_QD: torch.Tensor, w_Q: torch.Tensor, pair_idx_Q: torch.Tensor, num_tokens: int, top_k: int,
            lib=None) -> torch.Tensor:
    """``reference.combine_pairs`` of the second product's fp32 output rounded to ``w_Q``'s dtype (the
    compute dtype) and weighted: [T, D] in that dtype (``csrc/moe_ops.c``)."""
    lib = lib or library()
    Q, D = y_QD.shape
    dtype = w_Q.dtype
    y, w, idx = y_QD.contiguous(), w_Q.contiguous(), pair_idx_Q.to(torch.int64).contiguous()
    out = torch.empty(num_tokens, D, dtype=dtype)
    slot = torch.empty(num_tokens * top_k, dtype=torch.int64)
    lib.moe_combine(y.data_ptr(), w.data_ptr(), idx.data_ptr(), Q, num_tokens, top_k, D,
                    int(dtype == torch.bfloat16), slot.data_ptr(), out.data_ptr())
    return out


def ep_pack(x_TD: torch.Tensor, ids_TK: torch.Tensor, n_routed: int, world: int, owner_E: torch.Tensor,
            copies_EC: torch.Tensor | None = None, ncopies_E: torch.Tensor | None = None,
            counts_out: torch.Tensor | None = None, lib=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's (token, slot) pairs packed for the expert-parallel all-to-all in one C call
    (``csrc/moe_ops.c``), as ``model.dispatch.AllToAllDispatcher``'s torch ops do it: (send [P, D + c],
    order_P, counts_W). Pairs are ordered by the rank of their expert (``owner_E``, or copy ``p mod
    copies`` of a replicated one, ``copies_EC`` / ``ncopies_E``), stably; send row q is token
    ``order[q] // K``'s row of ``x_TD`` followed by the pair's expert id's 8 bytes as c columns of x's
    dtype (fp32 or bf16); ``counts_W[r]``: the pairs for rank r (int64; written into ``counts_out``, a
    contiguous int64 [W], when given)."""
    lib = lib or library()
    T, K = ids_TK.shape
    x = x_TD.contiguous()
    ids = ids_TK.to(torch.int64).contiguous()
    D, es = x.shape[1], x.element_size()
    c = 8 // es
    P = T * K
    send = torch.empty(P, D + c, dtype=x.dtype)
    i64 = torch.empty(2 * P + world, dtype=torch.int64)  # order, dest, pos
    base = i64.data_ptr()
    counts = torch.empty(world, dtype=torch.int64) if counts_out is None else counts_out
    assert counts.dtype == torch.int64 and counts.shape == (world,) and counts.is_contiguous()
    owner = owner_E.to(torch.int64).contiguous()
    copies = ncopies = None
    width = 0
    if copies_EC is not None:
        copies, ncopies = copies_EC.to(torch.int64).contiguous(), ncopies_E.to(torch.int64).contiguous()
        width = copies.shape[1]
    rc = lib.ep_pack(ids.data_ptr(), T, K, n_routed, owner.data_ptr(), None if copies is None else copies.data_ptr(),
                     None if ncopies is None else ncopies.data_ptr(), width, world, x.data_ptr(), D * es,
                     send.data_ptr(), (D + c) * es, base, counts.data_ptr(), base + 2 * P * 8, base + P * 8)
    if rc < 0:
        raise ValueError(f"expert ids must be non-negative and their owners in [0, {world}): ids in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return send, i64[:P], counts


def ep_combine(back_PD: torch.Tensor, weights_TK: torch.Tensor, order_P: torch.Tensor, lib=None) -> torch.Tensor:
    """The origin's combine of expert parallelism in one C call (``csrc/moe_ops.c``): each pair's
    returned row (``back_PD``, in packed order, the compute dtype; a column slice of a wider buffer is
    fine) times its routing weight in the compute dtype, each token's slots summed in fp32 in slot
    order, rounded: ``reference.combine_pairs(back_PD * weights[order], order, T, K)``, bit for bit."""
    lib = lib or library()
    T, K = weights_TK.shape
    P, D = back_PD.shape
    assert P == T * K and back_PD.stride(1) == 1 and back_PD.dtype in (torch.float32, torch.bfloat16), \
        (back_PD.shape, back_PD.stride(), back_PD.dtype, T, K)
    w = weights_TK.to(torch.float32).contiguous()
    order = order_P.to(torch.int64).contiguous()
    out = torch.empty(T, D, dtype=back_PD.dtype)
    slot = torch.empty(P, dtype=torch.int64)
    lib.ep_combine(back_PD.data_ptr(), back_PD.stride(0), w.data_ptr(), order.data_ptr(), T, K, D,
                   int(back_PD.dtype == torch.bfloat16), slot.data_ptr(), out.data_ptr())
    return out
