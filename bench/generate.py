"""Generation benchmark (issue: foundation): expertpool's in-process engine vs transformers' generate().

bench-mini with random weights in a temporary directory; 16 prompts x 32 tokens, 64 new tokens each,
greedy, EOS ignored so every run produces 16 x 64 tokens. Each configuration runs in its own
subprocess (so peak RSS is its own), after one warm-up pass. Reported: output tokens/s over the whole
generate call (prefill included, same definition for both), and peak RSS.

    python bench/generate.py [--quick] [--no-append]
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


def run_one(kind: str, model_dir: str, dtype: str, weight_dtype: str | None, new: int) -> dict:
    import torch
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 2000, (B, PROMPT), generator=g)
    from expertpool.model.checkpoint import DTYPES
    tdt = DTYPES[dtype]
    if kind == "ours":
        from expertpool.model.checkpoint import load_checkpoint
        from expertpool.model.sampling import SamplingParams
        from expertpool.platform.engine import generate, local_engine
        model = load_checkpoint(model_dir, dtype=tdt, weight_dtype=weight_dtype, with_mtp=False)
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


CONFIGS = [
    ("ours", "float32", "fp32"),
    ("ours", "float32", "bf16"),
    ("ours", "float32", "fp8"),
    ("ours", "bfloat16", "bf16"),
    ("ours", "bfloat16", "fp8"),
    ("transformers", "float32", None),
    ("transformers", "bfloat16", None),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 new tokens instead of 64 (smoke test)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to docs/benchmarks.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, model_dir, dtype, wd, new = json.loads(a.child)
        print(json.dumps(run_one(kind, model_dir, dtype, wd, new)))
        return
    new = 8 if a.quick else NEW
    with tempfile.TemporaryDirectory() as d:
        from expertpool.model.embedded import init_model
        print(f"creating bench-mini (random weights) in {d} ...", flush=True)
        init_model("bench-mini", d, seed=0)
        rows = []
        for kind, dtype, wd in CONFIGS:
            print(f"running {kind} compute={dtype} weights={wd or dtype} ...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, d, dtype, wd, new])],
                                 capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(f"{kind} {dtype} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((kind, dtype, wd or {"float32": "fp32", "bfloat16": "bf16"}[dtype], r))
            print(f"  {r['tok_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    hf32 = next(r for k, dt, _, r in rows if k == "transformers" and dt == "float32")["tok_s"]
    best = max(r["tok_s"] for k, _, _, r in rows if k == "ours")
    rss = {wd: r["peak_rss_mb"] for k, dt, wd, r in rows if k == "ours" and dt == "float32"}
    lines = ["| engine | compute | resident weights | tok/s | vs transformers fp32 | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    for k, dt, wd, r in rows:
        lines.append(f"| {k} | {dt} | {wd} | {r['tok_s']:.1f} | {r['tok_s'] / hf32:.2f}x | {r['peak_rss_mb']:.0f} |")
    summary = (f"Best expertpool / transformers fp32: **{best / hf32:.2f}x** (goal >= 2x). "
               f"Peak RSS fp8-resident / bf16-resident: **{rss['fp8'] / rss['bf16']:.2f}** (goal <= 0.6).")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + summary)
    if not a.no_append and not a.quick:
        import torch
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"), "a") as f:
            f.write(f"\n## Generation (bench/generate.py)\n\n{datetime.date.today()}, `python bench/generate.py`, "
                    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} threads. bench-mini random weights, {B} prompts x {PROMPT} tokens, "
                    f"{NEW} new tokens each, greedy; output tokens/s over the whole call.\n\n{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
