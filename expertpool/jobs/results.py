"""What a fine-tuning run leaves in ``output_dir`` besides its log: the ESFT selection and the result.

- ``esft_experts.json`` (ESFT, rank 0, once the experts are selected): the scoring, p, and per
  layer the selected experts with their normalized scores.
- The result, at the end: ESFT writes an expert patch (``<output_dir>/patch``, ``model.patch``
  format) with the selected experts' fp32 weights, plus the MTP module's non-expert tensors when
  the run trained it (``mtp_loss_weight > 0``); mode mtp writes a patch of kind ``mtp`` (all the MTP
  layer's routed experts and its non-expert tensors), applied in place when served; full fine-tuning
  writes a complete HF checkpoint (``<output_dir>/model``): the base model with every trained tensor
  (the MTP module's included), the tokenizer files copied.

Experts live on their owner ranks, so ``write_result`` first gathers them to rank 0 (collective:
every rank calls it, on CPU copies); only rank 0 writes, into ``plan.local_output``, and uploads the
result when output_dir is a URI (the patch's manifest last, so a reader never sees half a patch).
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist

from expertpool.jobs.esft import SelectedExperts
from expertpool.jobs.plan import TrainPlan
from expertpool.model.checkpoint import load_checkpoint, save_checkpoint
from expertpool.model.patch import mtp_tensors, save_patch
from expertpool.model.transformer import Transformer

Experts = dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]  # layer -> global id -> (w13 [2F, D], w2 [D, F])


def write_selection(out: Path, scoring: str, p: float, chosen: dict[int, list[int]],
                    norm: dict[int, list[float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "esft_experts.json").write_text(json.dumps({
        "scoring": scoring, "p": p,
        "layers": {str(k): {"experts": v, "scores": [round(norm[k][e], 6) for e in v]} for k, v in chosen.items()}},
        indent=1))


def gather_experts(model: Transformer, selected: dict[int, SelectedExperts] | None) -> Experts:
    """Every rank's trained experts, merged on rank 0 (other ranks get {}): the selected ones (ESFT,
    ``selected`` by layer) or all of them (``selected`` None). Collective when the world is > 1."""
    mine: Experts = {}
    for moe in model.moe_layers():
        ex = moe.experts
        if selected is None:
            for e in ex.expert_ids.tolist():
                i = int(ex.global_to_local[e])
                mine.setdefault(moe.layer_id, {})[e] = (ex.w13_weight[i].detach().float().cpu(),
                                                        ex.w2_weight[i].detach().float().cpu())
        elif moe.layer_id in selected:  # the fp32 master copies (the stacked rows may be FP8)
            sel = selected[moe.layer_id]
            for j, e in enumerate(sel.global_ids):
                mine.setdefault(moe.layer_id, {})[e] = (sel.w13[j].detach().cpu().clone(),
                                                        sel.w2[j].detach().cpu().clone())
    world = dist.get_world_size()
    if world == 1:
        return mine
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)  # only rank 0 writes the result
    merged: Experts = {}
    for part in parts or []:
        for layer, ex in part.items():
            merged.setdefault(layer, {}).update(ex)
    return merged


def write_result(plan: TrainPlan, base: Path, model: Transformer, selected: dict[int, SelectedExperts],
                 summary: dict, with_mtp: bool = False) -> None:
    """Write the run's result (the patch or the full checkpoint) and put its path into
    ``summary["output"]`` on rank 0. ``base``: the base checkpoint as resolved on this node;
    ``with_mtp``: the run trained the MTP module (esft and mtp modes), whose tensors go into the patch.
    Collective."""
    job = plan.job
    rank = dist.get_rank()
    if job.mode in ("esft", "mtp"):
        experts = gather_experts(model, selected)
        if rank == 0:
            info = {"job": plan.job_name, "steps": job.steps, "eval_loss": summary.get("eval_loss_final")}
            if job.mode == "esft":
                info |= {"scoring": job.esft.scoring, "p": job.esft.p, "mtp_loss_weight": job.mtp_loss_weight}
            else:
                info |= {"prompt_tokens": job.mtp.prompt_tokens, "seq_len": job.seq_len,
                         "agreement": summary.get("mtp_agreement_final")}
            save_patch(plan.local_output / "patch", base_model_dir=base, domain=plan.domain, experts=experts,
                       dtype=torch.float32, base_name=None if plan.embedded_base else plan.base_model,
                       kind="mtp" if job.mode == "mtp" else "experts",
                       mtp=mtp_tensors(model) if with_mtp else None, info=info)
            plan.upload("patch")
            summary["output"] = plan.output("patch")
    else:
        experts = gather_experts(model, None)
        if rank == 0:
            full = load_checkpoint(plan.base_dir(None), dtype=torch.float32,  # all experts: fetch the rest
                                   weight_dtype="fp32", with_mtp=len(model.model.mtp) > 0)
            dense = {k: v.cpu() for k, v in model.state_dict().items() if ".experts." not in k}
            _missing, unexpected = full.load_state_dict(dense, strict=False)
            assert not unexpected, unexpected
            for moe in full.moe_layers():
                for e, (w13, w2) in experts[moe.layer_id].items():
                    moe.experts.w13_weight.data[e] = w13
                    moe.experts.w2_weight.data[e] = w2
            save_checkpoint(full, plan.local_output / "model", dtype=torch.float32, tokenizer_dir=base)
            plan.upload("model")
            summary["output"] = plan.output("model")
