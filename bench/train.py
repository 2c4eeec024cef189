"""Fine-tuning benchmark: framework overhead and ESFT vs full memory, on the embedded tiny model.

    python bench/train.py [--steps 15] [--append docs/benchmarks.md]   # from the repository root

Throughput, side by side in one run on the same model, data and batches (full fine-tuning, one
worker, batch_size x seq_len tokens per step, median step time over ``--steps`` steps, the first
two dropped as warm-up):
  1. plain PyTorch: a hand-written loop (torch AdamW on every parameter, the same CE + MTP loss and
     the same autograd-friendly expert path as the job), no DeepSpeed, no Ray;
  2. ``train_loop`` in one process (DeepSpeed ZeRO-1 for dense + AdamW for experts), no Ray;
  3. the Ray Train job with 1 worker (``TorchTrainer``, Ray Data input, checkpoints off).
The goal is 3 >= 0.75 x 1. Memory: trainable parameters and optimizer state of ESFT vs full, measured
from the optimizers of one-process runs. CPU numbers on a shared machine: read the ratios.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _job_yaml(tmp: Path, base: Path, mode: str, steps: int, out: str) -> Path:
    path = tmp / f"{mode}-{out}.yaml"
    path.write_text(f"""train:
  jobs:
    b:
      base_model: {base}
      dataset: {{path: {ROOT / 'data/demo_domain.jsonl'}, eval_fraction: 0.1}}
      mode: {mode}
      esft: {{scoring: token, score_tokens: 1536}}
      lr: 1.0e-3
      steps: {steps}
      batch_size: 4
      seq_len: 384
      workers: 1
      zero_stage: 1
      mtp_loss_weight: 0.1
      checkpoint_every: 0
      worker_resources: {{cpu: 1}}
      output_dir: {tmp / out}
""")
    return path


def _median_tok_s(out_dir: Path, skip: int = 2) -> float:
    rows = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[skip:])


def plain_loop(base: Path, steps: int, batch: int, seq_len: int, mtp_w: float) -> float:
    """Full fine-tuning in the plainest PyTorch: returns median tokens/s."""
    import torch
    import torch.nn.functional as F

    from expertpool.jobs.data import local_rows
    from expertpool.jobs.esft import TrainDispatcher, TrainExperts
    from expertpool.model.checkpoint import load_checkpoint
    from expertpool.model.dispatch import LocalDispatcher

    train, _ = local_rows(ROOT / "data/demo_domain.jsonl", "jsonl", "messages", base, seq_len, 0.1)
    model = load_checkpoint(base, dtype=torch.float32, with_mtp=True)
    model.set_dispatcher(TrainDispatcher(LocalDispatcher(), {id(m.experts): TrainExperts(m.experts)
                                                             for m in model.moe_layers()}))
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model.train()
    n = len(train["input_ids"]) // batch
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        i = (step % n) * batch
        ids = torch.as_tensor(train["input_ids"][i:i + batch])
        mask = torch.as_tensor(train["loss_mask"][i:i + batch]).float()
        hidden = model.hidden_states(ids)
        logits = model.lm_head(hidden)
        m = mask[:, 1:]
        loss = (F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
                * m.flatten()).sum() / m.sum()
        ml = model.mtp_logits(hidden, ids)[:, :-1]
        m2 = mask[:, 2:]
        loss = loss + mtp_w * (F.cross_entropy(ml.flatten(0, 1), ids[:, 2:].flatten(), reduction="none")
                               * m2.flatten()).sum() / m2.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(batch * seq_len / t for t in times[2:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fine-tuning throughput (Ray Train vs plain PyTorch) and ESFT vs "
                                 "full memory.")
    ap.add_argument("--steps", type=int, default=15, help="optimizer steps per measured run (default: %(default)s)")
    ap.add_argument("--append", default=None, help="markdown file to append the table to (e.g. docs/benchmarks.md)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("EXPERTPOOL_CACHE", tempfile.mkdtemp(prefix="expertpool-bench-"))
    import ray
    import torch

    from expertpool.jobs import finetune
    from expertpool.model.embedded import ensure_embedded_model

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the plain loop gets what a 1-CPU Ray worker and train_loop get
    base = ensure_embedded_model()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    plain = plain_loop(base, a.steps, 4, 384, 0.1)

    full_local = finetune.run_local(finetune.prepare(str(_job_yaml(tmp, base, "full", a.steps, "fl")), "b"))
    one_proc = _median_tok_s(tmp / "fl")
    esft_local = finetune.run_local(finetune.prepare(str(_job_yaml(tmp, base, "esft", a.steps, "el")), "b"))

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    t0 = time.perf_counter()
    finetune.run_ray(finetune.prepare(str(_job_yaml(tmp, base, "full", a.steps, "fr")), "b"))
    ray_wall = time.perf_counter() - t0
    ray.shutdown()
    ray_tok = _median_tok_s(tmp / "fr")

    cmd = "python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    mib = 1 / 2 ** 20
    lines = [
        "## Fine-tuning", "",
        f"`{cmd}` on {date}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"torch {torch.__version__}, ray {ray.__version__}. Embedded tiny model (256 routed experts, top-8, "
        f"hidden 64), full fine-tuning, batch 4 x 384 tokens, median of steps 3..{a.steps}.", "",
        "| run | tokens/s | vs plain |", "|---|---:|---:|",
        f"| plain PyTorch loop (AdamW, no DeepSpeed, no Ray) | {plain:.0f} | 1.00 |",
        f"| `train_loop` in one process (DeepSpeed ZeRO-1 dense + AdamW experts) | {one_proc:.0f} | "
        f"{one_proc / plain:.2f} |",
        f"| Ray Train job, 1 worker (`TorchTrainer` + Ray Data) | {ray_tok:.0f} | {ray_tok / plain:.2f} |", "",
        f"Ray Train job wall time including Ray Data preprocessing and worker start: {ray_wall:.0f} s for "
        f"{a.steps} steps.", "",
        "| mode | trainable params | optimizer state (rank 0) |", "|---|---:|---:|",
        f"| full | {full_local['trainable_params']:,} | {full_local['optimizer_state_bytes_rank0'] * mib:.1f} MiB |",
        f"| ESFT (token, p=0.2: {sum(esft_local['experts_selected'].values())} experts) | "
        f"{esft_local['trainable_params']:,} | {esft_local['optimizer_state_bytes_rank0'] * mib:.2f} MiB |", "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.append:
        with open(a.append, "a") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
