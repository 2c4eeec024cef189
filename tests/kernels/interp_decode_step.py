"""Ops and host reads of one decode step on the GPU code path, counted on CPU (issue 16, "not
launch-bound"), under TRITON_INTERPRET=1 (run via test_kernels_interpreter.py).

A DeepSeek-V3-shaped FP8 model (every matmul width a multiple of 128, grouped sigmoid routing,
a shared expert, MLA with q compression) decodes through the in-process engine with the Triton
kernels forced on; ``kernels.counting.OpCounter`` (the counter the benchmarks use too) counts each
MoE layer's forward. Budgets: at most one host read per MoE layer (none with the local dispatcher;
the split sizes with the all-to-all one) and at most 50 ops, a third of the ~154 counted before the
fused router, the one-launch alignment and the device-side load counts.
"""

import socket

import pytest
import torch

from tests.kernels.kernel_oracles import requires_interpreter

pytest.importorskip("triton")
pytestmark = requires_interpreter

from expertpool import kernels  # noqa: E402  (after the triton check)
from expertpool.kernels.counting import OpCounter  # noqa: E402
from expertpool.model.args import ModelArgs, YarnArgs  # noqa: E402
from expertpool.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from expertpool.model.sampling import SamplingParams  # noqa: E402
from expertpool.model.transformer import init_random  # noqa: E402
from expertpool.platform.engine import local_engine  # noqa: E402

MAX_OPS_PER_MOE_LAYER = 50
MAX_HOST_READS_PER_MOE_LAYER = 1

V3_SHAPED = ModelArgs(
    vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    first_k_dense_replace=1, max_position_embeddings=512,
    rope_scaling=YarnArgs(factor=4.0, original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=1.0))


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("v3-shaped-fp8")
    save_checkpoint(init_random(V3_SHAPED, seed=0, std=0.05), d, fp8=True, dtype=torch.bfloat16)
    return load_checkpoint(d, dtype=torch.bfloat16, with_mtp=False)


def _count_moe_layers(model, run_step):
    """(ops, host reads, summary) of every MoE layer's forward during one ``run_step()``."""
    counts = []

    def pre(mod, args):
        counts.append(OpCounter().__enter__())

    def post(mod, args, out):
        counts[-1].__exit__(None, None, None)

    handles = []
    for moe in model.moe_layers():
        handles += [moe.register_forward_pre_hook(pre), moe.register_forward_hook(post)]
    try:
        run_step()
    finally:
        for h in handles:
            h.remove()
    return counts


def _decoding_engine(model):
    core = local_engine(model, max_batch_size=4, max_seq_len=64, max_num_batched_tokens=64)
    for i in range(4):
        core.add_request(f"r{i}", [3 + i, 4, 5, 6, 7], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    core.step()  # prefill
    core.step()  # the first decode: warm
    return core


def test_decode_step_moe_layers_are_within_budget(fp8_model):
    with kernels.use_backend("triton"):
        core = _decoding_engine(fp8_model)
        counts = _count_moe_layers(fp8_model, core.step)
    assert len(counts) == 2
    for c in counts:
        assert c.launches >= 5, c.summary()  # the Triton path ran (router, align, quant, GEMMs)
        assert c.host_reads <= MAX_HOST_READS_PER_MOE_LAYER and c.host_reads == 0, c.summary()
        assert c.ops <= MAX_OPS_PER_MOE_LAYER, c.summary()


def test_all_to_all_dispatch_reads_the_host_once_per_layer(fp8_model):
    import torch.distributed as dist

    from expertpool.model.dispatch import AllToAllDispatcher, LocalDispatcher
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        fp8_model.set_dispatcher(AllToAllDispatcher(V3_SHAPED.n_routed_experts))
        with kernels.use_backend("triton"):
            core = _decoding_engine(fp8_model)
            counts = _count_moe_layers(fp8_model, core.step)
        for c in counts:
            assert c.host_reads == MAX_HOST_READS_PER_MOE_LAYER, c.summary()  # the split sizes, nothing else
            assert c.ops <= MAX_OPS_PER_MOE_LAYER, c.summary()
    finally:
        fp8_model.set_dispatcher(LocalDispatcher())
        dist.destroy_process_group()
