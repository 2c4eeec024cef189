"""Generation benchmark: expertpool's in-process engine vs transformers' generate(), each in its fastest dtype.

bench-mini with random weights in a temporary directory; 16 prompts x 32 tokens, 64 new tokens each,
greedy, EOS ignored so every run produces 16 x 64 tokens. Each configuration runs in its own
subprocess (so peak RSS is its own), after one warm-up pass; the configurations run interleaved,
``--reps`` rounds, and each is reported as the median (min..max) of its rounds. Reported: output
tokens/s over the whole generate call (prefill included, same definition for both), and peak RSS.
Our resident weights: "as stored" (bench-mini's checkpoint is bf16; under fp32 compute the routed
experts stay bf16 and the CPU expert kernel widens them, the rest is fp32: what serving and ``dtype:
auto`` run on a CPU without fast bf16), or converted at load (fp32, bf16, int8, fp8).
The fastest configuration of each engine is picked from the measurements (not assumed), and the
headline ratio compares the two fastest. The CPU model and flags are printed and recorded.

    python bench/generate.py [--quick] [--reps 3] [--threads N] [--no-append]
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

B, PROMPT, NEW = 16, 32, 64


def run_one(kind: str, model_dir: str, dtype: str, weight_dtype: str | None, new: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 2000, (B, PROMPT), generator=g)
    from expertpool.model.checkpoint import DTYPES
    tdt = DTYPES[dtype]
    if kind == "ours":
        from expertpool.model.sampling import SamplingParams
        from expertpool.platform.engine import generate, local_engine
        from expertpool.platform.worker import load_model
        # as a serving actor loads it
        model = load_model(model_dir, dtype, None if weight_dtype == AS_STORED else weight_dtype)
        sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

        def gen():
            core = local_engine(model, max_batch_size=B, max_seq_len=PROMPT + new + 1,
                                max_num_batched_tokens=B * PROMPT)
            outs = generate(core, prompts.tolist(), sp)
            return sum(len(o) for o in outs)
    else:
        from transformers import DeepseekV3ForCausalLM
        model = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=tdt).eval()

        def gen():
            with torch.no_grad():
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=0)
            return (out.shape[1] - PROMPT) * B
    gen()  # warm-up
    t = time.perf_counter()
    n = gen()
    dt = time.perf_counter() - t
    # VmHWM: this process's peak resident set (ru_maxrss would carry the parent's peak across exec)
    rss_mb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    return {"tokens": n, "seconds": dt, "tok_s": n / dt, "peak_rss_mb": rss_mb}


AS_STORED = "as stored"  # weight_dtype None: fp32 compute keeps bf16-stored routed experts bf16 (the kernel widens)

CONFIGS = [
    ("ours", "float32", "fp32"),
    ("ours", "float32", AS_STORED),  # what serving and dtype auto run on a CPU without fast bf16
    ("ours", "float32", "bf16"),
    ("ours", "float32", "int8"),
    ("ours", "bfloat16", "bf16"),
    ("ours", "bfloat16", "int8"),
    ("ours", "bfloat16", "fp8"),
    ("transformers", "float32", None),
    ("transformers", "bfloat16", None),
]


def main():
    import statistics
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    import common

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 new tokens instead of 64, one round (smoke test)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds over all configurations (default 3)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per run")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, model_dir, dtype, wd, new, threads = json.loads(a.child)
        print(json.dumps(run_one(kind, model_dir, dtype, wd, new, threads)))
        return
    new = 8 if a.quick else NEW
    reps = 1 if a.quick else a.reps
    flags = common.cpu_flags_line()
    print(f"CPU: {flags}; load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[tuple, list[dict]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as d:
        from expertpool.model.embedded import init_model
        print(f"creating bench-mini (random weights) in {d} ...", flush=True)
        init_model("bench-mini", d, seed=0)
        for rep in range(reps):
            for kind, dtype, wd in CONFIGS:
                out = subprocess.run([sys.executable, __file__, "--child",
                                      json.dumps([kind, d, dtype, wd, new, a.threads])],
                                     capture_output=True, text=True,
                                     env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                if out.returncode:
                    print(out.stderr[-3000:])
                    raise SystemExit(f"{kind} {dtype} failed")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[(kind, dtype, wd)].append(r)
                print(f"  round {rep + 1}: {kind} compute={dtype} weights={wd or dtype}: {r['tok_s']:.1f} tok/s, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    med = {c: statistics.median(r["tok_s"] for r in rs) for c, rs in results.items()}
    best = {k: max((c for c in CONFIGS if c[0] == k), key=med.get) for k in ("ours", "transformers")}
    lines = ["| engine | compute | resident weights | tok/s median (min..max) | vs transformers' fastest | "
             "peak RSS (MB) |", "|---|---|---|---|---|---|"]
    hf_best = med[best["transformers"]]
    for c in CONFIGS:
        k, dt, wd = c
        toks = [r["tok_s"] for r in results[c]]
        mark = " **fastest**" if best[k] == c else ""
        lines.append(f"| {k} | {dt} | {wd or {'float32': 'fp32', 'bfloat16': 'bf16'}[dt]} | {med[c]:.1f} "
                     f"({min(toks):.1f}..{max(toks):.1f}){mark} | {med[c] / hf_best:.2f}x | "
                     f"{statistics.median(r['peak_rss_mb'] for r in results[c]):.0f} |")
    ob, hb = best["ours"], best["transformers"]
    summary = (f"Fastest expertpool ({ob[1]}, {ob[2]} weights) / fastest transformers ({hb[1]}): "
               f"**{med[ob] / med[hb]:.2f}x**.")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + summary)
    if not a.no_append and not a.quick:
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"), "a") as f:
            f.write(f"\n## Generation (bench/generate.py)\n\n{datetime.date.today()}, "
                    f"`python bench/generate.py {' '.join(sys.argv[1:])}`, {platform.machine()}, CPU: {flags}, "
                    f"{os.cpu_count()} CPUs (shared with other work; load average {os.getloadavg()[0]:.2f} at the "
                    f"end), torch {torch.__version__}, {a.threads} threads. bench-mini random weights, {B} prompts x "
                    f"{PROMPT} tokens, {NEW} new tokens each, greedy; output tokens/s over the whole call; "
                    f"{reps} interleaved rounds.\n\n{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
