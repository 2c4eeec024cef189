"""Summarise an engine step trace (``EXPERTPOOL_STEP_TRACE=DIR`` while serving; platform/step_trace.py).

    EXPERTPOOL_STEP_TRACE=/tmp/trace python bench/serve.py --skip-hf --no-append --levels 16
    python bench/step_trace.py /tmp/trace --skip 70

prints, per replica process, where the step loop's time went: decode steps, steps with prompt tokens
and the gaps between a result and the next submission.
"""

import argparse

from expertpool.platform.step_trace import read, steps, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="the trace directory (or one steps-<pid>.jsonl file)")
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out each file's first SKIP steps (a warm-up: bench/serve.py's first request "
                         "runs alone for 64 steps)")
    a = ap.parse_args()
    for i, records in enumerate(read(a.trace)):
        s = summarize(steps(records)[a.skip:])
        if not s["steps"]:
            print(f"file {i}: no steps")
            continue
        print(f"file {i}: {s['steps']} steps over {s['span_s']:.2f} s")
        print("| part | count | time (s) | share | mean (ms) |\n|---|---:|---:|---:|---:|")
        for key, label in (("decode", f"decode steps (mean batch {s['decode']['mean_batch']:.1f})"),
                           ("prompt", "steps with prompt tokens"), ("gap", "result to next submission")):
            part = s[key]
            print(f"| {label} | {part['count']} | {part['seconds']:.2f} | {100 * part['share']:.1f}% | "
                  f"{part['mean_ms']:.2f} |")


if __name__ == "__main__":
    main()
