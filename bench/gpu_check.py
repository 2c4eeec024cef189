"""The one-command device check (issue 16): everything that needs a GPU, in under 8 minutes, one table.

Sections, each timed and bounded (a section that fails or overruns is recorded and the next runs):
1. the GPU tests: ``pytest -m gpu`` over tests/kernels and tests/platform (Triton kernels on
   DeepSeek-V3 shapes; bench-mini FP8 through the engine: greedy against the CPU run, CUDA graphs
   against eager, seeded sampling);
2. bench-mini FP8 through the in-process engine at temperature 0 and 1, 16 streams x 64 tokens:
   output tok/s, eager and with CUDA-graphed decode;
3. a profile of one decode step at 16 sequences, eager and graphed: step time (CUDA events), kernels
   the device ran and launches the host made (torch.profiler), host reads (``kernels.counting``);
4. serving over HTTP at 1 and 16 streams (bench/serve.py: one GPU actor, FP8 bench-mini);
5. the kernel benchmark (bench/kernels.py --quick).
Prints the table and writes it (with the raw numbers as JSON) under ``--out`` (``$OUT`` if set).

    python bench/gpu_check.py [--out DIR] [--budget-s 470] [--skip tests,serve,...]
    python bench/gpu_check.py --cpu-dry-run     # the plumbing on CPU (bf16 weights, tiny shapes)

Nothing is appended to docs/benchmarks.md automatically: record the table there with the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))

import expertpool  # noqa: E402,F401  (expertpool before torch, per house style)
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("tests", "engine", "profile", "serve", "kernels")


class Check:
    def __init__(self, budget_s: float, out_dir: str):
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.out_dir = out_dir
        self.rows: list[tuple[str, str, str]] = []  # (section, result, seconds)
        self.raw: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def run(self, name: str, fn) -> None:
        if self.left() < 20:
            self.rows.append((name, "skipped: time budget spent", "0"))
            return
        t = time.monotonic()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - a failed section is a result to record, then the next runs
            result = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            self.raw[name + "_traceback"] = traceback.format_exc()
        self.rows.append((name, result, f"{time.monotonic() - t:.0f}"))
        print(f"[{name}] {result}", flush=True)

    def table(self) -> str:
        lines = ["| section | result | s |", "|---|---|---:|"]
        lines += [f"| {n} | {r} | {s} |" for n, r, s in self.rows]
        return "\n".join(lines)


def sub(cmd: list[str], timeout: float, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, timeout), cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO, **(env or {})))


def section_tests(c: Check) -> str:
    p = sub([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/kernels",
             "tests/platform/test_gpu_engine.py"], min(240, c.left() - 10))
    c.raw["tests_output"] = p.stdout[-6000:] + p.stderr[-2000:]
    last = (p.stdout.strip().splitlines() or ["no output"])[-1]
    return ("ok: " if p.returncode == 0 else "FAILED: ") + last


def _engine(model, device, graphs, buckets):
    from expertpool.platform.scheduler import EngineCore
    from expertpool.platform.executor import LocalExecutor
    from expertpool.platform.worker import ModelRunner
    runner = ModelRunner(model, num_blocks=512, block_size=16, device=device, scratch_blocks=16)
    how = runner.enable_decode_graphs(buckets, max_seq_len=256) if graphs else "eager"
    core = EngineCore(LocalExecutor(runner), num_blocks=512, block_size=16, max_batch_size=max(buckets),
                      max_seq_len=256, max_num_batched_tokens=512, eos_token_id=None,
                      vocab_size=model.args.vocab_size)
    return core, how


def section_engine(c: Check, model, device) -> str:
    from expertpool.model.sampling import SamplingParams
    from expertpool.platform.engine import generate
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 2000, (16, 32), generator=g).tolist()
    out = {}
    for graphs in (False, True):
        core, how = _engine(model, device, graphs, [1, 2, 4, 8, 16])
        for temp in (0.0, 1.0):
            sp = SamplingParams(max_tokens=64, temperature=temp, seed=7, ignore_eos=True)
            generate(core, prompts[:2], SamplingParams(max_tokens=4, temperature=temp, seed=7, ignore_eos=True))
            if device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            toks = generate(core, prompts, sp)
            if device != "cpu":
                torch.cuda.synchronize()
            out[f"{'graphs' if graphs else 'eager'} T={temp:g}"] = sum(map(len, toks)) / (time.perf_counter() - t)
    c.raw["engine_tok_s"] = out
    return ", ".join(f"{k} {v:.0f} tok/s" for k, v in out.items())


def section_profile(c: Check, model, device) -> str:
    from torch.profiler import ProfilerActivity, profile

    from expertpool.kernels.counting import OpCounter
    from expertpool.model.sampling import SamplingParams
    cuda = device != "cpu"
    res = {}
    for graphs in (False, True):
        core, how = _engine(model, device, graphs, [16])
        for i in range(16):
            core.add_request(f"p{graphs}{i}", list(range(5, 37)),
                             SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        while any(s.num_cached < len(s.tokens) - 1 for s in core.running) or core.waiting:
            core.step()
        for _ in range(3):
            core.step()
        times = []
        for _ in range(10):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            core.step()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            core.step()
            if cuda:
                torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        kernels = sum(1 for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        launches = sum(1 for n in names if n in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                 "cudaLaunchKernelExC", "cudaGraphLaunch"))
        syncs = sum(1 for n in names if n in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync"))
        with OpCounter() as cnt:
            core.step()
        res["graphs" if graphs else "eager"] = {
            "step_ms_median": statistics.median(times), "step_ms_min": min(times), "device_kernels": kernels,
            "host_launch_calls": launches, "runtime_sync_or_copy_calls": syncs, "ops": cnt.ops,
            "host_reads": cnt.host_reads, "decode": how}
    c.raw["profile"] = res
    return "; ".join(f"{k}: step {v['step_ms_median']:.2f} ms (min {v['step_ms_min']:.2f}), {v['device_kernels']} "
                     f"kernels, {v['host_launch_calls']} host launches, {v['ops']} torch ops, {v['host_reads']} host "
                     f"reads" for k, v in res.items())


def section_serve(c: Check, cpu_dry_run: bool) -> str:
    cmd = [sys.executable, "bench/serve.py", "--actors", "1", "--actor-cpus", "4", "--levels", "1,16",
           "--rounds", "1", "--skip-hf", "--no-append", "--dtype", "bfloat16"]
    if not cpu_dry_run:
        cmd += ["--gpus", "1", "--fp8"]
    p = sub(cmd, min(200, c.left() - 10))
    c.raw["serve_output"] = p.stdout[-4000:] + p.stderr[-2000:]
    lines = [ln.strip() for ln in p.stdout.splitlines() if "tok/s" in ln]
    return ("ok: " if p.returncode == 0 else "FAILED: ") + " | ".join(lines[-2:])


def section_kernels(c: Check) -> str:
    p = sub([sys.executable, "bench/kernels.py", "--quick", "--no-append"], min(200, c.left() - 10))
    c.raw["kernels_output"] = p.stdout[-8000:] + p.stderr[-2000:]
    return ("ok: " if p.returncode == 0 else f"exit {p.returncode}: ") + (p.stdout.strip().splitlines() or [""])[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-check-"),
                    help="where gpu_check.md and gpu_check.json go (default $OUT, else a temp dir)")
    ap.add_argument("--budget-s", type=float, default=470, help="stop starting sections after this (default 470)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip, of {SECTIONS}")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the plumbing on CPU (no GPU numbers)")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    os.makedirs(a.out, exist_ok=True)
    c = Check(a.budget_s, a.out)
    device = "cpu" if a.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on the device machine, or pass --cpu-dry-run")
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    if device == "cuda":
        import triton
        free, total = torch.cuda.mem_get_info()
        info.update(triton=triton.__version__, capability=torch.cuda.get_device_capability(),
                    memory_gib=round(total / 2**30, 1))
    c.raw["info"] = info
    print(f"gpu_check: {info}", flush=True)
    model = None
    if {"engine", "profile"} - skip:
        from expertpool.model.checkpoint import load_checkpoint
        from expertpool.model.embedded import init_model
        d = tempfile.mkdtemp(prefix="bench-mini-")
        if a.cpu_dry_run:  # a small stand-in: the plumbing, not the numbers
            from expertpool.model.checkpoint import save_checkpoint
            from expertpool.model.transformer import init_random
            from tests.platform.test_fast_paths import BENCH_MINI_SHAPED
            save_checkpoint(init_random(BENCH_MINI_SHAPED, seed=0, std=0.02), d)
        else:
            init_model("bench-mini", d, fp8=True, seed=0)
        model = load_checkpoint(d, dtype=torch.bfloat16, device=device, with_mtp=False)
    if "tests" not in skip and not a.cpu_dry_run:
        c.run("GPU tests", lambda: section_tests(c))
    if "engine" not in skip:
        c.run("bench-mini FP8, engine, 16 streams x 64 tokens", lambda: section_engine(c, model, device))
    if "profile" not in skip:
        c.run("one decode step at 16 sequences", lambda: section_profile(c, model, device))
    if "serve" not in skip:
        c.run("HTTP serving, 1 and 16 streams", lambda: section_serve(c, a.cpu_dry_run))
    if "kernels" not in skip and not a.cpu_dry_run:
        c.run("kernel benchmark (bench/kernels.py --quick)", lambda: section_kernels(c))
    table = c.table()
    print("\n" + table)
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write(f"gpu_check {time.strftime('%Y-%m-%d %H:%M')} {info}\n\n{table}\n")
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(c.raw, f, indent=1, default=str)
    print(f"written to {a.out}/gpu_check.md and gpu_check.json; total {time.monotonic() - c.t0:.0f} s")


if __name__ == "__main__":
    main()
