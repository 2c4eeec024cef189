"""Training the MTP module: ESFT with ``mtp_loss_weight > 0`` puts it into the patch, and ``mode: mtp``
self-distils it from the base's own greedy outputs into a patch that replaces the served module in
place. One process, no Ray.

The demo data's rows all open with the same long system prompt, so their first tokens are identical
and a self-distillation job would see a single prompt; the mtp tests write their own data set of
varied short texts instead."""

import asyncio
import json
import random

import pytest
import torch

from expertpool.jobs import finetune
from expertpool.jobs.data import local_rows
from expertpool.jobs.hooks import FrozenCheck
from expertpool.model.checkpoint import load_checkpoint
from expertpool.model.patch import apply_patch, mtp_tensors, read_patch
from expertpool.model.sampling import SamplingParams
from expertpool.platform.config import ConfigError, parse_config
from expertpool.platform.engine import AsyncEngine, generate, local_engine
from tests.jobs.helpers import job_config

WORDS = ("bike wheel chain brake saddle pedal gear frame tire light bell lock pump rack fork spoke tube valve "
         "seat road").split()


def test_esft_with_mtp_loss_trains_the_mtp_module_into_the_patch(tmp_path, tiny_dir):
    plan = job_config(tmp_path, tiny_dir, """
workers: 1
batch_size: 2
seq_len: 128
mode: esft
esft: {scoring: token, p: 0.2, score_tokens: 256}
mtp_loss_weight: 0.5
lr: 1.0e-2
steps: 2
""")
    s = finetune.run_local(plan, [FrozenCheck()])
    assert s["frozen_changed"] == 0  # nothing outside the selection and the MTP module moved
    patch = read_patch(s["output"], base_model_dir=tiny_dir)
    assert patch.kind == "experts"
    base = load_checkpoint(tiny_dir, dtype=torch.float32)
    mtp_layer = base.args.num_hidden_layers
    assert patch.experts.get(mtp_layer), "the MTP layer's experts are scored and selected like a main layer's"
    before = mtp_tensors(base)
    assert set(patch.mtp) == set(before) and "model.layers.3.eh_proj.weight" in patch.mtp
    assert "model.layers.3.mlp.gate.weight" not in patch.mtp  # routing stays frozen
    changed = [n for n in before if not torch.equal(patch.mtp[n], before[n])]
    assert "model.layers.3.eh_proj.weight" in changed and "model.layers.3.self_attn.q_a_proj.weight" in changed
    apply_patch(base, patch, base_model_dir=tiny_dir)
    after = mtp_tensors(base)
    assert all(torch.equal(after[n], patch.mtp[n]) for n in patch.mtp)
    moe = base.moe_layers()[-1]
    assert moe.layer_id == mtp_layer
    e = sorted(patch.experts[mtp_layer])[0]
    assert torch.equal(moe.experts.w13_weight[e], patch.experts[mtp_layer][e][0])


def _texts(path, n=200, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))}) + "\n")


def _acceptance(model, prompts) -> tuple[float, list[list[int]]]:
    """Greedy draft acceptance of one MTP draft token per step through the serving path, and the outputs."""
    core = local_engine(model, max_batch_size=16, max_seq_len=128, spec_tokens=1)
    outs = generate(core, prompts, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    assert core.spec_drafted > 100, "too few drafts to measure an acceptance rate"
    return core.spec_accepted / core.spec_drafted, outs


def test_mtp_job_raises_draft_acceptance_and_keeps_the_base_bit_identical(tmp_path, tiny_dir):
    _texts(tmp_path / "texts.jsonl")
    (tmp_path / "c.yaml").write_text(f"""train:
  jobs:
    draft:
      base_model: {tiny_dir}
      dataset: {{path: {tmp_path / 'texts.jsonl'}, eval_fraction: 0.1}}
      output_dir: {tmp_path / 'out'}
      mode: mtp
      mtp: {{prompt_tokens: 16}}
      workers: 1
      batch_size: 8
      seq_len: 64
      lr: 1.0e-2
      steps: 30
""")
    s = finetune.run_local(finetune.prepare(str(tmp_path / "c.yaml"), "draft"), [FrozenCheck()])
    assert s["frozen_changed"] == 0
    patch = read_patch(s["output"], base_model_dir=tiny_dir)
    assert patch.kind == "mtp" and set(patch.experts) == {3} and len(patch.experts[3]) == 256

    # acceptance on held-out prompts: the eval rows, which the job never trained on
    _, evals = local_rows(str(tmp_path / "texts.jsonl"), "jsonl", "text", str(tiny_dir), 64, 0.1)
    prompts = [list(map(int, r[:16])) for r in evals["input_ids"][:12]]
    base = load_checkpoint(tiny_dir, dtype=torch.float32, with_mtp=True)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    before, outs_before = _acceptance(base, prompts)

    # the serving path: the runner applies the MTP patch in place (what every actor does)
    core = local_engine(base, max_batch_size=16, max_seq_len=128, spec_tokens=1)
    assert core.executor.runner.load_patch(s["output"], str(tiny_dir)) == 0  # the base, not a variant
    after, outs_after = _acceptance(base, prompts)
    assert outs_after == outs_before  # greedy speculative output is the main model's: unchanged
    # observed on this data (2-core CPU): 0.004 before (a random module: 1 of 275 drafts) and 0.194 after
    # 30 steps (0.17-0.19 at lr 1e-2..3e-2 in scratch runs); 0.12 leaves margin for numerics and still
    # fails if the patch is not applied, or applied behind a stale packed weight (it measured 0.10 when
    # apply_mtp wrote through .data, which leaves the version key of the packed CPU linears unchanged)
    assert before < 0.05 and after >= 0.12, (before, after, s)

    now = base.state_dict()
    main = [k for k in reference if not k.startswith("model.mtp.")]
    assert main and all(torch.equal(now[k], reference[k]) for k in main)  # main model bit-identical
    assert any(not torch.equal(now[k], reference[k]) for k in reference if k.startswith("model.mtp."))


def test_engine_applies_an_mtp_patch_in_place_and_keeps_it_for_replay(tmp_path, tiny_dir):
    """AsyncEngine: an MTP patch serves under the base's id and joins the list a recovery replays on
    replacement actors; an engine that does not decode speculatively refuses it."""
    base = load_checkpoint(tiny_dir, dtype=torch.float32, with_mtp=True)
    patch_dir = tmp_path / "p"
    from expertpool.model.patch import save_patch
    moved = {n: t + 0.01 for n, t in mtp_tensors(base).items()}
    e13, e2 = base.moe_layers()[-1].experts.w13_weight[0].clone(), base.moe_layers()[-1].experts.w2_weight[0].clone()
    save_patch(patch_dir, base_model_dir=tiny_dir, domain="draft", experts={3: {0: (e13 * 2, e2)}}, kind="mtp",
               mtp=moved)
    engine = AsyncEngine(local_engine(base, spec_tokens=1), "tiny", 128, model_dir=str(tiny_dir))
    assert asyncio.run(engine.load_patch("draft", str(patch_dir))) == "tiny"
    assert engine.model_ids() == ["tiny"] and engine._patch_dirs == [str(patch_dir)]
    assert torch.equal(base.model.mtp[0].eh_proj.weight, moved["model.layers.3.eh_proj.weight"])
    assert torch.equal(base.moe_layers()[-1].experts.w13_weight[0], e13 * 2)
    plain = AsyncEngine(local_engine(load_checkpoint(tiny_dir, dtype=torch.float32, with_mtp=False)), "tiny", 128,
                        model_dir=str(tiny_dir))
    with pytest.raises(ValueError, match="serving.speculative"):
        asyncio.run(plain.load_patch("draft", str(patch_dir)))


def test_mtp_mode_needs_room_for_a_continuation():
    job = {"dataset": {"path": "x.jsonl"}, "mode": "mtp", "seq_len": 64, "mtp": {"prompt_tokens": 64}}
    with pytest.raises(ConfigError, match="mtp.prompt_tokens"):
        parse_config({"train": {"jobs": {"d": job}}})
