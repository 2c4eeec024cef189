"""Training hooks: objects a caller hands to the loop, called at named points (STYLE principle 16).

Fault injection and extra checks reach into a run through these, not through the production path:
``train_loop(plan, data, hooks)`` calls every given hook at each point, in order, on every rank;
with none given (production) it calls nothing. A hook receives the ``train.Trainer`` and may read
any of it (rank, world, plan, model, trainables); a hook that runs a collective must do so on
every rank alike.

Points:
- ``before_step(trainer, step)``: at the top of optimizer step ``step`` (1-based), before its batch
  is read. Fault injection acts here (the tests' hooks, ``tests/jobs/faults.py``).
- ``after_run(trainer, summary)``: after the last step and the final evaluation, before the result
  is written and ``summary.json`` saved; a check adds its fields to ``summary``.

``FrozenCheck`` is the opt-in check of the ESFT invariant (``finetune --check-frozen``).
"""

import torch
import torch.distributed as dist

from expertpool.model.checkpoint import load_checkpoint


class TrainHook:
    """No-op at every point: subclass and override the points you need."""

    def before_step(self, trainer, step: int) -> None:
        """Called at the top of optimizer step ``step``."""

    def after_run(self, trainer, summary: dict) -> None:
        """Called once training and the final evaluation are done; may add fields to ``summary``."""


class FrozenCheck(TrainHook):
    """ESFT: ``summary["frozen_changed"]`` = the tensors, and stacked expert rows, outside the
    selection that differ from the base checkpoint after training (0 expected: only the selected
    experts train). It reloads this rank's share of the base checkpoint, a full base load, so it is
    opt-in. Collective (one all-reduce). Full fine-tuning changes everything: not checked there."""

    def after_run(self, trainer, summary: dict) -> None:
        if trainer.plan.job.mode == "esft":
            summary["frozen_changed"] = frozen_changed(trainer)


@torch.no_grad()
def frozen_changed(trainer) -> int:
    model, selected = trainer.model, trainer.trainables.selected
    ref = load_checkpoint(trainer.base, dtype=torch.float32, experts=trainer.owned if trainer.world > 1 else None,
                          with_mtp=True)
    now = dict(model.named_parameters())
    now.update(dict(model.named_buffers()))
    moes = model.moe_layers()
    layer_of = {name + ".": m.layer_id for name, m in model.named_modules() if any(m is x for x in moes)}
    changed = 0
    for name, t in list(ref.named_parameters()) + list(ref.named_buffers()):
        cur = now[name]
        if name.endswith("experts.w13_weight") or name.endswith("experts.w2_weight"):
            layer = next(v for prefix, v in layer_of.items() if name.startswith(prefix))
            keep = torch.ones(cur.shape[0], dtype=torch.bool)
            if layer in selected:
                keep[selected[layer].local_idx] = False
            changed += int(not torch.equal(cur[keep], t[keep]))
        elif name.endswith("expert_load"):
            continue  # a routing counter, not a weight
        else:
            changed += int(not torch.equal(cur, t))
    total = torch.tensor(changed)
    if trainer.world > 1:
        dist.all_reduce(total)
    return int(total)
