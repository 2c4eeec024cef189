"""Decode-step breakdown (issues 14 and 16): where one decode step of the in-process engine goes.

Builds bench-mini (random weights, or ``--model DIR``), admits ``--batch`` requests with 32-token
prompts (``--prompt-len``: longer contexts, where the decode attention grows), runs until every
sequence decodes, then times ``--steps`` decode steps of the engine
(``EngineCore.step``: scheduling, the ``ModelRunner`` step the actors also run, sampling). Module
hooks split the step into attention, dense MLP, MoE (router, routed experts, shared expert, the
rest: dispatch and combine), lm_head, the rest of the forward (embedding, norms, residuals), the
runner outside the forward (batch metadata, sampling) and the scheduler. Medians over the steps,
with the spread. ``--count`` adds the ops and host reads of one decode step (``kernels.counting``),
per MoE layer. ``--spec-tokens K`` runs MTP speculative decoding (bench-mini gets one MTP module,
random: its drafts are rarely accepted, so this times what a speculative step costs, verification
and drafting, and its tokens per step show the acceptance).

    python bench/decode_step.py [--dtype auto|float32|bfloat16] [--weight-dtype ...] [--threads N]
                                [--batch 16] [--steps 30] [--prompt-len 32] [--count] [--spec-tokens K]
                                [--model DIR] [--json]

Hooks cost a few microseconds per module call; the step total is measured without them in a second
pass, and both are printed.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402  (bench/common.py: cpu flags)
import expertpool  # noqa: E402,F401  (expertpool before torch, per house style)
import torch  # noqa: E402

PROMPT = 32


class Timer:
    """Wall time per category from forward pre/post hooks (CPU: ops are synchronous)."""

    def __init__(self):
        self.acc: dict[str, float] = {}
        self._t0: dict[int, float] = {}
        self.paused = False  # inside a wrapped call that counts as a whole (``wrap(whole=True)``)

    def hook(self, module, name):
        def pre(mod, args):
            if not self.paused:
                self._t0[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            if not self.paused:
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - self._t0.pop(id(mod))
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def wrap(self, obj, attr, name, whole: bool = False):
        """Time calls of ``obj.attr`` under ``name``; ``whole``: module hooks inside it do not count
        (the MTP draft calls the shared lm_head, which is the main model's row otherwise)."""
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            self.paused = whole
            try:
                return fn(*a, **k)
            finally:
                self.paused = False
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - t
        setattr(obj, attr, timed)
        return lambda: setattr(obj, attr, fn)


def build(model_dir, dtype, weight_dtype, batch, max_new, spec_tokens=0, prompt_len=PROMPT):
    from expertpool.model.sampling import SamplingParams
    from expertpool.platform.engine import local_engine
    from expertpool.platform.worker import load_model
    model = load_model(model_dir, dtype, weight_dtype, with_mtp=spec_tokens > 0)  # as a serving actor loads it
    core = local_engine(model, max_batch_size=batch, max_seq_len=prompt_len + max_new + 8,
                        # long prompts prefill in chunks of up to 256 tokens a sequence, not one huge step
                        max_num_batched_tokens=batch * min(prompt_len, 256), spec_tokens=spec_tokens)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 2000, (batch, prompt_len), generator=g).tolist()
    sp = SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, sp)
    while any(s.num_cached < len(s.tokens) - 1 for s in core.running) or core.waiting:
        core.step()  # prefill
    return model, core


def categories(model, timer):
    from expertpool.model.moe import MoE
    handles = []
    for layer in model.model.layers:
        handles += timer.hook(layer.self_attn, "attention")
        if isinstance(layer.mlp, MoE):
            handles += timer.hook(layer.mlp, "moe")
            handles += timer.hook(layer.mlp.gate, "moe.router")
            handles += timer.hook(layer.mlp.experts, "moe.experts")
            if layer.mlp.shared_experts is not None:
                handles += timer.hook(layer.mlp.shared_experts, "moe.shared")
        else:
            handles += timer.hook(layer.mlp, "dense_mlp")
    handles += timer.hook(model.lm_head, "lm_head")
    return handles


def run(a) -> dict:
    from expertpool.model.checkpoint import DTYPES  # noqa: F401
    torch.set_num_threads(a.threads)
    dtype = a.dtype
    if dtype == "auto":
        from expertpool.model.dtype import resolve_dtype
        dtype = resolve_dtype("auto", "cpu").dtype
    model, core = build(a.model, dtype, a.weight_dtype, a.batch, a.steps * 2 * (1 + a.spec_tokens) + 8,
                        a.spec_tokens, a.prompt_len)
    runner = core.executor.runner

    # pass 1: step totals without hooks
    totals, tokens = [], 0
    for _ in range(a.steps):
        t = time.perf_counter()
        tokens += sum(len(ev.token_ids) for ev in core.step().values())
        totals.append(time.perf_counter() - t)
    # pass 2: with hooks
    timer = Timer()
    handles = categories(model, timer)
    undo = [timer.wrap(runner, "step", "runner.step"), timer.wrap(model, "forward_batch", "forward")]
    if a.spec_tokens:
        undo.append(timer.wrap(runner, "_draft", "draft", whole=True))
    per_step: list[dict[str, float]] = []
    for _ in range(a.steps):
        timer.acc = {}
        t = time.perf_counter()
        core.step()
        acc = dict(timer.acc)
        acc["step"] = time.perf_counter() - t
        per_step.append(acc)
    for h in handles:
        h.remove()
    for u in undo:
        u()

    def med(key):
        return statistics.median(s.get(key, 0.0) for s in per_step) * 1e3
    rows = {
        "attention": med("attention"),
        "dense MLP": med("dense_mlp"),
        "MoE router": med("moe.router"),
        "MoE routed experts": med("moe.experts"),
        "MoE shared expert": med("moe.shared"),
        "MoE dispatch/combine/rest": med("moe") - med("moe.router") - med("moe.experts") - med("moe.shared"),
        "lm_head": med("lm_head"),
        "forward rest (embed, norms, residuals)": med("forward") - sum(
            med(k) for k in ("attention", "dense_mlp", "moe", "lm_head")),
        "MTP draft (module and head, per depth)": med("draft"),
        "runner outside forward (metadata, sampling)": med("runner.step") - med("forward") - med("draft"),
        "scheduler (EngineCore)": med("step") - med("runner.step"),
    }
    out = {"dtype": dtype, "weight_dtype": a.weight_dtype, "threads": a.threads, "batch": a.batch,
           "prompt_len": a.prompt_len,
           "step_ms_median": statistics.median(totals) * 1e3, "step_ms_min": min(totals) * 1e3,
           "step_ms_max": max(totals) * 1e3, "hooked_step_ms_median": med("step"), "rows": rows,
           "spec_tokens": a.spec_tokens, "tokens_per_step": tokens / a.steps, "tok_s": tokens / sum(totals)}
    if a.count:
        from expertpool.kernels.counting import OpCounter
        with OpCounter() as c:
            core.step()
        n_moe = len(model.moe_layers())
        out["count"] = {"ops": c.ops, "host_reads": c.host_reads, "moe_layers": n_moe, "summary": c.summary(20)}
        per_layer = []
        for moe in model.moe_layers():
            h = []
            cm = OpCounter()
            h.append(moe.register_forward_pre_hook(lambda m, args: (cm.__enter__(), None)[1]))
            h.append(moe.register_forward_hook(lambda m, args, o: cm.__exit__(None, None, None)))
            core.step()
            for x in h:
                x.remove()
            per_layer.append((cm.ops, cm.host_reads))
            break
        out["count"]["per_moe_layer"] = {"ops": per_layer[0][0], "host_reads": per_layer[0][1]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: bench-mini random weights in a temp dir)")
    ap.add_argument("--dtype", default="auto", help="compute dtype: auto, float32 or bfloat16 (default auto)")
    ap.add_argument("--weight-dtype", default=None, help="resident weight format (fp32, bf16, int8, w8a8, fp8; "
                    "default: as stored)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--batch", type=int, default=16, help="decoding sequences (default 16)")
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps (default 30)")
    ap.add_argument("--prompt-len", type=int, default=PROMPT, help="tokens per prompt: the context the timed "
                    "steps start from (default 32)")
    ap.add_argument("--count", action="store_true", help="also count ops and host reads of one step")
    ap.add_argument("--spec-tokens", type=int, default=0, help="MTP speculative decoding with this many drafts "
                    "per step (bench-mini gets a random MTP module; default 0: off)")
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    a = ap.parse_args()
    tmp = None
    if a.model is None:
        from expertpool.model.embedded import init_model
        tmp = tempfile.TemporaryDirectory()
        a.model = tmp.name
        init_model("bench-mini", a.model, seed=0, mtp_layers=1 if a.spec_tokens else 0)
    out = run(a)
    out["cpu"] = common.cpu_kind()
    if a.json:
        print(json.dumps(out))
        return
    print(f"CPU: {common.cpu_flags_line()}")
    print(f"bench-mini decode step, batch {a.batch}, {a.prompt_len}-token prompts, compute {out['dtype']}, "
          f"weights {a.weight_dtype or 'as stored'}, "
          f"{a.threads} threads: median {out['step_ms_median']:.1f} ms (min {out['step_ms_min']:.1f}, "
          f"max {out['step_ms_max']:.1f}) -> {out['tok_s']:.0f} tok/s ({out['tokens_per_step']:.2f} tokens per step"
          f"{f', {a.spec_tokens} MTP drafts' if a.spec_tokens else ''}); "
          f"with hooks {out['hooked_step_ms_median']:.1f} ms")
    for k, v in out["rows"].items():
        print(f"  {k:45s} {v:7.2f} ms")
    if a.count:
        c = out["count"]
        print(f"one decode step: {c['summary']}")
        print(f"per MoE layer: {c['per_moe_layer']['ops']} ops, {c['per_moe_layer']['host_reads']} host reads")


if __name__ == "__main__":
    main()
