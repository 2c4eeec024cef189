"""Backend selection, the Triton import guard and the tuned-config tables (pure CPU, no Triton
kernels run here; the forced-Triton path is covered by interp_backend.py)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import expertpool.kernels as K
from expertpool.kernels import backend, cpu_gemm, reference as ref, tuned

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("EXPERTPOOL_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_auto_on_cpu_is_torch_and_logged_once(caplog):
    backend._log_once.cache_clear()
    q, s = ref.weight_quant_ref(torch.randn(64, 128))
    x = torch.randn(2, 128)
    with caplog.at_level(logging.INFO, logger="expertpool.kernels.backend"):
        y = K.linear(x, q, s)
        K.linear(x, q, s)
    assert K.select_backend(CPU)[0] == "torch"
    assert torch.equal(y, ref.linear_ref(x, q, s))
    assert len([r for r in caplog.records if "linear: using torch" in r.getMessage()]) == 1


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv("EXPERTPOOL_KERNELS", "torch")
    assert backend.requested_backend() == "torch"
    with K.use_backend("triton"):
        assert backend.requested_backend() == "triton"  # the context manager wins
        with K.use_backend("auto"):
            assert backend.requested_backend() == "auto"
        assert backend.requested_backend() == "triton"
    assert backend.requested_backend() == "torch"
    monkeypatch.setenv("EXPERTPOOL_KERNELS", "cuda")
    with pytest.raises(ValueError, match="EXPERTPOOL_KERNELS must be one of"):
        backend.requested_backend()
    with pytest.raises(ValueError, match="use_backend"):
        with K.use_backend("fast"):
            pass


def test_packed_linear_pads_rows_to_a_bucket_without_changing_them(monkeypatch):
    """Row counts above 16 run padded to ``shape_bucket`` (few oneDNN kernel shapes); the rows kept
    equal the unpadded product bit for bit (each output row depends on its own input row only), for
    flat and batched inputs. bf16 goes to oneDNN here with the bf16 kernel switched off."""
    from expertpool.kernels import cpu_gemm
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "0")
    cpu_gemm.SWITCH.reread()
    try:
        dtypes = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
        for dt in dtypes:
            w = torch.randn(96, 64).to(dt)
            packed = K.pack_weight(w)
            assert packed is not None and not isinstance(packed, cpu_gemm.Packed)
            x = torch.randn(150, 64).to(dt)
            for n in (1, 16, 17, 33, 100, 150):
                assert K.shape_bucket(n) > n or n in (1, 16)
                want = torch.ops.mkldnn._linear_pointwise(x[:n], packed, None, "none", [], "")
                assert torch.equal(K.packed_linear(x[:n], packed), want), (dt, n)
            assert torch.equal(K.packed_linear(x[:100].view(4, 25, 64), packed).view(100, 96),
                               K.packed_linear(x[:100], packed))
    finally:
        monkeypatch.delenv(cpu_gemm.ENV_SWITCH)
        cpu_gemm.SWITCH.reread()


def test_bf16_weights_pack_for_the_cpu_kernel_where_the_cpu_has_the_bf16_dot_product():
    """With AVX512_BF16 a bf16 weight packs for ``cpu_gemm`` (no padding: each row's sums in one order
    whatever the batch), the product within bf16 rounding of the fp64 one; switched off in a block,
    ``packed_linear`` answers None and the layer takes its plain weight."""
    from expertpool.kernels import cpu_experts, cpu_gemm
    from expertpool.model.layers import Linear
    lib = cpu_experts.library()
    if lib is None or not cpu_experts.has_bf16_dot(lib):
        pytest.skip("needs the CPU kernels built with the bf16 dot product (AVX512_BF16)")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 64, generator=g) * 0.1).bfloat16()
    packed = K.pack_weight(w)
    assert isinstance(packed, cpu_gemm.Packed)
    x = torch.randn(150, 64, generator=g).bfloat16()
    y = K.packed_linear(x, packed)
    exact = x.double() @ w.double().T
    assert ((y.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-30).all()
    for n in (1, 3, 17, 100):
        assert torch.equal(K.packed_linear(x[:n], packed), y[:n])
    assert torch.equal(K.packed_linear(x[:100].view(4, 25, 64), packed).view(100, 96), y[:100])
    lin = Linear(64, 96)
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    assert lin.pack_for_cpu()
    with torch.no_grad():
        assert torch.equal(lin(x), y)
        with cpu_gemm.switched_off():
            assert K.packed_linear(x, packed) is None
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_linears_equal_their_separate_products(dtype):
    """MergedPack: two layers of one input as one packed product. With the bf16 kernel each output
    column is computed alone, so the merge changes no bit; oneDNN's fp32 GEMM may round the last bit.
    A changed weight, autograd or the fast paths off take the separate layers."""
    from expertpool.model.layers import Linear, MergedPack
    g = torch.Generator().manual_seed(1)
    a, b = Linear(64, 96), Linear(64, 40)
    for lin in (a, b):
        lin.weight = torch.nn.Parameter((torch.randn(lin.out_features, 64, generator=g) * 0.1).to(dtype),
                                        requires_grad=False)
    merged = MergedPack()
    if not merged.pack([a, b]):
        pytest.skip(f"nothing packs {dtype} on this machine")
    x = torch.randn(16, 64, generator=g).to(dtype)
    with torch.no_grad():
        got = merged([a, b], x)
        want = [lin(x) for lin in (a, b)]
        bf16_kernel = isinstance(merged.packed.form, cpu_gemm.Packed)
        for y, w in zip(got, want):
            if bf16_kernel:
                assert torch.equal(y, w)
            else:
                torch.testing.assert_close(y, w, rtol=1e-5, atol=1e-6)
        calls = []
        real = K.packed_linear
        try:
            K.packed_linear = lambda *args: calls.append(1) or real(*args)
            b.weight.add_(1.0)  # a rewritten weight (a patch): the stale pack is not used
            for y, lin in zip(merged([a, b], x), (a, b)):
                assert torch.equal(y, lin(x))
            assert calls == []  # neither the pack nor a layer's own (none) ran
            assert merged.pack([a, b])  # packed again from the new weights
            merged([a, b], x)
            assert calls == [1]
            with K.use_backend("torch"):
                merged([a, b], x)
            with torch.enable_grad():  # training: the layers' own products
                merged([a, b], x)
            assert calls == [1]
        finally:
            K.packed_linear = real


def test_the_model_packs_q_a_with_kv_a_and_gate_with_up(tiny_dir):
    """prepare_for_inference packs MLA's down-projections and every MLP's gate / up together and drops
    those layers' own packed copies (no second copy); a decode of the tiny model is unchanged by it."""
    from expertpool.model.attention import MLA
    from expertpool.model.checkpoint import load_checkpoint
    from expertpool.model.layers import MLP
    m = load_checkpoint(tiny_dir, dtype=torch.float32, with_mtp=False)
    n = m.prepare_for_inference()
    groups = [mod for mod in m.modules() if isinstance(mod, (MLA, MLP))]
    assert groups and n > 0
    for mod in groups:
        assert mod.merged_pack.packed.form is not None
        assert all(lin.packed.form is None for lin in mod.merged())
    ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    with torch.no_grad():
        fast = m(ids)
        with K.use_backend("torch"):
            slow = m(ids)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_forced_triton_on_cpu_without_interpreter_raises():
    q, s = ref.weight_quant_ref(torch.randn(64, 128))
    with K.use_backend("triton"), pytest.raises(RuntimeError, match="needs CUDA tensors"):
        K.linear(torch.randn(2, 128), q, s)


def test_fp8_linear_without_scale_is_rejected():
    q, _ = ref.weight_quant_ref(torch.randn(64, 128))
    with pytest.raises(ValueError, match="needs its fp32 scale"):
        K.linear(torch.randn(2, 128), q, None)


def test_package_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, expertpool.kernels as K\n"
        "from expertpool.kernels._triton import triton_import_error\n"
        "assert 'triton' in (triton_import_error() or '')\n"
        "q, s = K.weight_quant(torch.randn(64, 128))\n"
        "y = K.linear(torch.randn(2, 128), q, s)\n"
        "with K.use_backend('triton'):\n"
        "    try:\n"
        "        K.linear(torch.randn(2, 128), q, s)\n"
        "    except RuntimeError as exc:\n"
        "        assert 'cannot be imported' in str(exc)\n"
        "    else:\n"
        "        raise AssertionError('forced triton without triton must raise')\n"
        "print('ok', tuple(y.shape))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("EXPERTPOOL_KERNELS", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok (2, 64)" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("kernel", tuned.KERNELS)
def test_config_tables_are_valid(kernel):
    table = json.loads((tuned.CONFIG_DIR / f"{kernel}.json").read_text())
    entries = [table["default"]] + [e for dev in table["devices"].values() for e in dev.values()]
    for entry in entries:
        for bucket, cfg in entry.items():
            assert int(bucket) > 0
            for key in ("BLOCK_M", "BLOCK_N"):
                assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0
            assert ref.BLOCK_SIZE % cfg["BLOCK_N"] == 0
            assert cfg["num_warps"] in (1, 2, 4, 8, 16) and cfg["num_stages"] >= 1


def test_config_lookup_falls_back_to_default_and_logs_once(caplog):
    tuned._log_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger="expertpool.kernels.tuned"):
        small = tuned.get_config("fp8_gemm", "N=7,K=128", 1, CPU)
        big = tuned.get_config("fp8_gemm", "N=7,K=128", 10 ** 6, CPU)
    table = tuned.load_table("fp8_gemm")["default"]
    assert small == table[min(table, key=int)] and big == table[max(table, key=int)]
    assert len([r for r in caplog.records if "N=7,K=128" in r.getMessage()]) == 1


def test_config_lookup_prefers_device_entry(monkeypatch):
    table = {"default": {"64": {"BLOCK_M": 16}},
             "devices": {"cpu": {"N=1,K=128": {"8": {"BLOCK_M": 32}, "128": {"BLOCK_M": 64}}}}}
    monkeypatch.setattr(tuned, "load_table", lambda kernel: table)
    assert tuned.get_config("fp8_gemm", "N=1,K=128", 9, CPU) == {"BLOCK_M": 64}
    assert tuned.get_config("fp8_gemm", "N=1,K=128", 8, CPU) == {"BLOCK_M": 32}
    assert tuned.get_config("fp8_gemm", "N=2,K=128", 8, CPU) == {"BLOCK_M": 16}
