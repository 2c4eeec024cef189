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

EXPERT_ROWS = ("w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv")


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, for any dtype (FP8 compares as bytes: torch.equal has no FP8 kernel on CPU)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize == 1 and a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


class TrainHook:
    """No-op at every point: subclass and override the points you need."""

    def before_step(self, trainer, step: int) -> None:
        """Called at the top of optimizer step ``step``."""

    def after_run(self, trainer, summary: dict) -> None:
        """Called once training and the final evaluation are done; may add fields to ``summary``."""


class FrozenCheck(TrainHook):
    """ESFT and MTP modes: ``summary["frozen_changed"]`` = the tensors, and stacked expert rows, outside
    the selection (and the MTP module's trained tensors) that differ from the base checkpoint after
    training (0 expected: only those train). It reloads this rank's share of the base checkpoint, a
    full base load, so it is opt-in. Collective (one all-reduce). Full fine-tuning changes
    everything: not checked there."""

    def after_run(self, trainer, summary: dict) -> None:
        if trainer.plan.job.mode in ("esft", "mtp"):
            summary["frozen_changed"] = frozen_changed(trainer)


@torch.no_grad()
def frozen_changed(trainer) -> int:
    model, selected = trainer.model, trainer.trainables.selected
    ref = trainer.load_base()  # as the trainer loaded it: same formats (FP8 stays FP8), same device
    now = dict(model.named_parameters())
    now.update(dict(model.named_buffers()))
    moes = model.moe_layers()
    layer_of = {name + ".": m.layer_id for name, m in model.named_modules() if any(m is x for x in moes)}
    trained = {id(p) for p in trainer.trainables.mtp_params}  # the MTP module's non-expert tensors, if trained
    trained_names = {n for n, p in model.named_parameters() if id(p) in trained}
    changed = 0
    for name, t in list(ref.named_parameters()) + list(ref.named_buffers()):
        if name in trained_names or (name.endswith("weight_scale_inv") and name[:-len("_scale_inv")] in trained_names):
            continue
        cur = now[name]
        if name.rsplit(".", 1)[-1] in EXPERT_ROWS:  # stacked rows (and FP8 scales): the selected ones train
            layer = next(v for prefix, v in layer_of.items() if name.startswith(prefix))
            keep = torch.ones(cur.shape[0], dtype=torch.bool, device=cur.device)
            if layer in selected:
                keep[selected[layer].local_idx] = False
            changed += int(not _bit_equal(cur[keep], t[keep]))
        elif name.endswith("expert_load"):
            continue  # a routing counter, not a weight
        else:
            changed += int(not _bit_equal(cur, t))
    total = torch.tensor(changed, device=trainer.device)
    if trainer.world > 1:
        dist.all_reduce(total)
    return int(total)
