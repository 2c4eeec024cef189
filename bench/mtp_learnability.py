"""Can bench-mini's MTP module learn the model's own greedy next-next token? (in process, float32)

Issue 12's goal, draft acceptance >= 0.7 on bench-mini, needs an MTP module that predicts the base's
greedy token after token i+1 from h_i and token i+1. bench-mini has random weights. This script
measures whether that function can be learned: it generates ``--sequences`` greedy continuations
(``jobs.distill.GreedyContinuations``, as ``mode: mtp`` does), trains the MTP module on them (Adam,
routing frozen, as ``mode: mtp`` does) and reports the agreement with the base on held-out
continuations, where a draft is verified in serving. It also reports two copy rules on the same
held-out continuations: "token i+2 = token i+1" and "token i+2 = token i" (random models fall into
loops), and either of them, which bounds what a module that only learned to copy could reach.

    python bench/mtp_learnability.py [--sequences 128] [--steps 100] [--lr 3e-3] [--batch 16]
"""

import argparse
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=128, help="training continuations (default %(default)s)")
    ap.add_argument("--held-out", type=int, default=32, help="held-out continuations (default %(default)s)")
    ap.add_argument("--steps", type=int, default=100, help="training steps (default %(default)s)")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (default %(default)s)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default %(default)s)")
    ap.add_argument("--seq-len", type=int, default=96, help="prompt + continuation tokens (default %(default)s)")
    a = ap.parse_args()

    from expertpool.jobs.distill import GreedyContinuations
    from expertpool.model.args import preset
    from expertpool.model.transformer import init_random

    torch.manual_seed(0)
    P, S = a.prompt, a.seq_len
    model = init_random(preset("bench-mini").replace(num_nextn_predict_layers=1), seed=0)
    gen = GreedyContinuations(model, P, S, "cpu")

    def continuations(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([gen(torch.randint(5, 2000, (min(32, n - i), S), generator=g)) for i in range(0, n, 32)])

    t0 = time.perf_counter()
    train, held = continuations(a.sequences, 1), continuations(a.held_out, 99)
    print(f"generated {a.sequences} + {a.held_out} continuations of {S - P} tokens in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    with torch.no_grad():
        def targets(ids):
            h = model.hidden_states(ids)
            return h, model.lm_head(h)[:, 1:].argmax(-1)  # row i: the base's choice after token i+1
        h_train, t_train = targets(train)
        h_held, t_held = targets(held)
    cont = slice(P - 1, None)  # rows whose target is a generated token (drafts are verified there)

    def agreement() -> float:
        with torch.no_grad():
            return (model.mtp_logits(h_held, held).argmax(-1) == t_held)[:, cont].float().mean().item()

    gen_part = held[:, P:]
    same = (gen_part[:, 2:] == gen_part[:, 1:-1])
    back2 = (gen_part[:, 2:] == gen_part[:, :-2])
    print(f"copy rules on the held-out continuations: token i+2 = token i+1 {same.float().mean():.3f}, "
          f"= token i {back2.float().mean():.3f}, either {(same | back2).float().mean():.3f}", flush=True)

    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.model.mtp[0].named_parameters() if ".gate." not in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    print(f"step 0: held-out agreement {agreement():.4f}", flush=True)
    g = torch.Generator().manual_seed(2)
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(train), (a.batch,), generator=g)
        loss = F.cross_entropy(model.mtp_logits(h_train[idx], train[idx]).flatten(0, 1), t_train[idx].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == a.steps:
            print(f"step {step}: train loss {loss.item():.3f}, held-out agreement {agreement():.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
