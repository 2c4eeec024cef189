"""GPU-only (skipped without CUDA): bench-mini with FP8 weights through the in-process engine.

- Greedy decoding runs and agrees with the CPU run of the same checkpoint up to the first near-tie:
  the GPU computes W8A8 (activations quantized to e4m3, DeepSeek's recipe), the CPU W8A16, so the
  first step's logits differ by e4m3 rounding (bound: ``E4M3_REL_ERROR_BOUND`` per quantized
  operand, four in series through the layers' linears and experts, so 4x), and a token may differ
  only where the CPU's top-two margin is within that difference.
- Decode steps replayed from CUDA graphs give exactly the eager tokens (same kernels, same inputs).
- Sampling at temperature 1 is reproducible (same seed, same tokens) and stays in the vocabulary.
"""

import pytest
import torch

from tests.kernels.kernel_oracles import E4M3_REL_ERROR_BOUND, gpu

pytestmark = gpu

from expertpool.model.checkpoint import load_checkpoint  # noqa: E402
from expertpool.model.embedded import init_model  # noqa: E402
from expertpool.model.sampling import SamplingParams  # noqa: E402
from expertpool.platform.scheduler import EngineCore  # noqa: E402
from expertpool.platform.executor import LocalExecutor  # noqa: E402
from expertpool.platform.worker import ModelRunner  # noqa: E402

NEW = 24


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 Triton kernels need compute capability >= 8.9")
    return init_model("bench-mini", tmp_path_factory.mktemp("bench-mini-fp8"), fp8=True, seed=0)


def _engine(model, device, graphs: bool):
    runner = ModelRunner(model, num_blocks=256, block_size=16, device=device, scratch_blocks=2)
    if graphs:
        runner.enable_decode_graphs([1, 2, 4, 8, 16], max_seq_len=256)
    return EngineCore(LocalExecutor(runner), num_blocks=256, block_size=16, max_batch_size=16, max_seq_len=256,
                      max_num_batched_tokens=256, eos_token_id=None, vocab_size=model.args.vocab_size)


def _generate(core, prompts, params):
    from expertpool.platform.engine import generate
    return generate(core, prompts, params)


def test_bench_mini_fp8_greedy_graphs_and_sampling(fp8_dir):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, 2000, (8, 32), generator=g).tolist()
    greedy = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    gpu = load_checkpoint(fp8_dir, dtype=torch.bfloat16, device="cuda", with_mtp=False)
    eager = _generate(_engine(gpu, "cuda", graphs=False), prompts, greedy)
    graphed_core = _engine(gpu, "cuda", graphs=True)
    assert graphed_core.executor.runner.graphs is not None and graphed_core.executor.runner.graphs.graphs
    assert _generate(graphed_core, prompts, greedy) == eager

    cpu = load_checkpoint(fp8_dir, dtype=torch.bfloat16, with_mtp=False)
    on_cpu = _generate(_engine(cpu, "cpu", graphs=False), prompts, greedy)
    for p, a, b in zip(prompts, eager, on_cpu):
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is None:
            continue
        ids = torch.tensor([p + b[:i]])
        with torch.no_grad():
            ref = cpu(ids)[0, -1].float()
            got = gpu(ids.cuda())[0, -1].float().cpu()
        diff = (got - ref).abs().max().item()
        assert (got - ref).norm() / ref.norm() < 4 * E4M3_REL_ERROR_BOUND
        top2 = ref.topk(2).values
        assert (top2[0] - top2[1]).item() <= 2 * diff, (i, top2.tolist(), diff)

    sampled = SamplingParams(max_tokens=NEW, temperature=1.0, top_p=0.95, seed=123, ignore_eos=True)
    a = _generate(graphed_core, prompts, sampled)
    b = _generate(_engine(gpu, "cuda", graphs=False), prompts, sampled)
    assert a == b  # same seed and position: same draws, graphs or not
    assert all(0 <= t < gpu.args.vocab_size for out in a for t in out) and a != eager
